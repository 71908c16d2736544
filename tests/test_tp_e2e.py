"""Tensor parallelism on CPU: ``--tp-size 2`` through patches/cpu_tensor_parallel.py.

SGLang's dummy weights are seeded per parameter by its element count
(``initialize_dummy_weights``), so every TP=2 shard repeats the start of the
TP=1 tensor and the two layouts would be different models. The servers here
load one saved checkpoint of the embedded model's architecture instead, so
kvflow at TP=2 can be compared with SGLang's own cache at TP=1.
"""

from __future__ import annotations

import shutil
import time

import pytest
import requests
import torch
from kvflow.patches import cpu_tensor_parallel
from sglang.srt.distributed.device_communicators.pynccl import PyNcclCommunicator

from kvflow.harness.demo import pool_tokens, run_cyclic_workflow
from kvflow.harness.server_process import ServerProcess
from kvflow.launch_server import EMBEDDED_MODEL_PATH

AGENTS, FIXED, DYNAMIC, OUTPUT, ROUNDS, POOL_PROMPTS = 3, 40, 4, 4, 3, 2
POOL = pool_tokens(POOL_PROMPTS, FIXED, DYNAMIC, OUTPUT)  # room for 2 of the 3 agents: evictions
COMMON_ARGS = ["--max-total-tokens", str(POOL), "--random-seed", "0"]
# One core per rank (fewer NUMA nodes than ranks here), and SGLang's checker of the ranks' cache calls.
TP_ENV = {"SGLANG_ENABLE_RANK_CONSENSUS_CHECKER": "1"}  # the launcher sets the core split
CONSENSUS_ENABLED = "Rank consensus checker is enabled"


def save_checkpoint(path) -> str:
    """The embedded model's config and tokenizer with seeded random weights, as safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shutil.copytree(EMBEDDED_MODEL_PATH, path)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig.from_pretrained(path)).save_pretrained(path, safe_serialization=True)
    return str(path)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """kvflow at ``--tp-size 2`` and SGLang's own cache at TP=1 on the same weights, started side by side."""
    model = ["--model-path", save_checkpoint(tmp_path_factory.mktemp("tp") / "model")]
    with pytest.MonkeyPatch.context() as env:
        for name, value in TP_ENV.items():
            env.setenv(name, value)
        tp2 = ServerProcess([*model, *COMMON_ARGS, "--tp-size", "2"], timeout=600)
        tp2.start()
    tp1 = ServerProcess([*model, *COMMON_ARGS, "--radix-cache-backend", "stock"], timeout=600)
    tp1.start()
    try:
        tp2.wait_ready()
        tp1.wait_ready()
        yield tp2, tp1
    finally:
        tp2.stop()
        tp1.stop()


def output_logprobs(server: ServerProcess) -> list[tuple[float, int]]:
    body = {
        "input_ids": list(range(40, 90)),
        "sampling_params": {"max_new_tokens": 8, "temperature": 0},
        "return_logprob": True,
    }
    response = requests.post(f"{server.url}/generate", json=body, timeout=120)
    response.raise_for_status()
    return [(logprob, token) for logprob, token, _ in response.json()["meta_info"]["output_token_logprobs"]]


@pytest.mark.e2e
def test_tp2_on_cpu_serves_a_hinted_workflow_like_tp1_with_ranks_in_consensus(servers):
    tp2, tp1 = servers
    tp2_runs = run_cyclic_workflow(tp2.url, AGENTS, FIXED, DYNAMIC, OUTPUT, ROUNDS, workflow_id="tp")
    tp1_runs = run_cyclic_workflow(tp1.url, AGENTS, FIXED, DYNAMIC, OUTPUT, ROUNDS, workflow_id="tp")
    assert [r.output_ids for r in tp2_runs] == [r.output_ids for r in tp1_runs]
    # The random model's next-token distribution is nearly flat: the logprobs show the two layouts agree.
    tp2_logprobs, tp1_logprobs = output_logprobs(tp2), output_logprobs(tp1)
    assert [token for _, token in tp2_logprobs] == [token for _, token in tp1_logprobs]
    assert max(abs(a - b) for (a, _), (b, _) in zip(tp2_logprobs, tp1_logprobs, strict=True)) < 1e-4

    stats = requests.get(f"{tp2.url}/kvflow/stats", timeout=30).json()
    assert "cpu_tensor_parallel" in stats["patches_active"]
    assert stats["totals"]["invocations"] == len(tp2_runs)
    evictions = stats["evictions"]["device"]
    assert evictions["owned"]["nodes"] + evictions["unowned"]["nodes"] > 0

    # The checker compares both ranks' cache calls (evictions included) in a background
    # thread and exits the scheduler on a divergence: give it time, then the server must still serve.
    time.sleep(5)
    log = tp2.log_path.read_text(errors="replace")
    assert f"TP0] {CONSENSUS_ENABLED}" in log and f"TP1] {CONSENSUS_ENABLED}" in log
    assert "SGLANG_CPU_OMP_THREADS_BIND=" in log  # the launcher gave each rank its cores
    assert "Found rank divergence" not in log
    assert tp2.process.poll() is None
    assert requests.get(f"{tp2.url}/health", timeout=30).status_code == 200


def test_pynccl_is_disabled_for_a_cpu_device_only():
    communicator = PyNcclCommunicator.__new__(PyNcclCommunicator)
    cpu_tensor_parallel._disable_pynccl_on_cpu(
        PyNcclCommunicator.__init__, communicator, group=None, device=torch.device("cpu")
    )
    assert communicator.disabled and not communicator.available
    # Any other device goes to SGLang's own constructor (here it fails: no process group).
    with pytest.raises(AssertionError):
        cpu_tensor_parallel._disable_pynccl_on_cpu(
            PyNcclCommunicator.__init__,
            PyNcclCommunicator.__new__(PyNcclCommunicator),
            group=None,
            device="cuda:0",
        )
