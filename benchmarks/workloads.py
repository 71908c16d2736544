"""Benchmark workloads: deterministic multi-agent request sequences as token ids.

A :class:`Workload` is a set of workflows that run concurrently; each workflow
is a list of :class:`Call` s that run one after another. Prompts are token ids
drawn from ``[0, vocab)`` with fixed seeds, so no tokenizer or download is
needed. Every call carries the kvflow hint (stock servers ignore it). Calls
marked ``warmup`` prime each agent's fixed prompt (the paper's method) and are
left out of the measurements.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from kvflow.frontend.graph_learning import FAR
from kvflow.graph import AgentStepGraph
from kvflow.model import BYTE_TOKENS

DEFAULT_VOCAB = BYTE_TOKENS  # the embedded model's byte tokens; use the model's vocab on GPU


@dataclass(frozen=True)
class Call:
    workflow_id: str
    agent_id: str
    input_ids: list[int]
    fixed_len: int
    steps: dict[str, int]
    output_len: int
    warmup: bool = False
    start: float | None = None  # when it starts, in a timed workload (see ``timed``)
    ends: bool = False  # the client ends its workflow (``end_workflow``) once this call is done

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
        """All calls in one sequence, the order a replay uses: by start time in a timed
        workload (warm-up calls first), otherwise workflows round-robin."""
        if all(c.start is not None for w in self.workflows for c in w):
            order = [
                (not c.warmup, c.start, i, j) for i, w in enumerate(self.workflows) for j, c in enumerate(w)
            ]
            return [self.workflows[i][j] for *_, i, j in sorted(order)]
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
        f"branching-{fixed_len}",
        [calls],
        dict(fixed_len=fixed_len, stages=stages, rounds=rounds, branches=True),
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
    params = dict(fixed_len=fixed_len, iterations=iterations, branches=True)  # the reviewer's choice
    return Workload(f"cyclic-loop-{fixed_len}", [calls], params)


def timed(
    workflows: int = 16,
    agents: int = 4,
    fixed_len: int = 128,
    dynamic_len: int = 16,
    output_len: int = 16,
    rounds: int = 3,
    speed_spread: float = 10.0,
    jitter: float = 0.5,
    branching_every: int = 0,
    vocab: int = DEFAULT_VOCAB,
    seed: int = 0,
) -> Workload:
    """Concurrent workflows that advance at different speeds, in time order.

    Each workflow's steps take a base duration drawn log-uniformly from
    ``[1, speed_spread]`` (so the slowest is ``speed_spread`` times slower than
    the fastest), each step varying by up to ``jitter`` of it either way, and
    each workflow starts at a random point of its first step. A workflow runs
    its ``agents`` in a cycle after warming each prompt, as many rounds as fit
    in the time the slowest possible one takes for ``rounds`` (a fast one runs
    up to ``speed_spread`` times as many), so all run side by side until about
    the same end and the request rate stays steady; in
    its last round the hints say which agents will not run again (steps
    ``FAR``, as a graph's hints would), so the hints describe the whole future
    but for the timing.
    Every ``branching_every``-th workflow (0: none) is a conditional one
    instead: at each stage it runs one of two agents that share half their
    prompt, which one not known in advance (the hints give both the same steps).
    """
    rng = random.Random(seed)
    flows = []
    branches_any = False
    for w in range(workflows):
        duration = speed_spread ** rng.random()
        t = rng.uniform(0, duration)
        branches = branching_every > 0 and w % branching_every == branching_every - 1
        branches_any |= branches
        wid = f"{'br' if branches else 'wf'}{w}"
        if branches:
            shared = [_tokens(rng, fixed_len // 2, vocab) for _ in range(agents)]
            prompts = {
                f"s{s}{b}": shared[s] + _tokens(rng, fixed_len - fixed_len // 2, vocab)
                for s in range(agents)
                for b in "ab"
            }
            order = [[f"s{s}a", f"s{s}b"] for s in range(agents)]
        else:
            prompts = {f"agent{i}": _tokens(rng, fixed_len, vocab) for i in range(agents)}
            order = [[a] for a in prompts]

        def steps(stage: int, chosen: str, last_round: bool = False, order=order) -> dict[str, int]:
            view = {a: (s - stage) % len(order) for s, names in enumerate(order) for a in names}
            for other in order[stage]:
                if other != chosen:
                    view[other] = len(order)  # the branch not taken comes back no sooner than a cycle
            if last_round:  # the agents that already ran for the last time will not run again
                view.update({a: FAR for names in order[:stage] for a in names})
            return view

        calls = [
            Call(wid, a, list(prompts[a]), fixed_len, steps(s, a), 1, True, 0.0)
            for s, names in enumerate(order)
            for a in names
        ]
        cycles = max(1, round(rounds * speed_spread / duration))
        for round_index in range(cycles):
            for stage, names in enumerate(order):
                agent = rng.choice(names)
                prompt = prompts[agent] + _tokens(rng, dynamic_len, vocab)
                view = steps(stage, agent, last_round=round_index == cycles - 1)
                calls.append(Call(wid, agent, prompt, fixed_len, view, output_len, start=t))
                t += duration * rng.uniform(1 - jitter, 1 + jitter)
        flows.append(calls)
    name = f"timed-{workflows}x{fixed_len}" + (f"-branch{branching_every}" if branching_every else "")
    params = dict(workflows=workflows, fixed_len=fixed_len, speed_spread=speed_spread, jitter=jitter)
    return Workload(name, flows, {**params, "branching_every": branching_every, "branches": branches_any})


def staggered(
    per_speed: int = 4,
    speeds: tuple[float, ...] = (1.0, 3.0, 9.0),
    agents: int = 4,
    fixed_len: int = 128,
    dynamic_len: int = 16,
    output_len: int = 16,
    rounds: int = 3,
    jitter: float = 0.5,
    ended: bool = True,
    vocab: int = DEFAULT_VOCAB,
    seed: int = 0,
) -> Workload:
    """Cyclic workflows of a few speeds that start together and stop at different times, in time order.

    ``per_speed`` workflows per step duration in ``speeds`` (9x apart by default) each warm their
    ``agents`` prompts, start within their first step and run the same ``rounds`` cycles, so the
    fast ones finish long before the slow ones. The hints are the cycle's throughout (a loop's
    client does not know ahead which round is its last); with ``ended`` the client ends each
    workflow after its last call (``Call.ends``), otherwise it just stops.
    """
    rng = random.Random(seed)
    flows = []
    for s, duration in enumerate(speeds):
        for w in range(per_speed):
            wid = f"v{s}wf{w}"
            names = [f"agent{i}" for i in range(agents)]
            prompts = {a: _tokens(rng, fixed_len, vocab) for a in names}
            calls = [
                Call(wid, a, list(prompts[a]), fixed_len, _cycle_steps(names, i), 1, True, 0.0)
                for i, a in enumerate(names)
            ]
            t = rng.uniform(0, duration)
            for round_index in range(rounds):
                for stage, agent in enumerate(names):
                    prompt = prompts[agent] + _tokens(rng, dynamic_len, vocab)
                    ends = ended and round_index == rounds - 1 and stage == agents - 1
                    view = _cycle_steps(names, stage)
                    calls.append(Call(wid, agent, prompt, fixed_len, view, output_len, start=t, ends=ends))
                    t += duration * rng.uniform(1 - jitter, 1 + jitter)
            flows.append(calls)
    name = f"staggered-{per_speed * len(speeds)}x{fixed_len}-{'ended' if ended else 'stopped'}"
    params = dict(per_speed=per_speed, speeds=list(speeds), fixed_len=fixed_len, rounds=rounds, ended=ended)
    return Workload(name, flows, params)


WORKLOADS = {
    "sequential": sequential,
    "branching": branching,
    "concurrent": concurrent,
    "realistic": realistic,
    "cyclic-loop": cyclic_loop,
    "timed": timed,
}


@dataclass(frozen=True)
class SessionTurn:
    """One request of an agent session.

    Turn ``k > 0`` asks with turn ``k - 1``'s prompt + output + a tool result (exact prefix growth,
    as SGLang inserts prompt + output), so its first ``history_len`` tokens are history.
    """

    session_id: str
    workflow_id: str  # the top-level session: it and its sub-agents
    turn: int
    start: float  # arrival, seconds
    end: float  # generation done: the tool, the sub-agents or the client take over
    input_ids: tuple[int, ...]
    output_ids: tuple[int, ...]
    system_len: int  # the agent's system prompt, the fixed prefix
    history_len: int  # the previous turn's prompt + output (0 on a first turn)
    last: bool = False  # the client ends the session after this turn
    parent: str | None = None

    @property
    def tokens(self) -> tuple[int, ...]:
        return self.input_ids + self.output_ids


@dataclass(frozen=True)
class SessionInfo:
    """What the generator decided for one session (an agent)."""

    tool_mean_s: float  # the mean of its tool pauses
    ended: bool  # its last turn carries the client's end marker (else it is abandoned)
    parent: str | None = None
    subagents: int = 0


@dataclass
class AgentTrace:
    """Agent sessions in time order (``turns`` sorted by start)."""

    name: str
    turns: list[SessionTurn]
    sessions: dict[str, SessionInfo]
    params: dict = field(default_factory=dict)

    def context_tokens(self) -> int:
        """Distinct tokens of every session's final context (system prompts counted once)."""
        final: dict[str, SessionTurn] = {t.session_id: t for t in self.turns}
        return len(set().union(*(t.tokens for t in final.values())))

    def history_tokens(self) -> int:
        return sum(t.history_len for t in self.turns)

    def mean_gaps(self) -> dict[str, float]:
        """Each session's mean time between the starts of its requests (inf with one request)."""
        starts: dict[str, list[float]] = {}
        for t in self.turns:
            starts.setdefault(t.session_id, []).append(t.start)
        return {s: (v[-1] - v[0]) / (len(v) - 1) if len(v) > 1 else float("inf") for s, v in starts.items()}


