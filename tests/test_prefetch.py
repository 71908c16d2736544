"""The prefetcher's rules on SGLang's real tree (room making, holding), without a server; contexts
on SGLang's real host tier (HiCache on CPU, as the ``cpu_host_tier`` patch gives a server)."""

from __future__ import annotations

from array import array
from types import SimpleNamespace

import pytest
import torch
from kvflow.patches import cpu_host_tier
from kvflow.patches.prefetch_hold import _hold_prefetching, running_growth, waiting_demand
from sglang.srt.managers.schedule_batch import Req
from sglang.srt.managers.scheduler_components.new_token_ratio_tracker import NewTokenRatioTracker
from sglang.srt.mem_cache.base_prefix_cache import EvictParams
from sglang.srt.mem_cache.radix_cache import RadixKey
from sglang.srt.runtime_context import get_context
from sglang.srt.sampling.sampling_params import SamplingParams

from kvflow.cache.prefetch import Prefetcher, PrefetchRecord
from kvflow.cache.request_state import request_state
from kvflow.cpu_kernels import STANDIN_PATH
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


# --- contexts of paused agents, on a real host tier ---------------------------------------------------

FIXED = 20  # every chat agent's fixed prompt


def _around(monkeypatch, owner, name: str, hook) -> None:
    original = getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *args, **kwargs: hook(original, *args, **kwargs))


@pytest.fixture
def host_tier(monkeypatch):
    """What ``CacheDriver(host_tier=True)`` needs: the server args a HiCache server reads (direct
    copies, a host pool 4x the device's) and the ``cpu_host_tier`` hooks (SGLang's own code on CUDA)."""
    if not torch.cuda.is_available():
        monkeypatch.syspath_prepend(STANDIN_PATH)  # the sgl_kernel stand-in, as the launcher does
    from sglang.srt.mem_cache.l2_transfer import L2TransferEngine
    from sglang.srt.mem_cache.pool_host import common
    from sglang.srt.mem_cache.pool_host.base import host_memory_budget_scope
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost

    _around(monkeypatch, common, "_cuda_host_register", cpu_host_tier._skip_host_register_without_cuda)
    for name in ("backup_from_device_all_layer", "load_to_device_per_layer"):
        _around(monkeypatch, MHATokenToKVPoolHost, name, getattr(cpu_host_tier, f"_{name}"))
    init = L2TransferEngine.__init__

    def init_then_synchronize(engine, *args, **kwargs):
        init(engine, *args, **kwargs)
        cpu_host_tier._add_stream_synchronize(None, engine, *args, **kwargs)

    monkeypatch.setattr(L2TransferEngine, "__init__", init_then_synchronize)
    override = get_context().override_server_args(
        enable_hierarchical_cache=True, hicache_ratio=4.0, hicache_io_backend="direct",
        hicache_mem_layout="layer_first",
    )  # fmt: skip
    override.install()
    # The pools are a few KiB: booked against a fixed budget, not this shared machine's free memory.
    with host_memory_budget_scope(1 << 30):
        yield
    override.restore()


def iteration(driver: CacheDriver) -> None:
    """One scheduler iteration's HiCache step: acknowledgements reaped, then the prefetcher runs."""
    driver.cache.check_hicache_events()


def tick(driver: CacheDriver, times: int = 1) -> None:
    """Hinted requests of another workflow, each one tick of the logical clock (no KV)."""
    for _ in range(times):
        driver.cache.kvflow.observe_hint(WorkflowHint("clock", "x", None, {}), [])
        iteration(driver)


def chat_turn(driver: CacheDriver, workflow: str, prompt_tokens: list[int], output: int = 10) -> list[int]:
    """One finished turn of ``workflow``'s chat agent; returns its prompt + output (what the tree keeps)."""
    tokens = prompt_tokens + [500_000 + 1000 * len(prompt_tokens) + j for j in range(output)]
    driver.serve(tokens, WorkflowHint(workflow, "agent", FIXED, {}), prompt_len=len(prompt_tokens))
    iteration(driver)
    return tokens


def paused_chat(driver: CacheDriver, workflow: str, index: int, gap: int) -> tuple[list[int], object]:
    """Two turns ``gap`` ticks apart (the second resumes the first): the agent owns a 60-token context,
    expected back ``gap`` ticks after its second turn."""
    history = chat_turn(driver, workflow, prompt(index, 30))
    tick(driver, gap - 1)
    history = chat_turn(driver, workflow, history + prompt(index + 50, 10))
    agent = driver.cache.kvflow.workflows.get(workflow).agents["agent"]
    assert agent.context is not None and agent.context_tokens == len(history) == 60
    assert not agent.context_over_budget  # within its workflow's share (half of the pool)
    return history, agent


