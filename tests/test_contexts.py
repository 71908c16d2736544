"""Agent contexts on the real cache (no server): the end of what a resuming agent's finished
request left in the tree is its, ranked like its fixed prompt, and nothing else is."""

from __future__ import annotations

from dataclasses import replace

from sglang.srt.mem_cache.base_prefix_cache import EvictParams
from sglang.srt.mem_cache.unified_cache.components import ComponentType

from kvflow.cache.urgency import REVIEW_FACTOR, smoothed_gap
from kvflow.harness.offline import CacheDriver
from kvflow.hints import WorkflowHint
from kvflow.stats_query import StatsQuery

SYSTEM = list(range(1, 21))


def fresh(start: int, length: int) -> list[int]:
    return list(range(start, start + length))


def hint(agent: str = "a", keep: bool = True) -> WorkflowHint:
    return WorkflowHint(f"wf-{agent}", agent, len(SYSTEM), {agent: 0}, keep)


def serve(driver: CacheDriver, prompt: list[int], output: list[int], **options) -> None:
    driver.serve(prompt + output, hint(**options), prompt_len=len(prompt))


def session(driver: CacheDriver, turns: int, agent: str = "a", base: int = 1000) -> list[list[int]]:
    """``turns`` turns of a session that extends its context; each turn's prompt + output."""
    contexts, prompt = [], SYSTEM + fresh(base, 10)
    for k in range(turns):
        output = fresh(base + 100 * (k + 1), 5)
        serve(driver, prompt, output, agent=agent)
        contexts.append(prompt + output)
        prompt = prompt + output + fresh(base + 100 * (k + 1) + 50, 8)  # the tool's result
    return contexts


def agent_of(driver: CacheDriver, name: str = "a"):
    return driver.cache.kvflow.workflows.get(f"wf-{name}").agents[name]


def test_the_context_moves_to_the_new_end_as_turns_extend_it():
    driver = CacheDriver(size=1000)
    contexts = session(driver, 2)
    agent = agent_of(driver)
    assert agent.resumes and agent.context is not None
    assert agent.context_tokens == len(contexts[1]) and agent.context.kvflow.contexts == [agent]
    assert agent.context.kvflow.next_use == agent.context_next_use
    first_end = agent.context.parent  # the previous turn's end, now on the path to the new one
    contexts = session(driver, 3)
    assert agent.context_tokens == len(contexts[2]) and agent.context is not first_end
    assert first_end.kvflow.contexts == [] and first_end.kvflow.next_use == agent.context_next_use
    driver.check_accounting()


def test_a_branch_the_next_turn_did_not_take_loses_ownership_and_goes_first():
    driver = CacheDriver(size=1000)
    other = session(driver, 2, agent="b", base=20_000)  # an owned context
    contexts = session(driver, 2)
    agent = agent_of(driver)
    dropped = agent.context
    prompt = contexts[1][:-5] + fresh(5000, 8)  # the client dropped the last output (reasoning)
    serve(driver, prompt, fresh(6000, 5))
    assert agent.context_tokens == len(prompt) + 5 and agent.context is not dropped
    assert dropped.kvflow.contexts == [] and dropped.kvflow.next_use is None
    driver.cache.evict(EvictParams(num_tokens=1))
    assert driver.cached_len(contexts[1]) == len(contexts[1]) - 5  # the dropped output went first
    assert driver.cached_len(other[1]) == len(other[1])  # before any owned context
    assert agent_of(driver, "b").context.kvflow.next_use is not None  # b's context is owned
    driver.check_accounting()


