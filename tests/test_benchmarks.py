"""Benchmarks in CI: the replay bound as a regression check, and a compare.py smoke run."""

from __future__ import annotations

import json

import pytest

from benchmarks import agent_chat, compare, replay, timeline_replay, workloads


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


def test_agent_chat_sessions_replay_the_traces_growth_and_pauses():
    live = workloads.agent_chat(sessions=6, turns=4, subagent_share=0.5, ended_share=0.5, seed=1)
    trace = workloads.agent_sessions(
        sessions=6, turns=(4, 4), system_len=64, task_len=(20, 40), max_context=500,
        tool_mean_s=(0.2, 2.0), tool_sigma=1.0, decode_s_per_token=0.0, start_window_s=3.0,
        subagent_share=0.5, subagent_turns=(2, 4), ended_share=0.5, seed=1,
    )  # fmt: skip
    sessions = live.all_sessions()
    assert [s.session_id for s in live.sessions] == [f"s{i}" for i in range(6)]
    assert {s.session_id for s in sessions} == set(trace.sessions)
    assert {s.ended for s in live.sessions} == {True, False}  # some ended, some abandoned
    for session in sessions:
        turns = [t for t in trace.turns if t.session_id == session.session_id]
        assert [len(t.new_ids) for t in session.turns] == [
            len(t.input_ids) - (t.history_len or t.system_len) for t in turns
        ]
        assert [t.output_len for t in session.turns] == [len(t.output_ids) for t in turns]
        assert len(session.system) == 64 and all(0 <= i < workloads.DEFAULT_VOCAB for i in session.system)
        assert all(t.pause_s >= 0 for t in session.turns)
        if session.parent is None:
            assert session.turns[0].pause_s == round(turns[0].start, 3)
            assert (
                session.turns[2].pause_s == round(turns[2].start - turns[1].end, 3)
                or session.spawn_after == 1
            )
        for child in session.children:  # sub-agents: same workflow, spawned after one of its turns
            assert child.parent == session.session_id and child.workflow_id == session.workflow_id
            assert 0 <= session.spawn_after < len(session.turns) - 1
    assert any(s.children for s in live.sessions)
    assert live.context_tokens() == trace.context_tokens()
    slow = workloads.agent_chat(
        sessions=6, turns=4, subagent_share=0.5, ended_share=0.5, seed=1, time_scale=2
    )
    assert slow.sessions[0].turns[1].pause_s == pytest.approx(2 * live.sessions[0].turns[1].pause_s, abs=2e-3)


def test_agent_chat_hints_end_only_ended_sessions_and_name_the_parent():
    live = workloads.agent_chat(sessions=6, turns=4, subagent_share=0.5, ended_share=0.5, seed=1)
    ended = next(s for s in live.sessions if s.ended)
    abandoned = next(s for s in live.sessions if not s.ended)
    child = next(c for s in live.sessions for c in s.children)
    last = agent_chat.hint(ended, "r1-", 500, last=True)
    assert last["keep_context"] is False and last["workflow_id"] == "r1-" + ended.workflow_id
    assert last["fixed_prefix_len"] == 64 and last["steps_to_execution"] == {"r1-" + ended.session_id: 0}
    assert agent_chat.hint(ended, "", 500, last=False)["keep_context"] is True
    assert agent_chat.hint(abandoned, "", 500, last=True)["keep_context"] is True
    assert agent_chat.hint(child, "", 500, last=False)["steps_to_execution"] == {
        child.session_id: 0,
        child.parent: 1,
    }


def _turn(session: str, turn: int, ttft: float, history: int, cached: int, device: int | None):
    host = None if device is None else cached - device
    return agent_chat.TurnResult(
        session, turn, 0.0, ttft, ttft, history + 10, history, cached, device, host, 5
    )


