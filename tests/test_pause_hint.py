"""A hint's ``expected_pause_s``: seconds turned into ticks at the stamped rate, and contexts ranked by it."""

from __future__ import annotations

import pytest
from sglang.srt.managers.schedule_batch import FINISH_LENGTH, Req
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, MatchPrefixParams
from sglang.srt.mem_cache.radix_cache import RadixKey
from sglang.srt.sampling.sampling_params import SamplingParams

from kvflow.cache.urgency import RATE_WINDOW, REVIEW_FACTOR, LogicalClock
from kvflow.harness.offline import CacheDriver
from kvflow.hints import TIME_KEY, WorkflowHint, transport
from kvflow.stats_query import StatsQuery

SYSTEM = list(range(1, 21))


def test_the_clocks_rate_comes_from_stamps_over_whole_windows():
    clock = LogicalClock()
    assert clock.ticks_per_second is None and clock.ticks_for(5.0) is None
    for k in range(RATE_WINDOW):
        clock.tick()
        clock.stamped(100.0 + 0.5 * k)
    assert clock.ticks_per_second is None  # the window began at the first stamp: 7 ticks so far
    clock.tick()
    clock.stamped(100.0 + 0.5 * RATE_WINDOW)
    assert clock.ticks_per_second == 2.0
    assert clock.ticks_for(10.0) == 20.0 and clock.ticks_for(0.01) == 1.0  # at least one tick
    for _ in range(RATE_WINDOW):
        clock.tick()
        clock.stamped(104.0)  # no stamped time passed: no sample, the window goes on
    assert clock.ticks_per_second == 2.0
    clock.tick()
    clock.stamped(104.0 + 4.5)  # 9 ticks in 4.5 s (0.5 s per tick again)
    assert clock.seconds_per_tick == 0.5


class Sessions:
    """Interleaved sessions on one driver, each turn stamped one second after the previous."""

    def __init__(self, driver: CacheDriver, stamped: bool = True) -> None:
        self.driver, self.stamped, self.stamp = driver, stamped, 50.0
        self.prompts: dict[str, list[int]] = {}
        self.contexts: dict[str, list[int]] = {}
        self.next_token = 1000

    def _fresh(self, length: int) -> list[int]:
        self.next_token += length
        return list(range(self.next_token - length, self.next_token))

    def turn(self, name: str, pause: float | None = None) -> None:
        prompt = self.prompts.get(name) or SYSTEM + self._fresh(10)
        output = self._fresh(5)
        hint = WorkflowHint(f"wf-{name}", name, len(SYSTEM), {name: 0}, expected_pause_s=pause)
        self.stamp += 1.0
        stamp = self.stamp if self.stamped else None
        self.driver.serve(prompt + output, hint, prompt_len=len(prompt), stamp=stamp)
        self.contexts[name] = prompt + output
        self.prompts[name] = prompt + output + self._fresh(8)

    def agent(self, name: str):
        return self.driver.cache.kvflow.workflows.get(f"wf-{name}").agents[name]

    def cached_tail(self, name: str) -> bool:
        context = self.contexts[name]
        return self.driver.cached_len(context) == len(context)


# "x" learns a pause of one request, "y" of six; then x says its tool takes long, y that its is short.
LEARNED = ["y", *"xxxxx", "y", *"xxxxx", "y"]


def hinted_run(stamped: bool = True, size: int = 1000) -> Sessions:
    run = Sessions(CacheDriver(size=size), stamped)
    for name in LEARNED:
        run.turn(name)
    run.turn("x", pause=40.0)
    run.turn("y", pause=1.0)
    return run


def test_a_context_hinted_long_goes_before_one_hinted_short_against_their_learned_gaps():
    run = hinted_run()
    x, y = run.agent("x"), run.agent("y")
    learned = {agent: agent.pauses.last_request + agent.pauses.gap for agent in (x, y)}
    assert learned[x] < learned[y]  # learned alone, x would be back first
    assert x.pauses.clock.ticks_per_second == 1.0  # one hinted request per stamped second
    assert x.pauses.expected == x.pauses.last_request + 40 and y.pauses.expected == y.pauses.last_request + 1
    assert y.context_next_use < x.context_next_use
    run.driver.cache.evict(EvictParams(num_tokens=1))
    assert not run.cached_tail("x") and run.cached_tail("y")
    run.driver.check_accounting()


