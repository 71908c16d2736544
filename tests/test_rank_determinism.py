"""Tensor-parallel determinism: every kvflow decision depends only on inputs every rank shares.

Each TP rank runs its own scheduler and cache on the requests and control requests rank 0
broadcasts. The cache reads time only from stamps the HTTP process wrote into those inputs
(kvflow.cache.stamped_clock), so two caches fed one stream decide alike however their own
clocks run; and the payloads SGLang's rank-consensus checker would compare between ranks are equal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from array import array

import pytest
from kvflow.patches.workflow_endpoints import _apply_command, clock_period
from sglang.srt.managers.schedule_batch import Req
from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
from sglang.srt.mem_cache.radix_cache import RadixKey
from sglang.srt.sampling.sampling_params import SamplingParams

from kvflow import control
from kvflow.cache.stamped_clock import StampedClock
from kvflow.harness.offline import CacheDriver
from kvflow.hints import TIME_KEY, WorkflowHint, read_stamp, transport, transport_time

TTL = 5.0


def _stream(n: int = 120, paused: bool = False) -> list[tuple[float, list[int], WorkflowHint | None]]:
    """(HTTP stamp, prompt, hint): three workflows (one stops and must expire), un-hinted traffic;
    ``paused``: each hint expects a pause after its request (``expected_pause_s``)."""
    events, stamp = [], 1000.0
    for turn in range(n):
        stamp += 0.5 if turn % 17 else 4.0  # now and then a pause near the TTL
        workflow = f"w{turn % 3}" if turn < 40 else f"w{turn % 2}"  # w2 stops after turn 40
        agent = turn % 4
        prompt = [1000 * (1 + turn % 3) + 10 * agent + j for j in range(24)] + [turn]
        steps = {f"a{j}": (j - agent) % 4 for j in range(4)}
        hint = WorkflowHint(
            workflow, f"a{agent}", 24, steps, expected_pause_s=0.5 + agent if paused else None
        )
        events.append((stamp, prompt, hint if turn % 5 else None))
    return events


def _drive_as_rank(monkeypatch: pytest.MonkeyPatch, offset: float, rate: float, paused: bool = False) -> dict:
    """Run the stream on a fresh cache while this process's clocks are skewed; return what it decided.
    ``paused``: hints expect pauses and requests carry their stamps (the rate they convert at)."""
    monkeypatch.setenv("KVFLOW_CONFIG", json.dumps({"hint_ttl": TTL}))
    real = time.monotonic
    start = real()
    for name in ("monotonic", "time", "perf_counter"):
        monkeypatch.setattr(time, name, lambda: offset + rate * (real() - start))
    driver = CacheDriver(size=160)
    cache, tracked = driver.cache, []
    for stamp, prompt, hint in _stream(paused=paused):
        cache.kvflow.advance_clock(stamp)  # the HTTP process's clock command
        driver.serve(prompt, hint, stamp=stamp if paused else None)
        tracked.append(sorted(w.workflow_id for w in cache.kvflow.workflows.workflows()))
    monkeypatch.undo()
    agents = [a for w in cache.kvflow.workflows.workflows() for a in w.agents.values()]
    return {
        "freed": driver.allocator.freed,
        "tracked": tracked,
        "next_uses": {(a.workflow_id, a.agent_id): a.next_use for a in agents},
        "pauses": {(a.workflow_id, a.agent_id): (a.pauses.source, a.pauses.expected) for a in agents},
        "ticks_per_second": cache.kvflow.workflows.logical_clock.ticks_per_second,
    }


def test_two_ranks_with_skewed_clocks_expire_evict_and_order_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    rank0 = _drive_as_rank(monkeypatch, 0.0, 1.0)
    rank1 = _drive_as_rank(monkeypatch, 1e6, 1000.0)  # a clock far ahead and running 1000x fast
    assert rank0 == rank1
    assert "w2" in rank0["tracked"][40] and "w2" not in rank0["tracked"][-1]  # the TTL expired it
    assert "w0" in rank0["tracked"][-1]
    assert rank0["freed"]  # and eviction really ran


def test_pause_hints_become_the_same_ticks_on_ranks_with_skewed_clocks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rank0 = _drive_as_rank(monkeypatch, 0.0, 1.0, paused=True)
    rank1 = _drive_as_rank(monkeypatch, 1e6, 1000.0, paused=True)
    assert rank0 == rank1
    assert rank0["ticks_per_second"] is not None  # measured from the stamps alone
    assert "hint" in {source for source, _ in rank0["pauses"].values()}
    assert rank0["pauses"] != _drive_as_rank(monkeypatch, 0.0, 1.0)["pauses"]  # the hints counted


def test_a_request_advances_the_clock_by_the_stamp_its_transport_carries() -> None:
    driver = CacheDriver(size=64)
    hint = WorkflowHint("w", "a", 4, {"a": 0})
    custom = {**transport(hint), TIME_KEY: 123.5}
    req = Req("r1", "", array("i", [1, 2, 3, 4, 5]), SamplingParams(max_new_tokens=1, custom_params=custom))
    driver.cache.match_prefix(MatchPrefixParams(key=RadixKey([1, 2, 3, 4, 5]), req=req))
    assert driver.cache.kvflow.clock() == 123.5
    assert driver.cache.kvflow.workflows.get("w") is not None


def test_stamps_are_finite_seconds_and_the_clock_never_goes_back() -> None:
    assert transport_time(transport(WorkflowHint("w", "a"))) == pytest.approx(time.monotonic(), abs=60)
    for bad in (None, True, "1", float("nan"), float("inf"), [1]):
        assert read_stamp(bad) is None
    clock = StampedClock()
    for stamp in (5.0, 3.0, None, float("nan"), 7):
        clock.advance(read_stamp(stamp) if stamp is not None else None)
    assert clock() == 7.0


def test_clock_commands_expire_stale_workflows_without_any_request() -> None:
    driver = CacheDriver(size=64)
    cache = driver.cache
    cache.kvflow.advance_clock(10.0)
    driver.serve([1, 2, 3, 4, 5], WorkflowHint("w", "a", 4, {"a": 0}))
    assert _apply_command(cache, control.encode(control.Clock(10.0 + cache.kvflow.workflows.ttl / 2)))
    assert cache.kvflow.workflows.get("w") is not None
    assert _apply_command(cache, control.encode(control.Clock(11.0 + cache.kvflow.workflows.ttl)))
    assert cache.kvflow.workflows.get("w") is None
    stamped = cache.kvflow.clock()
    unreadable_time = control.COMMAND_PREFIX + '{"at":"soon","op":"clock"}'
    assert _apply_command(cache, unreadable_time)  # applied, time unread
    assert cache.kvflow.clock() == stamped == 11.0 + cache.kvflow.workflows.ttl
    assert clock_period(300.0) == 30.0 and clock_period(0.2) == 0.05 and clock_period(8.0) == 2.0


_CONSENSUS_PROBE = """
import json, threading, queue, sys
from sglang.srt.utils import rank_consensus_checker as checker
from tests.test_rank_determinism import _stream
from kvflow.harness.offline import CacheDriver

logs = []
for rank in range(2):
    checker._q, checker._scheduler_thread = queue.Queue(), threading.current_thread()
    driver = CacheDriver(size=160)
    for stamp, prompt, hint in _stream():
        driver.cache.kvflow.advance_clock(stamp)
        driver.serve(prompt, hint)
    log = []
    while not checker._q.empty():
        log.append(checker._q.get())
    logs.append(log)
print(json.dumps(logs))
"""


def test_the_payloads_sglangs_rank_consensus_checker_compares_are_equal() -> None:
    env = {
        **os.environ,
        "SGLANG_ENABLE_RANK_CONSENSUS_CHECKER": "1",
        "KVFLOW_CONFIG": json.dumps({"hint_ttl": TTL}),
    }
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", _CONSENSUS_PROBE],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rank0, rank1 = json.loads(out.stdout.strip().splitlines()[-1])
    assert rank0 == rank1
    joined = "\n".join(rank0)
    for decision in (
        "observe_hint returns",
        "expire returns",
        "advance_clock called",
        "evict returns",
    ):
        assert decision in joined, decision
    assert "'w2'" in joined  # the expiry of the stopped workflow is among the compared results
