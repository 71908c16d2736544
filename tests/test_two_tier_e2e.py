"""Two tiers end to end on CPU: kvflow eviction + prefetch vs stock HiCache, real servers."""

from __future__ import annotations

import pytest
import requests

from benchmarks.run import run_workload
from benchmarks.workloads import concurrent
from kvflow.harness.demo import run_cyclic_workflow
from kvflow.harness.server_process import ServerProcess

pytestmark = pytest.mark.e2e

AGENTS, FIXED, DYNAMIC, OUTPUT, ROUNDS = 10, 200, 8, 4, 4
# A device pool for about a third of the fixed prompts; the host tier holds all of them.
POOL = 3 * FIXED + 2 * (DYNAMIC + OUTPUT)
COMMON = [
    "--max-total-tokens", str(POOL), "--random-seed", "0", "--enable-hierarchical-cache",
    "--hicache-ratio", "5", "--enable-cache-report",
]  # fmt: skip


def run(server: ServerProcess):
    return run_cyclic_workflow(server.url, AGENTS, FIXED, DYNAMIC, OUTPUT, ROUNDS, workflow_id="two-tier")


@pytest.fixture(scope="module")
def runs():
    with ServerProcess(COMMON) as kvflow_server:
        kvflow_runs = run(kvflow_server)
        stats = requests.get(f"{kvflow_server.url}/kvflow/stats", timeout=30).json()
    stock_args = [*COMMON, "--radix-cache-backend", "stock", "--radix-eviction-policy", "lru"]
    with ServerProcess(stock_args) as stock_server:
        stock_runs = run(stock_server)
    return kvflow_runs, stats, stock_runs


def test_prefetch_puts_the_next_fixed_prompt_on_the_device_in_time(runs):
    kvflow_runs, stats, _ = runs
    measured = [r for r in kvflow_runs if r.round_index >= 1]
    on_device = [r for r in measured if (r.cached_device or 0) >= FIXED]
    assert len(on_device) >= 0.9 * len(measured)
    assert all(r.cached_tokens >= FIXED for r in measured)  # no fixed-prompt token recomputed
    prefetch = stats["prefetch"]
    assert prefetch["issued"] > 0 and prefetch["timely"] >= 0.9 * len(measured) - AGENTS
    assert stats["evictions"]["device"]["owned"]["nodes"] > 0


def test_stock_hicache_loads_on_demand_and_outputs_are_identical(runs):
    kvflow_runs, _, stock_runs = runs
    assert [r.output_ids for r in kvflow_runs] == [r.output_ids for r in stock_runs]
    measured = [r for r in stock_runs if r.round_index >= 1]
    assert sum((r.cached_device or 0) >= FIXED for r in measured) < 0.5 * len(measured)


def test_concurrent_workflows_all_finish_while_requests_are_held_for_prefetches():
    """Held requests go back to the waiting queue even when SGLang forms a batch in the same pass."""
    workload = concurrent(workflows=12, fixed_len=128, agents=3, dynamic_len=16, output_len=8, rounds=2)
    pool = workload.fixed_tokens() // 2 + 12 * 24
    # A slow emulated link keeps prefetches in flight while other workflows' requests are dispatched.
    args = [*COMMON[2:], "--max-total-tokens", str(pool), "--kvflow-emulate-link-gbps", "0.002"]
    with ServerProcess(args) as server:
        result = run_workload(server.url, workload, timeout=120, progress=False)
        assert requests.get(f"{server.url}/health", timeout=30).status_code == 200
    assert result["summary"]["calls"] == 12 * 3 * 2
    assert result["kvflow_stats"]["prefetch"]["held"] > 0