class Sessions:
    """Interleaved sessions on one driver: ``turn(name)`` serves each session's next turn."""

    def __init__(self, driver: CacheDriver) -> None:
        self.driver = driver
        self.prompts: dict[str, list[int]] = {}
        self.contexts: dict[str, list[int]] = {}
        self.next_token = 1000

    def _fresh(self, length: int) -> list[int]:
        self.next_token += length
        return fresh(self.next_token - length, length)

    def turn(self, name: str) -> None:
        prompt = self.prompts.get(name) or SYSTEM + self._fresh(10)
        output = self._fresh(5)
        serve(self.driver, prompt, output, agent=name)
        self.contexts[name] = prompt + output
        self.prompts[name] = prompt + output + self._fresh(8)

    def cached_tail(self, name: str) -> bool:
        """Whether the end of ``name``'s latest context is still in the tree."""
        context = self.contexts[name]
        return self.driver.cached_len(context) == len(context)


def test_a_context_is_ranked_by_when_its_agent_resumes():
    driver = CacheDriver(size=1000)
    run = Sessions(driver)
    for name in ["slow", *"fffff", "slow", *"fffff", "slow", *"ff"]:  # slow pauses 6 requests, f 1
        run.turn(name)
    slow, fast = agent_of(driver, "slow"), agent_of(driver, "f")
    assert slow.pauses.gap == 6 and fast.pauses.gap < 2
    assert fast.context_next_use < slow.context_next_use  # f is expected back first
    driver.cache.evict(EvictParams(num_tokens=1))
    assert not run.cached_tail("slow") and run.cached_tail("f")
    driver.check_accounting()


def test_a_context_nobody_resumes_falls_behind_live_ones():
    driver = CacheDriver(size=1000)
    run = Sessions(driver)
    for name in ["gone", "live", "gone", "live", "gone", *(["live"] * 12)]:  # gone stops, 1 apart
        run.turn(name)
    gone, live = agent_of(driver, "gone"), agent_of(driver, "live")
    assert gone.pauses.gap == 2 and live.pauses.gap < 1.5
    assert gone.pauses.stretch > 0  # reviewed: its pause is expected to go on
    assert live.context_next_use < gone.context_next_use
    driver.cache.evict(EvictParams(num_tokens=1))
    assert not run.cached_tail("gone") and run.cached_tail("live")
    driver.check_accounting()


def test_an_evicted_context_end_leaves_the_rest_of_the_context_owned():
    driver = CacheDriver(size=1000)
    contexts = session(driver, 3)
    agent = agent_of(driver)
    end, rest = agent.context, agent.context.parent
    driver.cache.evict(EvictParams(num_tokens=len(end.key)))  # the only leaf: the context's end
    assert driver.cached_len(contexts[2]) == len(contexts[2]) - len(end.key)
    assert agent.context is rest and agent.context_tokens == len(contexts[2]) - len(end.key)
    assert rest.kvflow.next_use == agent.context_next_use
    driver.check_accounting()


def test_an_eviction_needing_less_than_a_context_end_cuts_only_its_last_tokens():
    driver = CacheDriver(size=1000)
    contexts = session(driver, 3)
    agent = agent_of(driver)
    end = agent.context
    assert len(end.key) > 3
    evicted = driver.cache.evict(EvictParams(num_tokens=3)).num_tokens_evicted
    assert evicted == 3
    assert driver.cached_len(contexts[2]) == len(contexts[2]) - 3  # the rest of the end node stays
    assert agent.context is not None and agent.context_tokens == len(contexts[2]) - 3
    assert agent.context.kvflow.next_use == agent.context_next_use
    assert driver.cache.kvflow.stats()["contexts"]["shrunk"] == 1
    driver.check_accounting()


def test_an_allocation_driven_eviction_cuts_a_context_end_to_the_shortfall():
    driver = CacheDriver(size=200)
    contexts = session(driver, 3)
    agent = agent_of(driver)
    free = driver.allocator.available_size()
    held = driver.allocator.alloc(free)  # the pool is full: every further token is a shortfall
    driver.cache.evict_for_alloc(EvictParams(num_tokens=4))
    assert driver.allocator.available_size() == 4
    assert agent.context_tokens == len(contexts[2]) - 4
    assert driver.cache.tree_core.components_by_type[ComponentType.FULL].available_target is None
    driver.allocator.free(held)
    driver.check_accounting()