def test_without_a_measured_rate_the_hint_is_ignored_and_the_learned_gaps_rank():
    run = hinted_run(stamped=False)
    x, y = run.agent("x"), run.agent("y")
    assert x.pauses.clock.ticks_per_second is None and x.pauses.hinted is None
    assert x.context_next_use < y.context_next_use
    run.driver.cache.evict(EvictParams(num_tokens=1))
    assert run.cached_tail("x") and not run.cached_tail("y")


def test_a_hinted_pause_is_still_reviewed_and_the_gap_keeps_learning():
    run = hinted_run(size=4000)
    x = run.agent("x")
    gap, since = x.pauses.gap, x.pauses.last_request
    assert x.pauses.hinted == 40 and x.pauses.review_at == since + REVIEW_FACTOR * 40
    for _ in range(REVIEW_FACTOR * 40):
        run.turn("y")
    assert x.pauses.stretch == REVIEW_FACTOR * REVIEW_FACTOR * 40  # reviewed at since + 2 * 40
    assert x.pauses.gap == gap  # a hint is not a measurement
    run.turn("x")
    assert x.pauses.hinted is None and x.pauses.gap > gap  # the long pause it observed is learned
    assert x.pauses.expected == x.pauses.last_request + x.pauses.gap  # the next pause is learned
    run.driver.check_accounting()


def test_same_stamps_and_hints_give_the_same_ranks_and_stats():
    def outcome() -> dict:
        run = hinted_run()
        core = run.driver.cache.kvflow
        return {name: core.stats(StatsQuery(f"wf-{name}"))["workflow"] for name in "xy"} | {
            "summary": core.stats()["urgency"],
            "freed": run.driver.allocator.freed,
        }

    assert outcome() == outcome()


def test_stats_say_the_current_pause_came_from_the_hint():
    run = hinted_run()
    core = run.driver.cache.kvflow
    pauses = core.stats(StatsQuery("wf-x"))["workflow"]["agents"]["x"]["context"]["pauses"]
    assert pauses["gap_source"] == "hint" and pauses["gap"] == 40.0
    assert pauses["expected"] == pauses["last_request"] + 40.0
    assert core.stats()["urgency"]["ticks_per_second"] == 1.0
    run.turn("x")
    pauses = core.stats(StatsQuery("wf-x"))["workflow"]["agents"]["x"]["context"]["pauses"]
    assert pauses["gap_source"] == "measured"


@pytest.mark.parametrize("seconds", [0.2, 3.0])
def test_a_pause_covers_the_ticks_its_request_ran_and_at_least_one_more(seconds):
    run = hinted_run()
    core, x = run.driver.cache.kvflow, run.agent("x")
    admitted = x.pauses.last_request
    for _ in range(3):
        run.turn("y")  # three ticks while x's next request runs (it finishes below)
    assert not core.expect_pause(x, seconds, admitted - 1)  # a request older than the latest: ignored
    core.expect_pause(x, seconds, admitted)
    ran = x.pauses.clock.now - admitted
    assert x.pauses.hinted == ran + max(1.0, seconds)
    assert x.pauses.expected == admitted + ran + max(1.0, seconds)
    core.workflows.check()


def test_a_forgotten_agent_takes_no_pause_hint():
    run = hinted_run()
    core, y = run.driver.cache.kvflow, run.agent("y")
    core.end_workflow("wf-y")
    assert not core.expect_pause(y, 5.0, y.pauses.last_request)


def test_a_scheduled_request_carries_its_pause_from_admission_to_release():
    run = hinted_run()
    core, x = run.driver.cache.kvflow, run.agent("x")
    prompt = run.prompts["x"]
    hint = WorkflowHint("wf-x", "x", len(SYSTEM), {"x": 0}, expected_pause_s=7.0)
    run.stamp += 1.0  # its stamp, a second after the previous request's: the rate stays 1 tick/s
    params = SamplingParams(max_new_tokens=1, custom_params={**transport(hint), TIME_KEY: run.stamp})
    req = Req("rx", "", list(prompt), params)  # the driver's tree holds lists
    run.driver.cache.match_prefix(MatchPrefixParams(key=RadixKey(prompt), req=req))  # admits it
    admitted = x.pauses.last_request
    assert core.clock() == run.stamp and x.pauses.hinted is None
    run.turn("y")  # one tick while it runs
    req.output_ids, req.finished_reason = [7], FINISH_LENGTH(length=1)
    core.request_released(req)
    assert x.pauses.hinted == 1 + 7.0 and x.pauses.expected == admitted + 8.0
    core.workflows.check()
