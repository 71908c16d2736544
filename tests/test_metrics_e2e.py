"""kvflow's series in SGLang's Prometheus ``/metrics`` on real CPU servers: with ``--enable-metrics``
each equals ``GET /kvflow/stats`` under the labels of SGLang's own scheduler series; without it,
no kvflow series and nothing else changes."""

from __future__ import annotations

import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from test_metrics import OWN_LABELS, expected_series, kvflow_samples

from kvflow.harness.demo import fixed_prompts, run_cyclic_workflow
from kvflow.harness.server_process import ServerProcess
from kvflow.model import BYTE_TOKENS

pytestmark = pytest.mark.e2e

AGENTS, FIXED, DYNAMIC, OUTPUT, ROUNDS = 6, 200, 8, 4, 3
CHAT_SYSTEM, CHAT_TURNS = 40, 3
# The two-tier setting of test_two_tier_e2e: a device pool for three fixed prompts, a host tier
# for all of them, so prompts are evicted from the device and prefetched back.
POOL = 3 * FIXED + 2 * (DYNAMIC + OUTPUT)
DEVICE_ONLY = ["--max-total-tokens", str(POOL), "--random-seed", "0"]
TWO_TIER = [*DEVICE_ONLY, "--enable-hierarchical-cache", "--hicache-ratio", "5"]
# Every decode step logged, so the scheduler publishes its metrics again as soon as it goes idle.
METRICS = ["--enable-metrics", "--decode-log-interval", "1"]
# SGLang publishes an idle scheduler's metrics again at most every 30 s.
CONVERGE_SECONDS = 45


@pytest.fixture(scope="module")
def servers():
    """A kvflow server with --enable-metrics and one without (device tier only), started side by side."""
    # 600 s to start: two servers at once on a 2-core machine other tests may be loading too.
    with_metrics, without = (
        ServerProcess([*TWO_TIER, *METRICS], timeout=600),
        ServerProcess(DEVICE_ONLY, timeout=600),
    )
    try:
        for server in (with_metrics, without):
            server.start()
        for server in (with_metrics, without):
            server.wait_ready()
        yield with_metrics, without
    finally:
        for server in (with_metrics, without):
            server.stop()


def summary(server: ServerProcess) -> dict:
    response = requests.get(f"{server.url}/kvflow/stats", timeout=30)
    response.raise_for_status()
    return response.json()


def scrape(server: ServerProcess) -> str:
    response = requests.get(f"{server.url}/metrics", timeout=30)
    response.raise_for_status()
    return response.text


def chat(url: str) -> None:
    """An agent whose every turn resends its previous prompt, its output and a tool's result."""
    prompt = fixed_prompts(1, CHAT_SYSTEM, seed=7)[0]
    for turn in range(CHAT_TURNS):
        body = {
            "input_ids": prompt,
            "sampling_params": {"max_new_tokens": OUTPUT, "temperature": 0, "ignore_eos": True},
            "kvflow": {
                "workflow_id": "metrics-chat",
                "agent_id": "chat",
                "fixed_prefix_len": CHAT_SYSTEM,
                "steps_to_execution": {"chat": 0},
            },
        }
        response = requests.post(f"{url}/generate", json=body, timeout=300)
        response.raise_for_status()
        tool = [(31 * turn + j) % BYTE_TOKENS for j in range(DYNAMIC)]
        prompt = prompt + response.json()["output_ids"] + tool


def test_kvflow_series_equal_the_stats_under_sglangs_scheduler_labels(servers):
    server, _ = servers
    chat(server.url)  # a context, then pushed off the device by the workflow's prompts
    run_cyclic_workflow(server.url, AGENTS, FIXED, DYNAMIC, OUTPUT, ROUNDS, workflow_id="metrics")
    # The scheduler publishes where SGLang publishes its own series; wait for the publication after
    # the last change (a prefetch may still complete once the last request is done).
    started = time.monotonic()
    while True:
        stats, exposition = summary(server), scrape(server)
        series, labels = kvflow_samples(exposition)
        if series == expected_series(stats) or time.monotonic() > started + CONVERGE_SECONDS:
            break
        time.sleep(1)
    print(f"/metrics matched /kvflow/stats {time.monotonic() - started:.1f}s after the workflow")
    print("\n".join(line for line in exposition.splitlines() if line.startswith("kvflow:")))
    assert series == expected_series(stats)
    assert stats["totals"]["invocations"] == AGENTS * ROUNDS + CHAT_TURNS
    assert stats["prefetch"]["issued"] > 0 and stats["evictions"]["device"]["owned"]["nodes"] > 0

    # Each kvflow sample carries exactly the labels of SGLang's scheduler gauges, with their values.
    families = {family.name: family for family in text_string_to_metric_families(exposition)}
    sglang_labels = [sample.labels for sample in families["sglang:num_running_reqs"].samples]
    assert len(sglang_labels) == 1
    assert {"model_name", "engine_type", "tp_rank", "pp_rank", "moe_ep_rank"} <= set(sglang_labels[0])
    assert not set(sglang_labels[0]) & set(OWN_LABELS)
    assert labels and all(sample == sglang_labels[0] for sample in labels)
    assert families["kvflow:evicted_tokens"].type == "counter"
    assert families["kvflow:tracked_workflows"].type == "gauge"

    # The chat agent's context on the two tiers: HiCache's write-through put a host copy of each of
    # its nodes (a node can be on both); the device keeps what the workflow's prompts left it.
    detail = requests.get(f"{server.url}/kvflow/stats", params={"workflow_id": "metrics-chat"}, timeout=30)
    context = detail.json()["workflow"]["agents"]["chat"]["context"]
    print(context)
    assert context["resumes"] and context["pauses"]["observed"] == CHAT_TURNS - 1
    assert stats["contexts"]["agents"] == 1 and stats["contexts"]["tokens"] == context["tokens"] > CHAT_SYSTEM
    assert context["on_host"] == context["tokens"] and context["on_device"] <= context["tokens"]


def test_without_enable_metrics_no_kvflow_series_and_no_error(servers):
    _, server = servers
    run_cyclic_workflow(server.url, 2, 40, DYNAMIC, OUTPUT, 1, workflow_id="no-metrics")
    response = requests.get(f"{server.url}/metrics", timeout=30)
    assert response.status_code == 404  # SGLang mounts /metrics only with --enable-metrics
    assert "kvflow:" not in response.text
    assert summary(server)["totals"]["invocations"] == 2
    assert requests.get(f"{server.url}/health", timeout=30).status_code == 200
    assert "Traceback" not in server.log_path.read_text(errors="replace")
