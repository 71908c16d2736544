"""Benchmarks in CI: the replay bound as a regression check, and a compare.py smoke run."""

from __future__ import annotations

import json

import pytest

from benchmarks import compare, replay, workloads


@pytest.fixture(scope="module")
def replay_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("replay") / "replay.json"
    replay.main(["--scale", "0.125", "--timed", "16", "--out", str(out)])
    return {_short_name(r["workload"]): r for r in json.loads(out.read_text())["results"]}


def _short_name(workload: str) -> str:
    return workload.split("-")[0] + ("-branch" if "-branch" in workload else "")


def test_replay_kvflow_never_misses_more_than_lru(replay_results):
    for name, r in replay_results.items():
        assert r["kvflow"]["miss_tokens"] <= r["lru"]["miss_tokens"], name
        assert r["optimum"]["miss_tokens"] <= r["kvflow"]["miss_tokens"], name


@pytest.mark.parametrize("workload", ["sequential", "realistic", "concurrent", "timed"])
def test_replay_kvflow_within_ten_percent_of_belady_without_branches(replay_results, workload):
    # Branching workloads cannot reach a clairvoyant optimum from hints alone (see docs/design.md).
    r = replay_results[workload]
    assert not replay.has_branches(r)
    assert r["kvflow"]["miss_tokens"] <= 1.10 * r["optimum"]["miss_tokens"]


@pytest.mark.parametrize("workload", ["concurrent", "timed", "timed-branch"])
def test_replay_time_urgency_needs_no_tie_break_knob(replay_results, workload):
    # With hop urgency, no tie-break was best everywhere (LRU ties lose on round-robin workflows,
    # MRU ties on workflows at different speeds); the time default is at least as good as both.
    r = replay_results[workload]
    for hops in ("kvflow_hops", "kvflow_hops_mru_ties"):
        assert r["kvflow"]["miss_tokens"] <= r[hops]["miss_tokens"], hops


def test_replay_sequential_lru_misses_everything_kvflow_does_not(replay_results):
    r = replay_results["sequential"]
    assert r["lru"]["miss_tokens"] == r["fixed_tokens_requested"] > r["kvflow"]["miss_tokens"]


def test_staggered_replay_builds_and_runs_ended_and_stopped():
    cases = replay.staggered_cases(scale=0.125, per_speed=2)
    assert len(cases) == 2 * len(replay.STAGGERED_POOLS)
    cost = replay.CostModel()
    for workload, capacity in cases[:: len(replay.STAGGERED_POOLS)]:  # the smallest pool of each
        ended = workload.params["ended"]
        lasts = [[c.ends for c in flow] for flow in workload.workflows]
        assert all(ends == [False] * (len(ends) - 1) + [ended] for ends in lasts)
        r = replay.replay(workload, capacity, cost)
        assert r["optimum"]["miss_tokens"] <= r["kvflow"]["miss_tokens"] <= r["lru"]["miss_tokens"]


@pytest.mark.e2e
def test_compare_smoke_run_writes_table_json_and_plot(tmp_path):
    params = json.dumps({"fixed_len": 64, "agents": 4, "rounds": 1, "dynamic_len": 8, "output_len": 4})
    argv = ["--workload", "sequential", "--params", params, "--configs", "lru,kvflow-mru", "--repeats", "1"]
    compare.main([*argv, "--out-dir", str(tmp_path), "--name", "smoke"])
    result = json.loads((tmp_path / "smoke.json").read_text())
    assert set(result["medians"]) == {"lru", "kvflow-mru"}
    assert (
        result["medians"]["kvflow-mru"]["fixed_prompt_hit_rate"]
        >= result["medians"]["lru"]["fixed_prompt_hit_rate"]
    )
    # the tie-break reached the server's eviction strategy through SGLang's policy config
    assert result["runs"]["kvflow-mru"][0]["kvflow_stats"]["tie_break"] == "mru"
    assert result["runs"]["kvflow-mru"][0]["kvflow_stats"]["urgency"]["mode"] == "hops"
    assert "| kvflow-mru |" in (tmp_path / "smoke.md").read_text()
    assert (tmp_path / "smoke.png").stat().st_size > 0


def test_the_emulated_link_goes_only_to_configurations_with_a_host_tier():
    for name in compare.CONFIGS:
        args = compare.config_args(name, 1000, ["--port", "1"], link_gbps=0.5)
        assert ("--kvflow-emulate-link-gbps" in args) == ("hicache" in name), name
    assert "--kvflow-emulate-link-gbps" not in compare.config_args("kvflow-hicache", 1000, [])
    assert json.loads(compare.config_args("kvflow-mru", 1000, [])[1]) == {
        "urgency": "hops",
        "tie_break": "mru",
    }
    assert json.loads(compare.config_args("kvflow-hicache-hops", 1000, [])[2]) == {"urgency": "hops"}


def test_command_line_switches_reach_the_comparison(monkeypatch, tmp_path):
    # The comparison itself is replaced: this checks only what main() hands to it.
    seen = {}

    def record(*args, **kwargs):
        seen.update(kwargs)
        raise SystemExit(0)

    monkeypatch.setattr(compare, "compare", record)
    argv = ["--workload", "realistic", "--no-hints", "--emulate-link-gbps", "0.5", "--out-dir", str(tmp_path)]
    with pytest.raises(SystemExit):
        compare.main(argv)
    assert seen["hints"] is False and seen["link_gbps"] == 0.5


@pytest.mark.parametrize(
    "workload",
    [
        workloads.concurrent(workflows=8, fixed_len=64, dynamic_len=32, output_len=32, rounds=2),
        workloads.sequential(fixed_len=128, rounds=2),
        workloads.realistic(),
    ],
    ids=lambda w: w.name,
)
def test_the_ideal_pool_keeps_every_fixed_prompt_under_stock_lru(workload):
    everything = sum(len(c.input_ids) + c.output_len for c in workload.interleaved())
    cold_misses = replay.replay_cache(workload, everything, "lru")  # first uses without a warm-up
    assert replay.replay_cache(workload, compare.ideal_pool_tokens(workload), "lru") == cold_misses


def test_prefetch_counters_are_reported_per_run_from_the_servers_cumulative_ones():
    def run(issued: int, wasted: int) -> dict:
        counters = dict(
            issued=issued, timely=issued - wasted, late=0, wasted=wasted, held=1, skipped_no_room=0
        )
        return {"kvflow_stats": {"prefetch": counters}}

    per_run = compare.kvflow_counters([run(10, 1), run(25, 2), run(38, 6)])
    assert per_run["issued"] == 13 and per_run["wasted"] == 1  # medians of 10/15/13 and 1/1/4
    assert compare.kvflow_counters([{"kvflow_stats": None}]) is None
    table = compare.counters_table({"kvflow-hicache": [run(10, 1)], "lru-hicache": [{"kvflow_stats": None}]})
    assert "| kvflow-hicache | 10 | 9 | 0 | 1 | 1 | 0 |" in table and "lru-hicache" not in table
