"""The prefetcher's rules on SGLang's real tree (room making, holding), without a server."""

from __future__ import annotations

from array import array
from types import SimpleNamespace

from kvflow.patches.prefetch_hold import _hold_prefetching, running_growth, waiting_demand
from sglang.srt.managers.schedule_batch import Req
from sglang.srt.managers.scheduler_components.new_token_ratio_tracker import NewTokenRatioTracker
from sglang.srt.mem_cache.base_prefix_cache import EvictParams
from sglang.srt.mem_cache.radix_cache import RadixKey
from sglang.srt.sampling.sampling_params import SamplingParams

from kvflow.cache.prefetch import Prefetcher, PrefetchRecord
from kvflow.cache.request_state import request_state
from kvflow.harness.offline import CacheDriver
from kvflow.hints import WorkflowHint


def prompt(index: int, length: int = 20) -> list[int]:
    return [1000 * (index + 1) + j for j in range(length)]


def request(tokens: list[int], max_new_tokens: int = 1, ignore_eos: bool = False) -> Req:
    """A real SGLang request for ``tokens`` (no hint)."""
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=ignore_eos)
    return Req(f"r{tokens[0]}", "", array("i", tokens), params)


def fill(driver: CacheDriver, steps: dict[str, int]) -> dict:
    for i, agent in enumerate(steps):
        driver.serve(prompt(i), WorkflowHint("wf", agent, 20, {}))
    driver.cache.kvflow.observe_hint(WorkflowHint("wf", "x", None, steps), [])
    return driver.cache.kvflow.workflows.workflows()[0].agents


def test_making_room_never_evicts_an_agent_that_runs_sooner():
    driver = CacheDriver(size=80)
    agents = fill(driver, {"near": 1, "mid": 2, "far": 5, "farther": 6})
    prefetcher = Prefetcher(driver.cache, steps_limit=2)
    # Room for a prefetch of an agent at step 2: only 'far' and 'farther' may go.
    assert prefetcher._make_room(40, next_use=agents["mid"].next_use)
    assert driver.cached_len(prompt(0)) == 20 and driver.cached_len(prompt(1)) == 20
    assert agents["far"].node is None and agents["farther"].node is None
    # Nothing farther than step 1 is left but 'mid'; more room than that is refused, nothing evicted.
    assert not prefetcher._make_room(80, next_use=agents["near"].next_use)
    assert driver.cached_len(prompt(0)) == 20 and driver.cached_len(prompt(1)) == 20
    driver.check_accounting()


def test_unowned_nodes_make_room_first():
    driver = CacheDriver(size=60)
    agents = fill(driver, {"near": 1, "far": 4})
    driver.serve(prompt(7))  # un-hinted traffic
    prefetcher = Prefetcher(driver.cache, steps_limit=1)
    assert prefetcher._make_room(20, next_use=agents["near"].next_use)
    assert driver.cached_len(prompt(7)) == 0
    assert agents["far"].node is not None and agents["near"].node is not None


def test_requests_through_a_pending_load_are_held_and_put_back_in_order_even_when_a_batch_forms():
    driver = CacheDriver(size=80)
    agents = fill(driver, {"a": 1, "b": 2})
    prefetcher = Prefetcher(driver.cache)
    node = agents["a"].node
    prefetcher.records[id(agents["a"])] = PrefetchRecord(agents["a"], node, [node], 20)
    assert prefetcher.blocks(RadixKey(prompt(0) + [5, 5]))
    assert not prefetcher.blocks(RadixKey(prompt(1) + [5, 5]))

    driver.cache.kvflow.prefetcher = prefetcher
    # SGLang's scheduler lends the hook only its tree cache, waiting queue and new-token ratio.
    scheduler = SimpleNamespace(
        tree_cache=driver.cache,
        waiting_queue=[request(prompt(1)), request(prompt(0)), request(prompt(2))],
        new_token_ratio_tracker=NewTokenRatioTracker(init=0.7, min=0.1, decay=0.001, current=0.7),
    )
    queue = scheduler.waiting_queue
    seen = []
    _hold_prefetching(lambda s: seen.extend(r.origin_input_ids[0] for r in s.waiting_queue), scheduler)
    assert seen == [prompt(1)[0], prompt(2)[0]]  # the held request was not offered
    assert scheduler.waiting_queue is queue and [r.origin_input_ids[0] for r in queue] == [
        prompt(0)[0],
        prompt(1)[0],
        prompt(2)[0],
    ]

    def dispatch_first(s):
        # What SGLang does when a batch forms: a new list without the dispatched requests.
        s.waiting_queue = s.waiting_queue[1:]

    _hold_prefetching(dispatch_first, scheduler)
    assert [r.origin_input_ids[0] for r in scheduler.waiting_queue] == [prompt(0)[0], prompt(2)[0]]
    prefetcher.records[id(agents["a"])].done = True
    assert not prefetcher.blocks(RadixKey(prompt(0)))


def test_stale_and_wasted_prefetches_are_dropped_and_counted_timely_and_late_classified():
    driver = CacheDriver(size=80)
    agents = fill(driver, {"a": 1, "b": 1, "c": 1})
    prefetcher = Prefetcher(driver.cache, steps_limit=1)
    for name in "abc":
        agent = agents[name]
        prefetcher.records[id(agent)] = PrefetchRecord(agent, agent.node, [agent.node], 20, done=True)
    agents["b"].steps = 4  # the workflow moved on before b ran: stale
    prefetcher.on_admit(agents["a"])  # a's request arrived after its load finished: timely
    prefetcher._reap()
    assert prefetcher.counters.timely == 1 and prefetcher.counters.dropped_stale == 1
    assert set(prefetcher.records) == {id(agents["c"])}
    driver.cache.evict(EvictParams(num_tokens=80))  # c's prompt evicted before use: wasted
    prefetcher._reap()
    assert prefetcher.counters.wasted == 1 and not prefetcher.records


