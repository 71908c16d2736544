"""Benchmarks in CI: the replay bound as a regression check, and a compare.py smoke run."""

from __future__ import annotations

import json

import pytest

from benchmarks import compare, replay


@pytest.fixture(scope="module")
def replay_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("replay") / "replay.json"
    replay.main(["--scale", "0.125", "--out", str(out)])
    return {r["workload"].split("-")[0]: r for r in json.loads(out.read_text())["results"]}


def test_replay_kvflow_never_misses_more_than_lru(replay_results):
    for name, r in replay_results.items():
        assert r["kvflow"]["miss_tokens"] <= r["lru"]["miss_tokens"], name
        assert r["optimum"]["miss_tokens"] <= r["kvflow"]["miss_tokens"], name


@pytest.mark.parametrize("workload", ["sequential", "realistic"])
def test_replay_kvflow_within_ten_percent_of_belady_without_branches(replay_results, workload):
    # Branching workloads cannot reach a clairvoyant optimum from hints alone (see README).
    r = replay_results[workload]
    assert r["kvflow"]["miss_tokens"] <= 1.10 * r["optimum"]["miss_tokens"]


def test_replay_sequential_lru_misses_everything_kvflow_does_not(replay_results):
    r = replay_results["sequential"]
    assert r["lru"]["miss_tokens"] == r["fixed_tokens_requested"] > r["kvflow"]["miss_tokens"]


@pytest.mark.e2e
def test_compare_smoke_run_writes_table_json_and_plot(tmp_path):
    params = json.dumps({"fixed_len": 64, "agents": 4, "rounds": 1, "dynamic_len": 8, "output_len": 4})
    argv = ["--workload", "sequential", "--params", params, "--configs", "lru,kvflow", "--repeats", "1"]
    compare.main([*argv, "--out-dir", str(tmp_path), "--name", "smoke"])
    result = json.loads((tmp_path / "smoke.json").read_text())
    assert set(result["medians"]) == {"lru", "kvflow"}
    assert (
        result["medians"]["kvflow"]["fixed_prompt_hit_rate"]
        >= result["medians"]["lru"]["fixed_prompt_hit_rate"]
    )
    assert "| kvflow |" in (tmp_path / "smoke.md").read_text()
    assert (tmp_path / "smoke.png").stat().st_size > 0