@dataclass
class _SessionGen:
    """Shared state of one :func:`agent_sessions` run."""

    rng: random.Random
    systems: dict[str, tuple[int, ...]]
    tool_mean_s: tuple[float, float]
    tool_sigma: float
    decode_s_per_token: float
    output_share: float
    task_len: tuple[int, int]
    turns: list[SessionTurn] = field(default_factory=list)
    sessions: dict[str, SessionInfo] = field(default_factory=dict)
    next_token: int = 1

    def fresh(self, n: int) -> tuple[int, ...]:
        """``n`` tokens never used before, so only system prompts are shared between contexts."""
        self.next_token += n
        return tuple(range(self.next_token - n, self.next_token))

    def pause(self, mean: float) -> float:
        """A lognormal tool pause of mean ``mean``: heavy-tailed for a large ``tool_sigma``."""
        sigma = self.tool_sigma
        return self.rng.lognormvariate(math.log(mean) - sigma * sigma / 2, sigma)

    def session(
        self,
        sid: str,
        workflow_id: str,
        system: str,
        start: float,
        turns: int,
        context: int,
        ended: bool,
        parent: str | None = None,
        spawn: tuple[int, int, tuple[int, int], int] | None = None,
    ) -> float:
        """Emit one session's turns from ``start``; return when its last turn ends.

        ``spawn`` (turn, children, their turn range, their context) makes the session a parent:
        after that turn it waits for sub-agents that run at once, then resumes.
        """
        rng = self.rng
        lo, hi = self.tool_mean_s
        mean = lo * (hi / lo) ** rng.random()  # per agent, log-uniform: hi / lo apart
        children = spawn[1] if spawn else 0
        self.sessions[sid] = SessionInfo(mean, ended, parent, children)
        prompt = self.systems[system] + self.fresh(rng.randint(*self.task_len))
        growth = max(1.0, (context - len(prompt)) / turns)
        t, history = start, 0
        for k in range(turns):
            output = self.fresh(max(1, round(growth * self.output_share * rng.uniform(0.5, 1.5))))
            end = t + len(output) * self.decode_s_per_token
            last = k == turns - 1
            self.turns.append(
                SessionTurn(
                    sid, workflow_id, k, t, end, prompt, output, len(self.systems[system]),
                    history, last and ended, parent,
                )
            )  # fmt: skip
            if last:
                return end
            history = len(prompt) + len(output)
            result = self.fresh(max(1, round(growth * (1 - self.output_share) * rng.uniform(0.5, 1.5))))
            if spawn and k == spawn[0]:
                done = [
                    self.session(
                        f"{sid}.sub{c}", workflow_id, f"sub{c % 2}", end + rng.uniform(0, 1),
                        rng.randint(*spawn[2]), spawn[3], True, parent=sid,
                    )
                    for c in range(spawn[1])
                ]  # fmt: skip
                t = max(done) + rng.uniform(0, 1)
            else:
                t = end + self.pause(mean)
            prompt = prompt + output + result
        return t


