"""Benchmark workloads: deterministic multi-agent request sequences as token ids.

A :class:`Workload` is a set of workflows that run concurrently; each workflow
is a list of :class:`Call` s that run one after another. Prompts are token ids
drawn from ``[0, vocab)`` with fixed seeds, so no tokenizer or download is
needed. Every call carries the kvflow hint (stock servers ignore it). Calls
marked ``warmup`` prime each agent's fixed prompt (the paper's method) and are
left out of the measurements.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from kvflow.graph import AgentStepGraph

DEFAULT_VOCAB = 256  # the embedded model's byte tokens; use the model's vocab on GPU


@dataclass(frozen=True)
class Call:
    workflow_id: str
    agent_id: str
    input_ids: list[int]
    fixed_len: int
    steps: dict[str, int]
    output_len: int
    warmup: bool = False

    @property
    def varying_len(self) -> int:
        """Tokens this call writes beyond its fixed prompt: dynamic suffix plus output."""
        return len(self.input_ids) - self.fixed_len + self.output_len

    def hint(self) -> dict:
        return {
            "workflow_id": self.workflow_id,
            "agent_id": self.agent_id,
            "fixed_prefix_len": self.fixed_len,
            "steps_to_execution": self.steps,
        }


@dataclass
class Workload:
    name: str
    workflows: list[list[Call]]
    params: dict = field(default_factory=dict)

    def interleaved(self) -> list[Call]:
        """All calls in one sequence, workflows round-robin (the order a replay uses)."""
        out, cursors = [], [0] * len(self.workflows)
        while any(c < len(w) for c, w in zip(cursors, self.workflows, strict=True)):
            for i, workflow in enumerate(self.workflows):
                if cursors[i] < len(workflow):
                    out.append(workflow[cursors[i]])
                    cursors[i] += 1
        return out

    def largest_varying(self) -> int:
        """The most tokens any call writes beyond its fixed prompt."""
        return max(c.varying_len for w in self.workflows for c in w)

    def fixed_tokens(self) -> int:
        """Distinct fixed-prompt tokens, shared prefixes counted once (a pool this big misses nothing)."""
        trie: dict = {}
        size = 0
        prompts = {tuple(c.input_ids[: c.fixed_len]) for w in self.workflows for c in w}
        for prompt in prompts:
            node = trie
            for token in prompt:
                if token not in node:
                    node[token] = {}
                    size += 1
                node = node[token]
        return size


def _tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(vocab) for _ in range(n)]


def _cycle_steps(agents: list[str], running: int) -> dict[str, int]:
    return {a: (j - running) % len(agents) for j, a in enumerate(agents)}


def _sequential_workflow(
    workflow_id: str,
    fixed: list[list[int]],
    rounds: int,
    dynamic_len: int,
    output_len: int,
    vocab: int,
    rng: random.Random,
    warmup: bool = True,
) -> list[Call]:
    agents = [f"agent{i}" for i in range(len(fixed))]
    calls = []
    if warmup:
        for i, prompt in enumerate(fixed):
            calls.append(
                Call(workflow_id, agents[i], list(prompt), len(prompt), _cycle_steps(agents, i), 1, True)
            )
    for _ in range(rounds):
        for i, prompt in enumerate(fixed):
            prompt_ids = list(prompt) + _tokens(rng, dynamic_len, vocab)
            calls.append(
                Call(workflow_id, agents[i], prompt_ids, len(prompt), _cycle_steps(agents, i), output_len)
            )
    return calls


def sequential(
    fixed_len: int = 1024,
    agents: int = 10,
    dynamic_len: int = 32,
    output_len: int = 32,
    rounds: int = 3,
    vocab: int = DEFAULT_VOCAB,
    seed: int = 0,
) -> Workload:
    """One sequential workflow of ``agents`` agents (the paper's F/32/32 setting)."""
    rng = random.Random(seed)
    fixed = [_tokens(rng, fixed_len, vocab) for _ in range(agents)]
    calls = _sequential_workflow("seq", fixed, rounds, dynamic_len, output_len, vocab, rng)
    return Workload(
        f"sequential-{fixed_len}", [calls], dict(fixed_len=fixed_len, agents=agents, rounds=rounds)
    )


def branching(
    fixed_len: int = 1024,
    stages: int = 5,
    dynamic_len: int = 32,
    output_len: int = 32,
    rounds: int = 3,
    vocab: int = DEFAULT_VOCAB,
    seed: int = 0,
) -> Workload:
    """Each stage picks one of two agents; the two share the first half of their fixed prompt."""
    rng = random.Random(seed)
    shared = [_tokens(rng, fixed_len // 2, vocab) for _ in range(stages)]
    fixed = {
        f"s{s}{b}": shared[s] + _tokens(rng, fixed_len - fixed_len // 2, vocab)
        for s in range(stages)
        for b in "ab"
    }

    def steps(chosen: str) -> dict[str, int]:
        # Both candidates of a later stage share a value (which branch runs is not known yet);
        # the branch not taken at this stage comes back no sooner than a full cycle.
        stage = int(chosen[1])
        view = {f"s{s}{b}": (s - stage) % stages for s in range(stages) for b in "ab"}
        view[f"s{stage}{'b' if chosen[2] == 'a' else 'a'}"] = stages
        return view

    calls = [Call("branch", a, list(p), len(p), steps(a), 1, True) for a, p in fixed.items()]
    for _ in range(rounds):
        for s in range(stages):
            agent = f"s{s}{rng.choice('ab')}"
            prompt = fixed[agent] + _tokens(rng, dynamic_len, vocab)
            calls.append(Call("branch", agent, prompt, fixed_len, steps(agent), output_len))
    return Workload(
        f"branching-{fixed_len}", [calls], dict(fixed_len=fixed_len, stages=stages, rounds=rounds)
    )


def concurrent(
    workflows: int = 16,
    fixed_len: int = 1024,
    agents: int = 4,
    dynamic_len: int = 256,
    output_len: int = 256,
    rounds: int = 2,
    vocab: int = DEFAULT_VOCAB,
    seed: int = 0,
) -> Workload:
    """Many independent sequential workflows running at once (the paper's 512/1024 x 16-64 setting)."""
    rng = random.Random(seed)
    flows = []
    for w in range(workflows):
        fixed = [_tokens(rng, fixed_len, vocab) for _ in range(agents)]
        flows.append(_sequential_workflow(f"wf{w}", fixed, rounds, dynamic_len, output_len, vocab, rng))
    return Workload(
        f"concurrent-{workflows}x{fixed_len}",
        flows,
        dict(workflows=workflows, fixed_len=fixed_len, agents=agents),
    )


def realistic(
    workflows: int = 4,
    system_len: int = 64,
    rounds: int = 4,
    dynamic_len: int = 48,
    output_len: int = 32,
    vocab: int = DEFAULT_VOCAB,
    seed: int = 0,
) -> Workload:
    """PEER-style 4-agent workflows: a shared system prompt, role prompts of tens to hundreds of tokens."""
    rng = random.Random(seed)
    system = _tokens(rng, system_len, vocab)
    roles = {
        name: _tokens(rng, n, vocab)
        for name, n in (("plan", 180), ("execute", 90), ("express", 40), ("review", 120))
    }
    agents = list(roles)
    flows = []
    for w in range(workflows):
        calls = []
        for _ in range(rounds):
            for i, agent in enumerate(agents):
                fixed = system + roles[agent]
                prompt = fixed + _tokens(rng, dynamic_len, vocab)
                calls.append(Call(f"peer{w}", agent, prompt, len(fixed), _cycle_steps(agents, i), output_len))
        flows.append(calls)
    return Workload("realistic-peer", flows, dict(workflows=workflows, system_len=system_len))


def planner_loop_graph() -> AgentStepGraph:
    """planner -> executor -> reviewer; the reviewer sends work back to the executor or to the planner."""
    graph = AgentStepGraph()
    graph.add_agent("planner", join="or")
    graph.add_agent("executor", join="or")
    graph.add_agent("reviewer")
    for src, dst in (
        ("planner", "executor"),
        ("executor", "reviewer"),
        ("reviewer", "executor"),
        ("reviewer", "planner"),
    ):
        graph.add_edge(src, dst)
    return graph


def cyclic_loop(
    fixed_len: int = 512,
    iterations: int = 12,
    dynamic_len: int = 32,
    output_len: int = 32,
    vocab: int = DEFAULT_VOCAB,
    seed: int = 0,
) -> Workload:
    """A planner / executor / reviewer workflow with a review loop; steps come from the Agent Step Graph."""
    rng = random.Random(seed)
    graph = planner_loop_graph()
    fixed = {agent: _tokens(rng, fixed_len, vocab) for agent in graph.agents}
    calls = [
        Call("loop", a, list(p), fixed_len, graph.steps_to_execution([a]), 1, True) for a, p in fixed.items()
    ]
    agent = "planner"
    for _ in range(iterations):
        prompt = fixed[agent] + _tokens(rng, dynamic_len, vocab)
        calls.append(Call("loop", agent, prompt, fixed_len, graph.steps_to_execution([agent]), output_len))
        if agent == "planner":
            agent = "executor"
        elif agent == "executor":
            agent = "reviewer"
        else:
            agent = rng.choice(["executor", "planner"])
    return Workload(f"cyclic-loop-{fixed_len}", [calls], dict(fixed_len=fixed_len, iterations=iterations))


WORKLOADS = {
    "sequential": sequential,
    "branching": branching,
    "concurrent": concurrent,
    "realistic": realistic,
    "cyclic-loop": cyclic_loop,
}