def test_fixed_prompts_and_unowned_nodes_are_evicted_whole():
    driver = CacheDriver(size=1000)
    driver.serve(fresh(9000, 40))  # no hint: stock LRU, first to go
    serve(driver, SYSTEM + fresh(1000, 10), fresh(1100, 5))  # the suffix after the fixed prompt
    assert driver.cache.evict(EvictParams(num_tokens=1)).num_tokens_evicted == 40
    assert driver.cache.evict(EvictParams(num_tokens=1)).num_tokens_evicted == 15  # un-owned suffix
    assert driver.cache.evict(EvictParams(num_tokens=1)).num_tokens_evicted == len(SYSTEM)
    driver.check_accounting()


def test_a_paged_context_end_is_cut_to_whole_pages():
    driver = CacheDriver(size=1000, page_size=4)
    prompt = SYSTEM + fresh(1000, 12)
    for k in range(3):
        output = fresh(1100 + 100 * k, 8)
        serve(driver, prompt, output)
        prompt = prompt + output + fresh(1150 + 100 * k, 8)
    agent = agent_of(driver)
    tokens = agent.context_tokens
    assert len(agent.context.key) >= 12
    assert driver.cache.evict(EvictParams(num_tokens=5)).num_tokens_evicted == 8
    assert agent.context_tokens == tokens - 8
    driver.check_accounting()


def test_an_agent_that_does_not_extend_its_prompts_owns_no_context():
    driver = CacheDriver(size=1000)
    for k in range(4):  # the paper's workloads: the fixed prompt and a new suffix each time
        serve(driver, SYSTEM + fresh(1000 + 100 * k, 10), fresh(5000 + 100 * k, 5))
    agent = agent_of(driver)
    assert agent.resumes is False and agent.context is None
    assert driver.cache.kvflow.contexts.prior == 0.0
    owned = [n for n in _nodes(driver) if n.kvflow.next_use is not None]
    assert owned == [agent.node]  # only the fixed prompt: suffixes and outputs stay un-owned
    driver.check_accounting()


def test_a_context_that_stops_being_extended_is_released_at_the_next_prompt():
    driver = CacheDriver(size=1000)
    session(driver, 2)
    agent = agent_of(driver)
    assert agent.context is not None
    serve(driver, SYSTEM + fresh(7000, 10), fresh(7100, 5))  # a new task: the context is not resumed
    assert agent.resumes is False and agent.context is None
    driver.check_accounting()


def test_the_last_turn_ending_the_workflow_and_a_flush_release_the_context():
    driver = CacheDriver(size=1000)
    contexts = session(driver, 2)
    agent = agent_of(driver)
    serve(driver, contexts[1] + fresh(8000, 8), fresh(8100, 5), keep=False)
    assert agent.context is None and agent.node is not None
    driver.check_accounting()

    session(driver, 2, agent="b", base=20_000)
    other = agent_of(driver, "b")
    assert other.context is not None
    assert driver.cache.kvflow.end_workflow("wf-b") and other.context is None
    driver.check_accounting()

    session(driver, 2, agent="c", base=40_000)
    third = agent_of(driver, "c")
    assert third.context is not None
    driver.cache.reset()  # /flush_cache: the tree cache is reset and the pool cleared
    driver.allocator.clear()
    assert third.context is None and third.node is None
    driver.check_accounting()


def test_the_protected_share_counts_contexts_after_fixed_prompts():
    driver = CacheDriver(size=200)
    core = driver.cache.kvflow
    core.config = replace(core.config, max_protected_fraction=0.2)  # 40 tokens per workflow
    contexts = session(driver, 2)
    agent = agent_of(driver)
    assert agent.context_tokens == len(contexts[1]) > 40
    assert agent.context_over_budget and not agent.over_budget
    assert agent.context.kvflow.next_use[0] == 1 and agent.node.kvflow.own_next_use[0] == 0
    core.config = replace(core.config, max_protected_fraction=1.0)
    session(driver, 3)
    assert not agent.context_over_budget
    driver.check_accounting()