def test_agent_chat_summary_counts_history_served_recomputed_and_from_host():
    turns = [
        _turn("s0", 0, 9.0, 0, 3, 3),  # first turns: no history, out of the TTFT percentiles
        _turn("s0", 1, 0.1, 100, 100, 60),  # 40 of its history from host
        _turn("s0", 2, 0.3, 200, 250, 250),  # cached beyond the history counts as history only
        _turn("s1", 1, 0.2, 80, 30, None),  # no device / host split reported
    ]
    sessions = [
        agent_chat.SessionResult("s0", None, True, 4.0),
        agent_chat.SessionResult("s1", None, False, 2.0),
        agent_chat.SessionResult("s0.sub0", "s0", True, 100.0),  # sub-agents: not in the JCT
    ]
    m = agent_chat.summarize(turns, sessions)
    assert (m["history_tokens"], m["history_served"], m["history_recomputed"]) == (380, 330, 50)
    assert m["history_from_host"] == 40
    assert m["ttft_p50_s"] == pytest.approx(0.2) and 0.29 < m["ttft_p99_s"] <= 0.3
    assert m["ttft_first_turn_p50_s"] == 9.0
    assert (m["jct_median_s"], m["jct_max_s"]) == (3.0, 4.0)
    halved = {**m, "history_served": 165, "history_recomputed": 100}
    table = agent_chat.markdown_table({"lru": halved, "tlru": m, "kvflow": m})
    assert "| kvflow | 0.50x / 1.00x / 1.00x / 1.00x | 1.00x / 1.00x / 1.00x / 1.00x |" in table
    assert "kvflow / lru: 2.00x" in table


def test_live_configurations_and_pool():
    assert "--enable-session-radix-cache" in compare.config_args("session-radix", 1400, [])
    assert "--enable-session-radix-cache" not in compare.config_args("kvflow", 1400, [])
    live = workloads.agent_chat(max_context=640)
    budget = compare.tlru_budget(live)  # SGLang refuses tlru unless threshold > next_prompt_estimate
    assert budget["threshold"] > budget["next_prompt_estimate"] > 0
    assert compare.tlru_budget(workloads.sequential())["threshold"] > 0


def test_live_workload_pool_from_the_command_line(monkeypatch, tmp_path):
    seen = {}

    def record(*args, **kwargs):
        seen["pool"] = args[2]
        raise SystemExit(0)

    monkeypatch.setattr(compare, "compare", record)
    for extra, pool in (["--pool-tokens", "1400"], 1400), (["--pool-fraction", "0.5"], None):
        with pytest.raises(SystemExit):
            compare.main(["--workload", "agent-chat", *extra, "--out-dir", str(tmp_path)])
        assert seen["pool"] == (pool or workloads.agent_chat().context_tokens() // 2)


def _timeline(pause_s: float, latency_s: float, output_len: int = 6) -> dict:
    """A live agent-chat run as the benchmark records it, its times and output lengths made up."""
    params = {"sessions": 3, "turns": 3, "time_scale": 1.0}
    workload = workloads.WORKLOADS["agent-chat"](**params)
    turns = []
    for s, session in enumerate(workload.all_sessions()):
        length, sent = len(session.system), 0.01 * s
        for k, turn in enumerate(session.turns):
            history = length + output_len if k else 0
            length = (history or length) + len(turn.new_ids)
            row = {"session_id": session.session_id, "turn": k, "sent_s": sent, "latency": latency_s}
            turns.append({**row, "history": history, "output_len": output_len})
            sent += latency_s + pause_s
    served = sum(t["history"] for t in turns)
    return {"params": params, "turns": turns, "summary": {"history_served": served, "history_tokens": served}}


def test_timeline_replay_serves_every_history_but_the_last_output_token_when_all_fits():
    run = _timeline(pause_s=0.5, latency_s=0.1)
    resumed = sum(1 for t in run["turns"] if t["turn"] > 0)
    for policy in timeline_replay.POLICIES:
        hits = timeline_replay.TimelineReplay(run, 100_000, policy).run()
        assert timeline_replay.served(run, hits) == run["summary"]["history_tokens"] - resumed, policy


def test_timeline_replay_turns_in_flight_hold_the_pool_and_queue_the_rest():
    run = _timeline(pause_s=0.0, latency_s=10.0)  # every session's turns overlap the others'
    largest = max(len(s.system) for s in workloads.WORKLOADS["agent-chat"](**run["params"]).all_sessions())
    pool = 2 * (largest + 200)  # room for about two turns at once
    rows = timeline_replay.replay_runs({"runs": {"lru": [run]}}, pool)
    assert set(rows[0]["served"]) == set(timeline_replay.POLICIES)
    for policy in timeline_replay.POLICIES:  # each replay checks the pool's accounting at its end
        assert 0 <= rows[0]["served"][policy] < run["summary"]["history_tokens"]
    with pytest.raises(ValueError, match="policy must be one of"):
        timeline_replay.TimelineReplay(run, pool, "belady")
