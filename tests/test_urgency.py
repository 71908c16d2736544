"""Urgency in time on the logical clock (kvflow.cache.urgency), alone and through the real cache."""

from __future__ import annotations

import pytest

from kvflow.cache.pauses import AgentPauses
from kvflow.cache.urgency import REVIEW_FACTOR, LogicalClock, WorkflowPace
from kvflow.cache.workflow_table import WorkflowTable
from kvflow.harness.offline import CacheDriver
from kvflow.hints import WorkflowHint


def test_a_pace_is_the_smoothed_clock_advance_between_its_steps():
    clock = LogicalClock()
    pace, other = WorkflowPace(clock), WorkflowPace(clock)
    pace.step()  # clock 1
    assert not pace.measured and pace.interval == 1.0  # the prior before anything was measured
    for _ in range(3):
        other.step()
    pace.step()  # clock 5: four ticks since its last step
    assert pace.measured and pace.interval == 4.0
    other.step()
    other.step()
    pace.step()  # clock 8: three ticks
    assert pace.interval == 3.5
    assert pace.expected_at(2) == 8 + 2 * 3.5


def test_an_unmeasured_workflow_keeps_the_prior_of_its_own_step():
    clock = LogicalClock()
    measured = WorkflowPace(clock)
    measured.step()
    new = WorkflowPace(clock)
    for _ in range(5):
        measured.step()  # gaps of 1 and then 2: the prior moves
    new.step()
    prior_then = clock.prior_interval
    measured.step()
    measured.step()
    assert clock.prior_interval != prior_then and new.interval == prior_then


def test_a_stalled_workflow_is_expected_later_at_every_review_and_a_new_step_resets_it():
    clock = LogicalClock()
    stalled, live = WorkflowPace(clock), WorkflowPace(clock)
    stalled.step()
    stalled.step()  # interval 1
    before = stalled.expected_at(1)
    while clock.now < stalled.review_at:
        live.step()
    stalled.review()
    assert stalled.stretch == REVIEW_FACTOR * (clock.now - stalled.last_step)
    assert stalled.expected_at(1) > clock.now > before  # as long again as it already waited
    assert stalled.review_at > clock.now
    stalled.step()
    assert stalled.stretch == 0.0


def test_hop_urgency_orders_by_steps_alone():
    clock = LogicalClock("hops")
    pace = WorkflowPace(clock)
    pace.step()
    pace.step()
    assert pace.expected_at(3) == 3
    with pytest.raises(ValueError, match="time, hops"):
        LogicalClock("wall")


def _serve(driver: CacheDriver, workflow: str, agent: int, steps: dict[str, int]) -> None:
    prompt = [10_000 * (1 + sum(map(ord, workflow))) + 100 * agent + j for j in range(20)]
    driver.serve(prompt, WorkflowHint(workflow, f"a{agent}", 20, steps))


def test_through_the_cache_a_workflow_that_stops_falls_behind_the_live_ones():
    driver = CacheDriver(size=400)
    cycle = {"a0": 0, "a1": 1}
    for turn in range(4):
        for workflow in ("done", "live"):
            running = turn % 2
            _serve(driver, workflow, running, {f"a{j}": (j - running) % 2 for j in range(2)})
    done = driver.cache.kvflow.workflows.get("done").agents
    live = driver.cache.kvflow.workflows.get("live").agents
    assert min(a.next_use for a in done.values()) < max(a.next_use for a in live.values())
    for turn in range(4, 40):  # only "live" goes on; "done" is reviewed as it stalls
        running = turn % 2
        _serve(driver, "live", running, {f"a{j}": (j - running) % 2 for j in range(2)})
    assert min(a.next_use for a in done.values()) > max(a.next_use for a in live.values())
    assert set(cycle) == set(done)  # reviews move them, they do not forget (that is the TTL's job)