def to_host(driver: CacheDriver) -> None:
    """Demote everything on the device to the host tier (all of it was backed up on insert). A
    one-agent workflow's agent is always next, so the iteration prefetches its fixed prompt back."""
    driver.cache.evict(EvictParams(num_tokens=driver.size))
    iteration(driver)
    iteration(driver)


def test_a_paused_context_on_host_comes_back_when_due_not_before_and_its_turn_hits_it(host_tier):
    driver = CacheDriver(size=160, host_tier=True)
    prefetcher = driver.cache.kvflow.prefetcher
    history, agent = paused_chat(driver, "chat", 0, gap=4)  # turns at ticks 1 and 5: expected at 9
    assert agent.pauses.expected == 9
    to_host(driver)
    assert agent.context.evicted and agent.context.backuped and not agent.node.evicted

    tick(driver, 2)  # now 7: expected 2 ticks ahead, past the horizon of 1 (--kvflow-prefetch-steps)
    assert agent.context.evicted and prefetcher.counters.context_issued == 0
    assert not prefetcher.due_contexts and agent in prefetcher.context_entries
    tick(driver)  # now 8: its next request is expected within one tick; the clock alone made it due
    assert prefetcher.counters.context_issued == 1 and not agent.context.evicted
    iteration(driver)  # acknowledged
    assert prefetcher.counters.context_tokens_loaded == 40  # its path below the fixed prompt
    assert not prefetcher.loading
    driver.check_accounting()

    hit = driver.serve(
        history + prompt(60, 10) + [1, 2], WorkflowHint("chat", "agent", FIXED, {}), prompt_len=72
    )
    assert hit == 60  # the whole context was on the device when its turn came
    counters = prefetcher.counters
    assert (counters.context_timely, counters.context_late, counters.context_wasted) == (1, 0, 0)
    assert counters.issued == 1 and counters.tokens_loaded == FIXED  # fixed-prompt counters apart
    iteration(driver)
    assert not prefetcher.due_contexts and not prefetcher.context_records  # resumed: queued anew
    assert prefetcher.context_entries[agent][0] == agent.pauses.expected > 9
    driver.check_accounting()


def test_a_due_context_never_evicts_kv_needed_sooner_and_waits(host_tier):
    driver = CacheDriver(size=160, host_tier=True)
    prefetcher = driver.cache.kvflow.prefetcher
    _, far = paused_chat(driver, "far", 0, gap=8)  # ticks 1 and 9: expected at 17
    to_host(driver)
    tick(driver, 2)
    _, near = paused_chat(driver, "near", 1, gap=2)  # ticks 12 and 14: expected at 16
    driver.serve(prompt(7, 60))  # un-hinted traffic; 20 slots left free
    prefetcher.reserved_tokens = 50  # what the scheduler's requests will still take
    tick(driver, 2)  # now 16: the far context is due, the near one is nearer still
    assert far.context_next_use > near.context_next_use
    iteration(driver)
    # Its 40 tokens and the 50 reserved need 70 more than the free slots; the un-owned KV holds 60
    # and only the near context could give the rest, so it waits and nothing is evicted.
    assert far.context.evicted and prefetcher.counters.context_issued == 0
    assert prefetcher.counters.context_skipped_no_room == 1  # counted once while it waits
    assert not near.context.evicted and driver.cached_len(prompt(1, 30)) == 30
    assert driver.cached_len(prompt(7, 60)) == 60
    driver.check_accounting()

    prefetcher.reserved_tokens = 40  # the un-owned KV is enough: evicted, not the near context
    iteration(driver)
    assert not far.context.evicted and prefetcher.counters.context_issued == 1
    assert driver.cached_len(prompt(7, 60)) == 0 and driver.cached_len(prompt(1, 30)) == 30
    assert prefetcher.counters.context_skipped_no_room == 1
    driver.check_accounting()


def test_a_loaded_context_its_agent_does_not_resume_is_wasted(host_tier):
    driver = CacheDriver(size=160, host_tier=True)
    prefetcher = driver.cache.kvflow.prefetcher
    paused_chat(driver, "chat", 0, gap=4)
    to_host(driver)
    tick(driver, 3)
    iteration(driver)
    assert prefetcher.counters.context_issued == 1 and prefetcher.counters.context_tokens_loaded == 40
    chat_turn(driver, "chat", prompt(0, 30) + prompt(90, 5))  # a new conversation: the old one is released
    counters = prefetcher.counters
    assert (counters.context_timely, counters.context_late, counters.context_wasted) == (0, 0, 1)
    assert not prefetcher.context_records
    driver.check_accounting()