def agent_sessions(
    sessions: int = 32,
    turns: tuple[int, int] = (10, 30),
    system_len: int = 160,
    task_len: tuple[int, int] = (20, 60),
    max_context: int = 3000,
    agent_types: int = 4,
    tool_mean_s: tuple[float, float] = (2.0, 20.0),
    tool_sigma: float = 1.0,
    decode_s_per_token: float = 0.02,
    output_share: float = 0.3,
    start_window_s: float = 60.0,
    subagent_share: float = 0.0,
    subagents: tuple[int, int] = (1, 3),
    subagent_turns: tuple[int, int] = (3, 8),
    ended_share: float = 1.0,
    seed: int = 0,
    name: str | None = None,
) -> AgentTrace:
    """Multi-turn tool-calling agents, one per session, in time order (deterministic by ``seed``).

    - ``sessions`` top-level sessions start within ``start_window_s``, each running ``turns``
      turns (inclusive range); its agent type picks one of ``agent_types`` system prompts of
      ``system_len`` tokens, followed by a task of ``task_len`` tokens.
    - Every turn appends an output and a tool result (``output_share`` of the growth is output),
      so a context grows from about ``system_len + task_len`` to between 0.6 and 1.0 of
      ``max_context``; a turn takes ``decode_s_per_token`` per output token.
    - Tool pauses are lognormal with shape ``tool_sigma`` (heavy-tailed when large) and a mean per
      agent drawn log-uniformly from ``tool_mean_s`` (10x apart by default).
    - ``subagent_share`` of the sessions spawn ``subagents`` sub-agent sessions (own system
      prompts, ``subagent_turns`` turns, contexts up to a third of ``max_context``) in the middle
      of their run and resume when all of them are done; sub-agents end with the end marker.
    - ``ended_share`` of the top-level sessions end with the client's end marker on their last
      turn; the rest are abandoned (they stop without a word).

    :data:`AGENT_SESSION_SCALES` has the CPU defaults and a GPU-scale set.
    """
    rng = random.Random(seed)
    gen = _SessionGen(rng, {}, tool_mean_s, tool_sigma, decode_s_per_token, output_share, task_len)
    gen.systems = {f"type{a}": gen.fresh(system_len) for a in range(agent_types)}
    gen.systems.update({f"sub{c}": gen.fresh(system_len) for c in range(2)})
    for s in range(sessions):
        spawn = None
        count = rng.randint(*turns)
        if rng.random() < subagent_share:
            spawn = (
                rng.randint(count // 3, 2 * count // 3),
                rng.randint(*subagents),
                subagent_turns,
                max_context // 3,
            )
        gen.session(
            f"s{s}", f"wf{s}", f"type{s % agent_types}", rng.uniform(0, start_window_s), count,
            round(max_context * rng.uniform(0.6, 1.0)), rng.random() < ended_share, spawn=spawn,
        )  # fmt: skip
    params = dict(
        sessions=sessions, turns=list(turns), system_len=system_len, max_context=max_context,
        tool_mean_s=list(tool_mean_s), tool_sigma=tool_sigma, subagent_share=subagent_share,
        ended_share=ended_share, seed=seed,
    )  # fmt: skip
    order = sorted(range(len(gen.turns)), key=lambda i: (gen.turns[i].start, i))
    return AgentTrace(
        name or f"agent-sessions-{sessions}", [gen.turns[i] for i in order], gen.sessions, params
    )


AGENT_SESSION_SCALES = {
    "cpu": dict(sessions=32, system_len=160, task_len=(20, 60), max_context=3000),
    "gpu": dict(sessions=64, system_len=1600, task_len=(200, 600), max_context=32000, start_window_s=120.0),
}


@dataclass(frozen=True)
class LiveTurn:
    """One turn of a live session: wait ``pause_s``, append ``new_ids``, generate ``output_len``.

    ``new_ids`` is the task on a first turn (after the system prompt), else the tool result that
    follows the previous turn's prompt + the server's actual output.
    """

    pause_s: float
    new_ids: tuple[int, ...]
    output_len: int


@dataclass(frozen=True)
class LiveSession:
    """One agent of :class:`AgentChatWorkload`; a parent runs ``children`` after turn ``spawn_after``
    and waits for all of them before its next turn."""

    session_id: str
    workflow_id: str
    system: tuple[int, ...]
    turns: tuple[LiveTurn, ...]
    ended: bool  # the last turn says so (``keep_context`` false, session closed); else abandoned
    tool_mean_s: float
    parent: str | None = None
    spawn_after: int | None = None
    children: tuple[LiveSession, ...] = ()


@dataclass
class AgentChatWorkload:
    """Live multi-turn agent sessions: prompts grow by the server's real outputs, pauses are sleeps."""

    name: str
    sessions: list[LiveSession]  # top-level sessions; sub-agents hang below their parent
    params: dict = field(default_factory=dict)

    def all_sessions(self) -> list[LiveSession]:
        out, todo = [], list(self.sessions)
        while todo:
            session = todo.pop(0)
            out.append(session)
            todo.extend(session.children)
        return out

    def context_tokens(self) -> int:
        """Every session's final context (system prompts counted once), outputs at their planned length."""
        systems = {s.system for s in self.all_sessions()}
        grown = sum(sum(len(t.new_ids) + t.output_len for t in s.turns) for s in self.all_sessions())
        return sum(len(s) for s in systems) + grown


def _live_session(trace: AgentTrace, sid: str, table: list[int], scale: float) -> LiveSession:
    """``sid``'s turns of ``trace`` as a live session; its turn 0 pause is its delay from when its
    parent spawns it (from the trace's start for a top-level session)."""
    turns = [t for t in trace.turns if t.session_id == sid]
    info = trace.sessions[sid]
    kids = [c for c, i in trace.sessions.items() if i.parent == sid]
    children = tuple(_live_session(trace, c, table, scale) for c in kids)
    first_starts = [next(t.start for t in trace.turns if t.session_id == c) for c in kids]
    spawn_after = max(k for k, t in enumerate(turns) if t.end <= min(first_starts)) if kids else None
    origin = 0.0 if info.parent is None else _spawn_end(trace, info.parent, turns[0].start)
    kids_end = max((t.end for t in trace.turns if t.session_id in kids), default=0.0)
    live = []
    for k, turn in enumerate(turns):
        if k == 0:
            pause, new = turn.start - origin, turn.input_ids[turn.system_len :]
        elif k - 1 == spawn_after:
            pause, new = turn.start - kids_end, turn.input_ids[turn.history_len :]
        else:
            pause, new = turn.start - turns[k - 1].end, turn.input_ids[turn.history_len :]
        live.append(LiveTurn(round(pause * scale, 3), tuple(table[i] for i in new), len(turn.output_ids)))
    system = tuple(table[i] for i in turns[0].input_ids[: turns[0].system_len])
    return LiveSession(
        sid, turns[0].workflow_id, system, tuple(live), info.ended, info.tool_mean_s * scale,
        info.parent, spawn_after, children,
    )  # fmt: skip


def _spawn_end(trace: AgentTrace, parent: str, child_start: float) -> float:
    """When the parent's turn that spawned a child (its last turn ending before the child) ended."""
    return max(t.end for t in trace.turns if t.session_id == parent and t.end <= child_start)


def agent_chat(
    sessions: int = 12,
    turns: int = 8,
    system_len: int = 64,
    task_len: tuple[int, int] = (20, 40),
    max_context: int = 500,
    tool_mean_s: tuple[float, float] = (0.2, 2.0),
    tool_sigma: float = 1.0,
    start_window_s: float = 3.0,
    subagent_share: float = 0.0,
    ended_share: float = 0.5,
    time_scale: float = 1.0,
    vocab: int = DEFAULT_VOCAB,
    seed: int = 0,
) -> AgentChatWorkload:
    """Live tool-calling agents from :func:`agent_sessions` (``sessions`` x ``turns``), for a server.

    - Each session is one agent in its own workflow (sub-agents share their parent's); its turn
      ``k + 1`` sends turn ``k``'s prompt + the server's output + a tool result of the trace's length.
    - Pauses are the trace's (lognormal, per-agent means ``tool_mean_s`` apart) times
      ``time_scale``; the driver sleeps them for real.
    - Token ids are the trace's, mapped to random ids in ``[0, vocab)`` (fixed by ``seed``); only
      system prompts are shared between sessions.
    - ``ended_share`` of the top-level sessions end with the end marker, the rest are abandoned.
    """
    trace = agent_sessions(
        sessions=sessions, turns=(turns, turns), system_len=system_len, task_len=task_len,
        max_context=max_context, agent_types=4, tool_mean_s=tool_mean_s, tool_sigma=tool_sigma,
        decode_s_per_token=0.0, start_window_s=start_window_s, subagent_share=subagent_share,
        subagent_turns=(2, 4), ended_share=ended_share, seed=seed,
    )  # fmt: skip
    rng = random.Random(seed)
    table = _tokens(rng, 1 + max(max(t.tokens) for t in trace.turns), vocab)
    top = [sid for sid, info in trace.sessions.items() if info.parent is None]
    params = dict(
        sessions=sessions, turns=turns, system_len=system_len, max_context=max_context,
        tool_mean_s=list(tool_mean_s), tool_sigma=tool_sigma, start_window_s=start_window_s,
        subagent_share=subagent_share, ended_share=ended_share, time_scale=time_scale, seed=seed,
    )  # fmt: skip
    live = [_live_session(trace, sid, table, time_scale) for sid in top]
    return AgentChatWorkload(f"agent-chat-{sessions}x{turns}", live, params)


WORKLOADS["agent-chat"] = agent_chat