def test_two_caches_fed_the_same_hints_order_alike_whatever_their_wall_clocks():
    drivers = [CacheDriver(size=200), CacheDriver(size=200)]
    seconds = [[0.0], [1e6]]
    for driver, now in zip(drivers, seconds, strict=True):
        table = driver.cache.kvflow.workflows
        driver.cache.kvflow.workflows = WorkflowTable(
            3600, 64, clock=lambda now=now: now[0], max_agents=table.max_agents
        )
    for turn in range(30):
        for driver, now in zip(drivers, seconds, strict=True):
            now[0] += 0.001 if driver is drivers[0] else 7.5  # skewed, uneven wall time
            _serve(driver, f"w{turn % 3}", turn % 4, {f"a{j}": (j - turn) % 4 for j in range(4)})
    next_uses = [
        {
            (w.workflow_id, a.agent_id): a.next_use
            for w in d.cache.kvflow.workflows.workflows()
            for a in w.agents.values()
        }
        for d in drivers
    ]
    assert next_uses[0] == next_uses[1]
    assert drivers[0].allocator.freed == drivers[1].allocator.freed


def test_the_review_queue_stays_proportional_to_the_tracked_workflows():
    now = [0.0]
    table = WorkflowTable(ttl=10.0, max_workflows=1000, clock=lambda: now[0])
    for i in range(5000):  # 100 live workflows at a time, each hinted 5 times, then left to expire
        now[0] += 0.01
        table.observe(WorkflowHint(f"w{i // 500}-{i % 100}", "a", 4, {"a": 0}), [1, 2, 3, 4])
        assert len(table._reviews) <= 2 * len(table) + 64  # compacted as it grows
        table.expire()
    assert len(table) < 250  # the expired ones are gone, and so are their reviews at the next growth


def test_a_hint_moves_the_agents_it_names_and_leaves_the_others_where_they_were():
    table = WorkflowTable(ttl=3600, max_workflows=8)
    table.observe(WorkflowHint("w", "a", 4, {"b": 1, "c": 3}), [1, 2, 3, 4])
    table.observe(WorkflowHint("other", "x", 4, {}), [5, 6, 7, 8])
    workflow = table.get("w")
    b, c = workflow.agents["b"], workflow.agents["c"]
    c_before = c.next_use
    _, changed = table.observe(WorkflowHint("w", "b", 4, {"a": 2}), [1, 2, 3, 4])
    # b (running) and a (restated) are moved to the new step; c was not named: it stays
    assert set(changed) == {b, workflow.agents["a"]}
    assert c.next_use == c_before == (0, 1 + 3 * 1.0)
    assert b.next_use == (0, workflow.pace.last_step) and workflow.pace.last_step == 3
    _, changed = table.observe(WorkflowHint("w", "a", 4, {"c": 3}), [1, 2, 3, 4])
    # restating the same steps moves them too: three hops are now counted from the latest step
    assert c in changed and c.next_use == (0, workflow.pace.expected_at(3)) and c.next_use > c_before


def test_an_agent_expects_its_next_request_one_smoothed_gap_after_its_latest():
    clock = LogicalClock()
    agent = AgentPauses(clock)
    clock.tick()
    agent.request()
    assert (agent.observed, agent.expected) == (0, 2.0)  # unmeasured: the prior gap, 1
    for _ in range(4):
        clock.tick()
    agent.request()
    assert (agent.gap, agent.observed, agent.expected) == (4.0, 1, 9.0)
    assert clock.prior_pause == 4.0  # the first measured pause replaces the prior
    clock.tick()
    clock.tick()
    agent.request()
    assert agent.gap == pytest.approx(8**0.5)  # halfway from 4 toward 2 in log space
    assert AgentPauses(clock).estimate == pytest.approx(8**0.5)  # a new agent takes the prior


def test_a_pause_past_its_review_is_expected_to_last_as_long_again_and_more():
    clock = LogicalClock()
    agent = AgentPauses(clock)
    for _ in range(2):
        clock.tick()
        agent.request()
    assert (agent.expected, agent.review_at) == (3.0, 4.0)
    while clock.now < agent.review_at:
        clock.tick()
    agent.review()
    assert agent.stretch == 4.0 and agent.expected == 6.0 and agent.review_at == 6.0
    clock.tick()
    agent.request()  # it resumed: the stretch is gone and the long pause measured
    assert agent.stretch == 0.0 and agent.gap == pytest.approx(3**0.5)  # halfway to 3 in log space