def test_stats_show_each_agents_context_and_pauses_and_the_cache_wide_totals():
    driver = CacheDriver(size=1000)
    core, run = driver.cache.kvflow, Sessions(driver)
    for name in ["a", "b", "b", "a", "a", "c"]:  # a pauses 3 requests then 1, b 1; c comes once
        run.turn(name)

    def detail(name: str) -> dict:
        return core.stats(StatsQuery(f"wf-{name}"))["workflow"]["agents"][name]["context"]

    a, c, summary = detail("a"), detail("c"), core.stats()
    assert {k: a[k] for k in ("tokens", "on_device", "on_host", "resumes", "over_budget")} == {
        "tokens": len(run.contexts["a"]),
        "on_device": len(run.contexts["a"]),
        "on_host": 0,  # no host tier offline: HiCache's host copies are counted e2e
        "resumes": True,
        "over_budget": False,
    }
    gap = smoothed_gap(3.0, 1, True)
    assert a["next_use"] == (0, 5 + gap)
    assert a["pauses"] == {
        "observed": 2,
        "gap": gap,
        "gap_source": "measured",
        "stretch": 0.0,
        "last_request": 5,
        "paused_for": 1,
        "expected": 5 + gap,
        "review_at": 5 + REVIEW_FACTOR * gap,
    }
    prior = summary["urgency"]["prior_pause"]
    assert prior == smoothed_gap(smoothed_gap(1.0, 3, True), 1, True)  # b's pause, then a's two
    assert c["pauses"]["gap_source"] == "prior" and c["pauses"]["gap"] == prior
    assert c["pauses"]["observed"] == 0 and c["pauses"]["paused_for"] == 0
    assert c["tokens"] == len(run.contexts["c"])  # seen once: owned, as the cache's prior says
    assert summary["contexts"]["resume_prior"] == 1.0
    assert summary["contexts"]["agents"] == 3
    assert summary["contexts"]["tokens"] == sum(len(run.contexts[name]) for name in "abc")

    c_end = len(run.contexts["c"]) - len(SYSTEM)
    driver.cache.evict(EvictParams(num_tokens=c_end))  # c's end, due last: nothing past SYSTEM is left
    evicted = core.stats()["contexts"]
    assert evicted["released"]["evicted"] == 1 and detail("c")["tokens"] == 0
    assert (evicted["agents"], evicted["tokens"]) == (2, summary["contexts"]["tokens"] - c["tokens"])
    driver.cache.evict(EvictParams(num_tokens=1))  # a's or b's end: that context shrinks
    shrunk = core.stats()["contexts"]
    assert shrunk["shrunk"] == 1 and shrunk["agents"] == 2
    assert shrunk["tokens"] == detail("a")["tokens"] + detail("b")["tokens"] < evicted["tokens"]
    assert all(detail(name)["on_device"] == detail(name)["tokens"] for name in "ab")

    serve(driver, run.prompts["a"], fresh(9000, 5), agent="a", keep=False)  # a's last turn
    serve(driver, SYSTEM + fresh(9100, 10), fresh(9200, 5), agent="b")  # b starts a new task
    run.turn("d")
    assert detail("d")["tokens"] == len(run.contexts["d"])
    core.end_workflow("wf-d")
    released = core.stats()["contexts"]
    assert released["released"] == {"not_resumed": 1, "last_turn": 1, "forgotten": 1, "evicted": 1}
    assert (released["agents"], released["tokens"]) == (0, 0) and detail("a")["tokens"] == 0
    driver.check_accounting()


def _nodes(driver: CacheDriver) -> list:
    nodes, stack = [], list(driver.cache.tree_core.root_node.children.values())
    while stack:
        node = stack.pop()
        nodes.append(node)
        stack.extend(node.children.values())
    return nodes
