"""HiCache's host (CPU memory) tier on a machine without a GPU (``kvflow.patches.cpu_host_tier``).

Unit tests of the torch copy and the hooks, then real servers: a prompt evicted
from the device pool comes back from host memory with the same greedy output and
logprobs as its first run and as a server without HiCache.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import requests
import torch

from kvflow import patches
from kvflow.cpu_kernels.direct_copy import transfer_kv_direct
from kvflow.harness.server_process import ServerProcess

cpu_host_tier = patches.cpu_host_tier

# --- the torch copy and the hooks (no server) ---------------------------------------------------------


def test_transfer_kv_direct_copies_rows_per_layer_in_any_order():
    src = [torch.randn(10, 2, 3), torch.randn(10, 2, 3)]
    dst = [torch.zeros(6, 2, 3), torch.zeros(6, 2, 3)]
    transfer_kv_direct(src, dst, torch.tensor([7, 1, 4]), torch.tensor([0, 5, 2]))
    for s, d in zip(src, dst, strict=True):
        assert torch.equal(d[[0, 5, 2]], s[[7, 1, 4]])
        assert not d[[1, 3, 4]].any()
    transfer_kv_direct(src, dst, torch.tensor([], dtype=torch.int64), torch.tensor([]))


def fake_host_pool(layers=2, device_rows=8, host_rows=16, layout="layer_first"):
    """The attributes of ``MHATokenToKVPoolHost`` that the direct/layer_first path reads."""
    k = torch.zeros(layers, host_rows, 2, 4)
    v = torch.zeros(layers, host_rows, 2, 4)
    return SimpleNamespace(
        _transfer_device=torch.device("cpu"),
        layout=layout,
        page_size=1,
        target_layer_num=layers,
        k_buffer=k,
        v_buffer=v,
        host_kv_data_refs=[k[i] for i in range(layers)] + [v[i] for i in range(layers)],
        device_k_buffers=tuple(torch.randn(device_rows, 2, 4) for _ in range(layers)),
        device_v_buffers=tuple(torch.randn(device_rows, 2, 4) for _ in range(layers)),
    )


def must_not_be_called(*args, **kwargs):
    raise AssertionError("the stock op was called")


def test_backup_then_load_back_round_trips_through_host_memory():
    pool = fake_host_pool()
    saved = [b.clone() for b in pool.device_k_buffers + pool.device_v_buffers]
    device_rows, host_rows = torch.tensor([1, 2, 6]), torch.tensor([9, 3, 12])
    cpu_host_tier._backup_from_device_all_layer(
        must_not_be_called, pool, None, host_rows, device_rows, "direct"
    )
    for buffer in pool.device_k_buffers + pool.device_v_buffers:
        buffer.zero_()
    for layer in range(2):
        cpu_host_tier._load_to_device_per_layer(
            must_not_be_called, pool, None, host_rows, device_rows, layer, "direct"
        )
    for before, after in zip(saved, pool.device_k_buffers + pool.device_v_buffers, strict=True):
        assert torch.equal(after[device_rows], before[device_rows])
        assert not after[[0, 3, 4, 5, 7]].any()


def test_other_backends_layouts_and_devices_go_to_sglangs_own_code():
    calls = []

    def original(*args, **kwargs):
        calls.append(args)

    for pool, backend in (
        (fake_host_pool(), "kernel"),
        (fake_host_pool(layout="page_first_direct"), "direct"),
        (SimpleNamespace(**{**vars(fake_host_pool()), "_transfer_device": torch.device("meta")}), "direct"),
    ):
        cpu_host_tier._backup_from_device_all_layer(
            original, pool, None, torch.tensor([0]), torch.tensor([0]), backend
        )
        cpu_host_tier._load_to_device_per_layer(
            original, pool, None, torch.tensor([0]), torch.tensor([0]), 0, backend
        )
    assert len(calls) == 6


def test_hooks_take_the_same_parameters_as_sglangs_methods():
    # So that a call by keyword (as SGLang's HiSparse coordinator makes) reaches the original intact.
    import inspect

    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost

    for name in ("backup_from_device_all_layer", "load_to_device_per_layer"):
        stock = list(inspect.signature(getattr(MHATokenToKVPoolHost, name)).parameters)[1:]
        hook = list(inspect.signature(getattr(cpu_host_tier, f"_{name}")).parameters)[2:]
        assert hook == [p for p in stock if p != "is_draft"] + (["kwargs"] if "is_draft" in stock else [])


def test_host_registration_is_skipped_only_without_cuda(monkeypatch):
    calls = []
    buffer = torch.zeros(4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu_host_tier._skip_host_register_without_cuda(lambda *a, **k: calls.append(a), buffer, 64)
    assert calls == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cpu_host_tier._skip_host_register_without_cuda(lambda *a, **k: calls.append(a), buffer, 64)
    assert calls == [(buffer, 64)]


def test_cpu_transfer_streams_get_a_noop_synchronize():
    from sglang.srt.mem_cache.l2_transfer import L2TransferEngine

    engine = L2TransferEngine("direct")
    cpu_host_tier._add_stream_synchronize(None, engine, "direct")
    engine.device_to_host_stream.synchronize()
    engine.host_to_device_stream.synchronize()


# --- real servers ---------------------------------------------------------------------------------------

POOL_TOKENS, PROMPT_TOKENS, OUTPUT_TOKENS = 1024, 300, 8
COMMON_ARGS = ["--max-total-tokens", str(POOL_TOKENS), "--random-seed", "0"]
HICACHE_ARGS = ["--enable-hierarchical-cache", "--hicache-ratio", "4"]
# A, then enough other prompts (none sharing A's first token) to push A out of a 1024-token
# device pool, then A again (from host memory on a HiCache server), a new prompt, and A once more.
# The others are hinted agents whose fixed prompts kvflow owns; A is not hinted (unowned), so
# kvflow evicts it first, as LRU does.
A = [(7 * i) % 250 + 3 for i in range(PROMPT_TOKENS)]
OTHERS = [[(13 * i + 50 * k + 1) % 250 + 3 for i in range(PROMPT_TOKENS)] for k in range(4)]
C = [(11 * i + 5) % 250 + 3 for i in range(PROMPT_TOKENS // 2)]
SEQUENCE = [(None, A), *((f"B{k}", b) for k, b in enumerate(OTHERS)), (None, A), (None, C), (None, A)]
LOGPROB_TOLERANCE = 1e-5


def generate(url: str, agent: str | None, input_ids: list[int]) -> dict:
    body = {
        "input_ids": input_ids,
        "return_logprob": True,
        "sampling_params": {"max_new_tokens": OUTPUT_TOKENS, "temperature": 0},
    }
    if agent is not None:
        body["kvflow"] = {
            "workflow_id": "hicache",
            "agent_id": agent,
            "fixed_prefix_len": len(input_ids) - 20,
        }
    response = requests.post(f"{url}/generate", json=body, timeout=300)
    assert response.status_code == 200, response.text
    result = response.json()
    return {
        "output_ids": result["output_ids"],
        "logprobs": [entry[0] for entry in result["meta_info"]["output_token_logprobs"]],
        "cached": result["meta_info"]["cached_tokens"],
        "details": result["meta_info"].get("cached_tokens_details") or {},
    }


def run_sequence(server: ServerProcess) -> list[dict]:
    results = [generate(server.url, agent, ids) for agent, ids in SEQUENCE]
    # Let the scheduler go idle: its invariant checks (exact token accounting) run there and
    # would take the server down on a mismatch.
    time.sleep(3)
    assert requests.get(f"{server.url}/health", timeout=30).status_code == 200
    results.append(generate(server.url, None, A))
    assert requests.get(f"{server.url}/health", timeout=30).status_code == 200
    assert "memory leak detected" not in server.log_path.read_text(errors="replace")
    return results


def assert_same_outputs(got: dict, want: dict) -> None:
    assert got["output_ids"] == want["output_ids"]
    assert (
        max(abs(a - b) for a, b in zip(got["logprobs"], want["logprobs"], strict=True)) <= LOGPROB_TOLERANCE
    )


@pytest.fixture(scope="module")
def reference() -> list[dict]:
    with ServerProcess(COMMON_ARGS) as server:
        print(f"reference server (no HiCache) ready in {server.startup_seconds:.1f}s")
        results = run_sequence(server)
    assert results[5]["cached"] < PROMPT_TOKENS // 2  # A was evicted and recomputed
    return results


@pytest.mark.e2e
@pytest.mark.parametrize("policy", ["kvflow", "lru"])
def test_prefix_evicted_from_the_device_comes_back_from_host_memory(reference, policy):
    started = time.monotonic()
    with ServerProcess([*COMMON_ARGS, *HICACHE_ARGS, "--radix-eviction-policy", policy]) as server:
        print(f"HiCache server ({policy}) ready in {server.startup_seconds:.1f}s")
        results = run_sequence(server)
        stats = requests.get(f"{server.url}/kvflow/stats", timeout=30).json()
    print(f"{policy}: {time.monotonic() - started:.1f}s; A again: {results[5]['details']}")

    first, again = results[0], results[5]
    assert first["details"].get("host", 0) == 0
    assert again["details"]["host"] > 0
    assert again["details"]["device"] < PROMPT_TOKENS
    assert again["details"]["device"] + again["details"]["host"] == again["cached"] >= PROMPT_TOKENS - 1
    assert stats["eviction_policy"] == policy
    assert stats["evictions"]["device"]["unowned"]["tokens"] >= PROMPT_TOKENS - 1  # A, at least
    assert_same_outputs(again, first)
    assert_same_outputs(results[-1], first)
    for got, want in zip(results, reference, strict=True):
        assert_same_outputs(got, want)