def test_a_load_in_flight_survives_a_step_change_and_a_request_arriving_first_is_late():
    driver = CacheDriver(size=80)
    agents = fill(driver, {"a": 1})
    prefetcher = Prefetcher(driver.cache, steps_limit=1)
    agent = agents["a"]
    prefetcher.records[id(agent)] = PrefetchRecord(agent, agent.node, [agent.node], 20)
    # Stand-in for a host->device copy still in flight (on CPU the copies are synchronous).
    driver.cache.ongoing_load_back[agent.node.id] = object()
    agent.steps = 9
    prefetcher._reap()
    assert not prefetcher.records[id(agent)].done  # never cancelled
    prefetcher.on_admit(agent)
    assert prefetcher.counters.late == 1
    del driver.cache.ongoing_load_back[agent.node.id]
    prefetcher._reap()
    assert prefetcher.records[id(agent)].done and prefetcher.counters.completed == 1


def test_a_held_request_is_counted_once_and_its_prefetch_is_late_even_if_done_when_matched():
    driver = CacheDriver(size=80)
    agents = fill(driver, {"a": 1, "b": 2})
    cache = driver.cache
    cache.kvflow.prefetcher = prefetcher = Prefetcher(cache)
    agent = agents["a"]
    prefetcher.records[id(agent)] = PrefetchRecord(agent, agent.node, [agent.node], 20)

    req, other = request(prompt(0) + [5]), request(prompt(1) + [5])
    assert cache.kvflow.blocks(req) and cache.kvflow.blocks(req)  # two scheduling passes
    assert not cache.kvflow.blocks(other)
    assert prefetcher.counters.held == 1 and request_state(req).held and not request_state(other).held
    prefetcher.records[id(agent)].done = True  # acknowledged: the request is matched only now
    assert not cache.kvflow.blocks(req)
    prefetcher.on_admit(agent, held=True)
    assert prefetcher.counters.late == 1 and prefetcher.counters.timely == 0 and not prefetcher.records


def test_only_agents_due_next_are_looked_at_each_iteration():
    driver = CacheDriver(size=200)
    agents = fill(driver, {"a": 1, "b": 2, "c": 0})
    prefetcher = driver.cache.kvflow.prefetcher = Prefetcher(driver.cache, steps_limit=1)
    assert set(prefetcher.due) == {id(agents["a"])}  # seeded from the hints seen before
    driver.cache.kvflow.observe_hint(WorkflowHint("wf", "x", None, {"a": 3, "b": 1}), [])
    prefetcher._due_nearest_first()
    assert set(prefetcher.due) == {id(agents["b"])}
    driver.cache.kvflow.end_workflow("wf")
    prefetcher._due_nearest_first()
    assert not prefetcher.due


def test_a_prefetch_also_leaves_room_for_the_requests_of_the_due_agents():
    driver = CacheDriver(size=100)
    agents = fill(driver, {"near": 1, "far": 5})  # 40 tokens cached, 60 free
    prefetcher = Prefetcher(driver.cache, steps_limit=1)
    prefetcher.reserved_tokens = 10
    assert not prefetcher._make_room(20, next_use=agents["near"].next_use, ahead=51)  # 60 + 20 < 20 + 10 + 51
    assert agents["far"].node is not None  # refused: nothing evicted
    assert prefetcher._make_room(20, next_use=agents["near"].next_use, ahead=50)


def test_an_agents_next_request_is_expected_to_take_what_its_finished_ones_took():
    agent = fill(CacheDriver(size=100), {"a": 1})["a"]
    assert agent.request_tokens is None
    agent.request_finished(100)  # the first one is taken as it is
    agent.request_finished(20)
    assert agent.request_tokens == 60.0  # then smoothed like a workflow's pace


def test_the_running_requests_growth_is_estimated_as_sglang_reserves_it():
    running = [request(prompt(0), max_new_tokens=100), request(prompt(1), max_new_tokens=40, ignore_eos=True)]
    running[0].output_ids = [1] * 20  # 80 left, at the ratio; the fixed-length one counts in full
    assert running_growth(SimpleNamespace(reqs=running), 0.5) == 80 * 0.5 + 40
    assert running_growth(None, 0.5) == 0


def test_a_prefetch_leaves_room_for_what_the_running_requests_will_still_decode():
    driver = CacheDriver(size=100)
    agents = fill(driver, {"near": 1, "far": 5})  # 40 tokens cached, 60 free
    prefetcher = Prefetcher(driver.cache, steps_limit=1)
    prefetcher.reserved_tokens = 50
    assert prefetcher._make_room(20, next_use=agents["near"].next_use)  # 60 free + 20 farther >= 20 + 50
    assert agents["far"].node is not None  # the free slots were enough: nothing evicted yet
    prefetcher.reserved_tokens = 70
    assert not prefetcher._make_room(20, next_use=agents["near"].next_use)  # 60 + 20 < 20 + 70: it waits
    assert driver.cached_len(prompt(1)) == 20


def test_the_waiting_requests_demand_is_their_unmatched_prompt_and_their_output():
    waiting = [request(prompt(0), max_new_tokens=10), request(prompt(1), max_new_tokens=4, ignore_eos=True)]
    waiting[0].prefix_len = 15  # matched on the device at a previous scheduling pass
    assert waiting_demand(waiting, 0.5) == (20 - 15) + 10 * 0.5 + 20 + 4
    assert waiting_demand([], 0.5) == 0
