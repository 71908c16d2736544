"""Churn equivalence: one seeded random stream of workflow traffic against a kvflow and a stock server.

Both servers (CPU, embedded model, same small device pool and host tier) get the
same requests, side by side: many workflows whose agents share a system prompt,
hints in every accepted form, registered workflows (register, PATCH, DELETE) on
the kvflow server, pauses past ``--kvflow-hint-ttl``, streams the client closes
after the first chunk, batches, un-hinted, long and concurrent requests. Greedy outputs
of every request that completed on both servers must be identical, no answer may
be a 5xx, both servers must stay alive without a ``Traceback`` in their logs.
Short pauses leave the schedulers idle, where SGLang runs its strict memory check.

``python -m kvflow.harness.churn --requests 800`` runs it at a larger size than the
CI test (``tests/test_churn_e2e.py``) and prints the one-line summary; flags after
``--`` go to the kvflow server (e.g. ``-- --no-kvflow-prefetch``).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from math import inf
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests

from kvflow.harness.server_process import ServerProcess
from kvflow.model import VOCAB_SIZE

FAR = 10**6
TIMEOUT = 120.0
MAX_GROUP = 4  # requests in flight at once on each server
MAX_DETAILS = 20  # failures described in full


@dataclass(frozen=True)
class ChurnConfig:
    """Size and server settings of one run."""

    requests: int = 80  # generation requests sent to each server
    seed: int = 0
    workflows: int = 6
    ttl: float = 5.0  # short, yet longer than a few requests take on a busy 2-core machine
    pool_tokens: int = 600  # device pool: about three 200-token fixed prompts
    hicache_ratio: float = 2.0  # host pool = ratio x device pool: pressure on both tiers
    kvflow_extra: tuple[str, ...] = ()  # more flags for the kvflow server

    def common_args(self) -> list[str]:
        return [
            "--max-total-tokens", str(self.pool_tokens), "--random-seed", "0",
            "--enable-hierarchical-cache", "--hicache-ratio", str(self.hicache_ratio),
            "--enable-cache-report",
        ]  # fmt: skip

    def kvflow_args(self) -> list[str]:
        return [*self.common_args(), "--kvflow-hint-ttl", str(self.ttl), *self.kvflow_extra]

    def stock_args(self) -> list[str]:
        return [*self.common_args(), "--radix-cache-backend", "stock"]


# ---- the stream ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One HTTP generation request; ``abort``: streamed, closed after the first chunk."""

    path: str
    body: dict[str, Any]
    abort: bool = False
    hinted: tuple[str, ...] = ()  # the workflows its hints name
    registered: tuple[str, ...] = ()  # those registered on the kvflow server (it keeps them alive)


@dataclass(frozen=True)
class Calls:
    """Requests in flight at once; a ``background`` one is checked later (see :class:`Churn`)."""

    requests: list[Request]
    background: bool = False


@dataclass(frozen=True)
class Registry:
    """A ``/kvflow/workflows`` call, kvflow server only."""

    method: str  # POST, PATCH or DELETE
    workflow_id: str
    body: dict[str, Any] | None = None


@dataclass(frozen=True)
class Pause:
    """Idle servers; past the TTL, the next op is one hinted request that wakes the cache."""

    seconds: float
    past_ttl: bool = False


Op = Calls | Registry | Pause


@dataclass
class Flow:
    """One workflow slot: its prompts stay, its id changes each time it is deleted."""

    index: int
    mode: str  # "explicit" (steps, boundaries), "ids" (ids only) or "registered"
    agents: list[str]
    system: list[int]
    roles: dict[str, list[int]]
    generation: int = 0
    cursor: int = 0
    used: bool = False
    graph: dict[str, Any] | None = None  # registered graph of this generation
    registered: bool = False  # a registration was sent since the last expiry or DELETE

    @property
    def workflow_id(self) -> str:
        return f"churn-{self.index}.{self.generation}"

    def fixed(self, agent: str) -> list[int]:
        return self.system + self.roles[agent]


def named(*flows: Flow) -> dict[str, tuple[str, ...]]:
    """The ``hinted`` and ``registered`` fields of a request whose hints name ``flows``."""
    ids = sorted({flow.workflow_id for flow in flows})
    registered = sorted({flow.workflow_id for flow in flows if flow.mode == "registered"})
    return {"hinted": tuple(ids), "registered": tuple(registered)}


MODES = ("explicit", "explicit", "ids", "registered", "registered")
FORMS = ("generate", "custom", "envelope", "completions", "completions-custom", "chat")
DECK = ("call",) * 4 + ("group", "abort", "batch", "long", "registry", "registry", "pause")  # a round


class StreamBuilder:
    """Draws the op stream from the seed alone, before anything is sent."""

    def __init__(self, config: ChurnConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.flows = [self._flow(i) for i in range(config.workflows)]
        self.ops: list[Op] = []
        self.sent = 0
        self.last = self.flows[0]  # the workflow picked last

    def build(self) -> list[Op]:
        total = self.config.requests
        ttl_at = sorted(self.rng.sample(range(total // 10, total), max(2, total // 50)))
        deck: list[str] = []
        while self.sent < total:
            if ttl_at and self.sent >= ttl_at[0]:
                ttl_at.pop(0)
                self._ttl_pause()
                continue
            if not deck:  # shuffled rounds: even a short stream holds every kind of op
                deck = self.rng.sample(DECK, len(DECK))
            kind = deck.pop()
            if kind == "call":
                self._calls([self._call()])
            elif kind == "group":
                group = [self._call() for _ in range(self.rng.randint(2, MAX_GROUP - 1))]
                self._calls([*group, self._abort()] if self.rng.random() < 0.5 else group)
            elif kind == "abort":
                self._calls([self._abort()])
            elif kind == "batch":
                self._calls([self._batch()])
            elif kind == "long":
                self._long()
            elif kind == "registry":
                self._registry_op()
            else:
                self.ops.append(Pause(self.rng.uniform(0.1, 0.5)))
        return self.ops

    # ---- workflows and agents -------------------------------------------------------------

    def _tokens(self, count: int) -> list[int]:
        return [self.rng.randrange(VOCAB_SIZE) for _ in range(count)]

    def _flow(self, index: int) -> Flow:
        system = self._tokens(self.rng.randint(30, 100))
        agents = [f"agent{j}" for j in range(self.rng.randint(3, 5))]
        low, high = max(0, 60 - len(system)), 200 - len(system)
        roles = {agent: self._tokens(self.rng.randint(low, high)) for agent in agents}
        return Flow(index, self.rng.choice(MODES), agents, system, roles)

    def _graph(self, flow: Flow) -> dict[str, Any]:
        """A cycle through the agents, sometimes with one extra edge (a branch)."""
        agents, n = flow.agents, len(flow.agents)
        edges = [[agents[i], agents[(i + 1) % n]] for i in range(n)]
        if self.rng.random() < 0.3:
            edges.append([agents[0], agents[self.rng.randrange(2, n)]])
        return {"agents": [{"id": agent} for agent in agents], "edges": edges}

    def _register(self, flow: Flow) -> None:
        flow.graph = flow.graph or self._graph(flow)
        self.ops.append(
            Registry("POST", flow.workflow_id, {"workflow_id": flow.workflow_id, "graph": flow.graph})
        )
        flow.registered = True

    def _pick(self) -> tuple[Flow, str]:
        """A workflow and its next agent, mostly in order: often the last workflow again (it runs
        its agents in turn), else any, the first ones hot and the last ones cold."""
        flow = self.last
        if self.rng.random() < 0.4:
            flow = self.rng.choices(self.flows, weights=[1 / (1 + i) for i in range(len(self.flows))])[0]
        if self.rng.random() < 0.75:
            flow.cursor = (flow.cursor + 1) % len(flow.agents)
        else:
            flow.cursor = self.rng.randrange(len(flow.agents))
        agent, self.last = flow.agents[flow.cursor], flow
        if self.rng.random() < 0.02:  # the agent's prompt moved: its old fixed prompt is no longer its own
            flow.roles[agent] = self._tokens(len(flow.roles[agent]))
        if flow.mode == "registered" and not flow.registered:
            self._register(flow)
        flow.used = True
        return flow, agent

    def _steps(self, flow: Flow, agent: str) -> dict[str, int] | None:
        """A (changing) view of when each agent runs next."""
        n, i = len(flow.agents), flow.agents.index(agent)
        roll = self.rng.random()
        if roll < 0.45:
            return {a: (j - i) % n for j, a in enumerate(flow.agents)}
        if roll < 0.65:
            names = self.rng.sample(flow.agents, self.rng.randint(1, n))
            return {a: self.rng.choice((0, 1, 2, 3, 7, FAR)) for a in names}
        if roll < 0.75:
            return {agent: self.rng.randint(0, 2), "ghost": self.rng.randint(1, 5)}
        return None

    def _hint(self, flow: Flow, agent: str, boundary: bool = True) -> dict[str, Any]:
        hint: dict[str, Any] = {"workflow_id": flow.workflow_id, "agent_id": agent}
        if boundary and flow.mode != "ids" and self.rng.random() < 0.7:
            whole = self.rng.random() < 0.85
            hint["fixed_prefix_len"] = len(flow.fixed(agent)) if whole else len(flow.system)
        steps = self._steps(flow, agent)
        if steps is not None and (flow.mode == "explicit" or self.rng.random() < 0.1):
            hint["steps_to_execution"] = steps
        return hint

    def _prompt(self, flow: Flow, agent: str) -> list[int]:
        return flow.fixed(agent) + self._tokens(self.rng.randint(2, 24))

    def _sampling(self) -> dict[str, Any]:
        tokens = self.rng.choice((2, 2, 3, 4, 6, 8))  # decode steps dominate a request's time on a CPU
        sampling: dict[str, Any] = {"max_new_tokens": tokens, "temperature": 0}
        if self.rng.random() < 0.5:
            sampling["ignore_eos"] = True
        return sampling

    # ---- requests ---------------------------------------------------------------------------

    def _call(self) -> Request:
        """One request: hinted in a random form on /generate or the OpenAI endpoints, or not at all."""
        flow, agent = self._pick()
        hinted, form = self.rng.random() < 0.85, self.rng.choice(FORMS)
        ids, sampling = self._prompt(flow, agent), self._sampling()
        names = named(flow) if hinted else {}
        if form == "chat":
            return self._chat(flow, agent, ids, sampling, names)
        short = self.rng.random() < 0.05  # a prompt shorter than the agent's fixed one
        if short:
            ids = ids[: self.rng.randint(8, len(flow.fixed(agent)) - 1)]
        hint = self._hint(flow, agent, boundary=not short)
        if form.startswith("completions"):
            body: dict[str, Any] = {
                "model": "default",
                "prompt": ids,
                "max_tokens": sampling["max_new_tokens"],
                "temperature": 0,
                "ignore_eos": sampling.get("ignore_eos", False),
                "return_token_ids": True,
            }
            if hinted and form == "completions":
                body["kvflow"] = hint
            elif hinted:
                body["custom_params"] = {"kvflow": hint}
            return Request("/v1/completions", body, **names)
        body = {"input_ids": ids, "sampling_params": sampling}
        if hinted and form == "generate":
            body["kvflow"] = hint
        elif hinted and form == "custom":
            sampling["custom_params"] = {"kvflow": hint}
        elif hinted:
            action = {"action_id": "1", "action_type": "kvflow", "action_version": "1", "payload": hint}
            body["kv_hints"] = {"protocol_version": "1", "message_id": "m", "actions": [action]}
        return Request("/generate", body, **names)

    def _chat(
        self,
        flow: Flow,
        agent: str,
        ids: list[int],
        sampling: dict[str, Any],
        names: dict[str, tuple[str, ...]],
    ) -> Request:
        """The prompt as text (printable bytes): system = the fixed prompt, user = the suffix."""
        fixed = len(flow.fixed(agent))
        messages = [
            {"role": "system", "content": text(ids[:fixed])},
            {"role": "user", "content": text(ids[fixed:])},
        ]
        body: dict[str, Any] = {
            "model": "default",
            "messages": messages,
            "max_tokens": sampling["max_new_tokens"],
            "temperature": 0,
        }
        if names:  # no fixed_prefix_len: the rendered chat's token boundary is the server's
            hint = self._hint(flow, agent, boundary=False)
            if flow.mode != "registered":  # as text it is another prompt: another agent's
                hint["agent_id"] = f"{agent}.chat"
            if self.rng.random() < 0.5:
                body["kvflow"] = hint
            else:
                body["custom_params"] = {"kvflow": hint}
        return Request("/v1/chat/completions", body, **names)

    def _abort(self) -> Request:
        """A long streamed request whose connection the client closes after the first chunk."""
        flow, agent = self._pick()
        ids, tokens, hint = self._prompt(flow, agent), self.rng.randint(48, 128), self._hint(flow, agent)
        if self.rng.random() < 0.5:
            sampling = {"max_new_tokens": tokens, "temperature": 0, "ignore_eos": True}
            body = {"input_ids": ids, "sampling_params": sampling, "stream": True, "kvflow": hint}
            return Request("/generate", body, abort=True, **named(flow))
        body = {
            "model": "default",
            "prompt": ids,
            "max_tokens": tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "custom_params": {"kvflow": hint},
        }
        return Request("/v1/completions", body, abort=True, **named(flow))

    def _batch(self) -> Request:
        """A batch /generate: per-item hints (some items un-hinted), or one agent's hint for all."""
        size = self.rng.randint(2, 4)
        if self.rng.random() < 0.3:
            flow, agent = self._pick()
            prompts = [self._prompt(flow, agent) for _ in range(size)]
            hint = self._hint(flow, agent, boundary=False)
            body = {"input_ids": prompts, "sampling_params": self._sampling(), "kvflow": hint}
            return Request("/generate", body, **named(flow))
        prompts, samplings, hinted = [], [], []
        for _ in range(size):
            flow, agent = self._pick()
            sampling = self._sampling()
            if self.rng.random() < 0.8:
                sampling["custom_params"] = {"kvflow": self._hint(flow, agent)}
                hinted.append(flow)
            prompts.append(self._prompt(flow, agent))
            samplings.append(sampling)
        body = {"input_ids": prompts, "sampling_params": samplings}
        return Request("/generate", body, **named(*hinted))

    def _long(self) -> None:
        """An un-hinted request that holds part of the pool while the ops after it run."""
        flow, agent = self._pick()
        sampling = {"max_new_tokens": self.rng.randint(24, 64), "temperature": 0, "ignore_eos": True}
        body = {"input_ids": self._prompt(flow, agent), "sampling_params": sampling}
        self.ops.append(Calls([Request("/generate", body)], background=True))
        self.sent += 1

    def _calls(self, group: list[Request]) -> None:
        self.ops.append(Calls(group))
        self.sent += len(group)

    # ---- registry and pauses ----------------------------------------------------------------

    def _registry_op(self) -> None:
        """PATCH a registered workflow's frontier, register it again, or DELETE a workflow
        (half of the time the one picked last)."""
        registered = [flow for flow in self.flows if flow.registered]
        roll, recent = self.rng.random(), self.rng.random() < 0.5
        if registered and roll < 0.5:
            flow = self.last if recent and self.last.registered else self.rng.choice(registered)
            running = self.rng.sample(flow.agents, self.rng.randint(0, 1))
            rest = [agent for agent in flow.agents if agent not in running]
            finished = self.rng.sample(rest, self.rng.randint(0 if running else 1, 2))
            body = {key: value for key, value in (("running", running), ("finished", finished)) if value}
            self.ops.append(Registry("PATCH", flow.workflow_id, body))
        elif registered and roll < 0.6:
            self._register(self.rng.choice(registered))  # the same graph again
        elif used := [flow for flow in self.flows if flow.used]:
            flow = self.last if recent and self.last.used else self.rng.choice(used)
            self.ops.append(Registry("DELETE", flow.workflow_id))
            flow.generation += 1
            flow.mode = self.rng.choice(MODES)
            flow.used = flow.registered = False
            flow.graph = None

    def _ttl_pause(self) -> None:
        """Sleep past the TTL (every workflow expires), then wake the cache with a hinted request."""
        self.ops.append(Pause(self.config.ttl + 1.5, past_ttl=True))
        for flow in self.flows:
            flow.registered = False
        flow, agent = self._pick()
        body = {"input_ids": self._prompt(flow, agent), "sampling_params": self._sampling()}
        body["kvflow"] = self._hint(flow, agent)
        self._calls([Request("/generate", body, **named(flow))])


def text(ids: list[int]) -> str:
    """Token ids as printable characters (one byte token each for the embedded tokenizer)."""
    return "".join(chr(32 + token % 95) for token in ids)


# ---- the run ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """One server's answer: ``outputs`` per prompt (None when aborted or not a 200)."""

    status: int
    outputs: list[Any] | None
    detail: str
    sent: float
    received: float


def outputs_of(path: str, data: Any) -> list[Any]:
    """Output token ids per prompt (the text for chat, which does not return ids)."""
    if path == "/generate":
        return [item["output_ids"] for item in (data if isinstance(data, list) else [data])]
    if path == "/v1/completions":
        return [choice["token_ids"] for choice in data["choices"]]
    return [choice["message"]["content"] for choice in data["choices"]]


def send(url: str, request: Request) -> Outcome:
    """Send one request (an ``abort`` one: read its first chunk, then close the connection)."""
    sent = time.monotonic()
    try:
        if request.abort:
            with requests.post(
                url + request.path, json=request.body, stream=True, timeout=TIMEOUT
            ) as response:
                if response.status_code == 200:
                    next(response.iter_content(chunk_size=None), None)
                    return Outcome(200, None, "", sent, time.monotonic())
                return Outcome(response.status_code, None, response.text[:300], sent, time.monotonic())
        response = requests.post(url + request.path, json=request.body, timeout=TIMEOUT)
    except requests.RequestException as error:
        return Outcome(0, None, repr(error), sent, time.monotonic())
    received = time.monotonic()
    if response.status_code != 200:
        return Outcome(response.status_code, None, response.text[:300], sent, received)
    return Outcome(200, outputs_of(request.path, response.json()), "", sent, received)


@dataclass
class Liveness:
    """What the client knows of a registered workflow's last touch on the server: in [sure, latest].

    The registry touches a workflow when a request naming it arrives (between
    its send and its answer), so the workflow is surely alive while an answer
    comes within the TTL of ``sure`` and surely gone once a call is sent more
    than the TTL after ``latest``.
    """

    sure: float = -inf
    latest: float = -inf

    def state(self, outcome: Outcome, ttl: float) -> str:
        if outcome.received - self.sure < ttl:
            return "alive"
        return "gone" if outcome.sent - self.latest > ttl else "unknown"

    def touch(self, outcome: Outcome) -> None:
        self.sure, self.latest = outcome.sent, outcome.received

    def forget(self) -> None:
        self.sure = self.latest = -inf


# Statuses each registry call may answer, by what the client knows of the workflow.
ALLOWED = {
    "POST": {"alive": {200}, "gone": {201}, "unknown": {200, 201}},
    "PATCH": {"alive": {200}, "gone": {404}, "unknown": {200, 404}},
    "DELETE": {"alive": {200}, "gone": {200, 404}, "unknown": {200, 404}},  # 200 when the cache knew it
}


@dataclass
class ChurnResult:
    """What a run counted and every failure it found (the run passes when there is none)."""

    config: ChurnConfig
    sent: int = 0  # generation requests per server
    completed: int = 0  # on both servers
    aborted: int = 0
    compared: int = 0  # outputs (one per prompt)
    mismatches: int = 0
    server_errors: int = 0  # 5xx and failed connections
    ttl_expiries: int = 0  # workflows the cache forgot after a pause past the TTL
    registry_expiries: int = 0
    registered: int = 0
    deleted: int = 0
    startup_seconds: float = 0.0
    churn_seconds: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def fail(self, message: str) -> None:
        self.failures.append(message)

    def summary(self) -> str:
        stats, parts = self.stats, []
        for tier, classes in stats.get("evictions", {}).items():
            counts = " ".join(f"{name} {c['nodes']}/{c['tokens']}" for name, c in classes.items())
            parts.append(f"{tier} {counts}")
        prefetch = " ".join(f"{name} {value}" for name, value in (stats.get("prefetch") or {}).items())
        totals = stats.get("totals", {})
        return (
            f"churn seed {self.config.seed}: {self.sent} requests per server, "
            f"{self.completed} completed on both, {self.aborted} aborted, {self.compared} outputs compared, "
            f"{self.mismatches} mismatches, {self.server_errors} server errors, "
            f"{len(self.failures)} failures; "
            f"TTL expiries {self.ttl_expiries} (registry {self.registry_expiries}); "
            f"workflows registered {self.registered}, deleted {self.deleted}; "
            f"kvflow stats: hinted_requests {totals.get('hinted_requests')}, "
            f"aborted_requests {totals.get('aborted_requests')}, "
            f"evictions (nodes/tokens) {', '.join(parts)}; "
            f"prefetch {prefetch}; start-up {self.startup_seconds:.0f}s, churn {self.churn_seconds:.0f}s"
        )


class Churn:
    """Sends the stream to both servers, op by op, and checks every answer."""

    def __init__(self, config: ChurnConfig, kvflow_url: str, stock_url: str) -> None:
        self.config = config
        self.urls = (kvflow_url, stock_url)
        self.result = ChurnResult(config)
        self.liveness: dict[str, Liveness] = {}
        self.hinted_at: dict[str, float] = {}  # per workflow, when its last admitted hint was sent
        self.idle_before: set[str] | None = None  # workflows tracked before a pause past the TTL
        # A background op runs on while the next ops are sent; it is checked before the next one
        # starts, before a pause past the TTL (which leaves the servers idle) and at the end.
        self.background: tuple[int, Calls, list[list[Future[Outcome]]]] | None = None

    def run(self, ops: list[Op], alive: Callable[[], bool]) -> ChurnResult:
        started = time.monotonic()
        with ThreadPoolExecutor(2 * (MAX_GROUP + 1)) as pool:  # a group and a background op
            for index, op in enumerate(ops):
                if not alive():
                    self.result.fail(f"op {index}: a server exited")
                    break
                if isinstance(op, Calls):
                    self._calls(index, op, pool)
                elif isinstance(op, Registry):
                    self._registry(index, op)
                else:
                    self._pause(index, op)
            self._settle()
        if alive():
            self.result.stats = self._get("/kvflow/stats") or {}
        self.result.churn_seconds = time.monotonic() - started
        return self.result

    def _ask(self, method: str, path: str, **kwargs: Any) -> tuple[Outcome, Any]:
        """One call to the kvflow server's own endpoints: its outcome, and its JSON when 200 or 201."""
        sent = time.monotonic()
        try:
            response = requests.request(method, self.urls[0] + path, timeout=TIMEOUT, **kwargs)
        except requests.RequestException as error:
            response = None
            outcome = Outcome(0, None, repr(error), sent, time.monotonic())
        else:
            outcome = Outcome(response.status_code, None, response.text[:300], sent, time.monotonic())
        self.result.server_errors += outcome.status >= 500 or outcome.status == 0
        return outcome, response.json() if outcome.status in (200, 201) else None

    def _get(self, path: str, **params: Any) -> Any:
        outcome, data = self._ask("GET", path, params=params)
        if data is None:
            self.result.fail(f"GET {path} {params}: {outcome.status} {outcome.detail!r}")
        return data

    def _tracked(self) -> set[str]:
        listing = self._get("/kvflow/stats", detail="workflows", limit=1024)
        return {item["workflow_id"] for item in listing["workflows"]["items"]} if listing else set()

    def _calls(self, index: int, op: Calls, pool: ThreadPoolExecutor) -> None:
        futures = [[pool.submit(send, url, request) for request in op.requests] for url in self.urls]
        if op.background:
            self._settle()
            self.background = (index, op, futures)
            return
        self._check(index, op, futures)
        if self.idle_before is not None:  # the wake-up request after a pause past the TTL
            tracked = self._tracked()
            survivors = (self.idle_before & tracked) - {op.requests[0].body["kvflow"]["workflow_id"]}
            if survivors:
                self.result.fail(
                    f"op {index}: workflows idle past the TTL still tracked: {sorted(survivors)}"
                )
            self.result.ttl_expiries += len(self.idle_before - tracked)
            self.idle_before = None

    def _settle(self) -> None:
        """Check the background op, once it has completed."""
        if self.background is not None:
            self._check(*self.background)
            self.background = None

    def _check(self, index: int, op: Calls, futures: list[list[Future[Outcome]]]) -> None:
        kvflow, stock = ([future.result() for future in row] for row in futures)
        result = self.result
        for request, mine, theirs in zip(op.requests, kvflow, stock, strict=True):
            result.sent += 1
            self._touched(request, mine)
            if mine.status != 200 or theirs.status != 200:
                result.server_errors += sum(o.status >= 500 or o.status == 0 for o in (mine, theirs))
                result.fail(
                    f"op {index} {request.path}: kvflow {mine.status} {mine.detail!r}, "
                    f"stock {theirs.status} {theirs.detail!r}; body {str(request.body)[:300]}"
                )
            elif request.abort:
                result.aborted += 1
            else:
                result.completed += 1
                result.compared += len(mine.outputs)
                if mine.outputs != theirs.outputs:
                    result.mismatches += 1
                    result.fail(
                        f"op {index} {request.path}: kvflow {mine.outputs} != stock {theirs.outputs}; "
                        f"body {request.body}"
                    )

    def _touched(self, request: Request, outcome: Outcome) -> None:
        """A request's hints reach the cache; one naming a registered workflow keeps it alive
        in the registry, if it still was when it arrived."""
        if outcome.status != 200:
            return
        for workflow_id in request.hinted:
            self.hinted_at[workflow_id] = outcome.sent
        for workflow_id in request.registered:
            view = self.liveness.setdefault(workflow_id, Liveness())
            state = view.state(outcome, self.config.ttl)
            if state == "alive":
                view.touch(outcome)
            elif state == "unknown":
                view.latest = outcome.received

    def _registry(self, index: int, op: Registry) -> None:
        path = "/kvflow/workflows" + ("" if op.method == "POST" else f"/{quote(op.workflow_id, safe='')}")
        outcome, _ = self._ask(op.method, path, json=op.body)
        view = self.liveness.setdefault(op.workflow_id, Liveness())
        state = view.state(outcome, self.config.ttl)
        if (
            op.method == "DELETE"
            and outcome.received - self.hinted_at.get(op.workflow_id, -inf) < self.config.ttl
        ):
            state = "alive"  # hinted within the TTL: the cache still tracks it
        if outcome.status not in ALLOWED[op.method][state]:
            self.result.fail(
                f"op {index} {op.method} {op.workflow_id} (client view: {state}): "
                f"{outcome.status} {outcome.detail!r}"
            )
        if op.method == "DELETE" or outcome.status == 404:
            view.forget()
        elif outcome.status in (200, 201):
            view.touch(outcome)
        self.result.registered += op.method == "POST" and outcome.status == 201
        self.result.deleted += op.method == "DELETE" and outcome.status == 200

    def _pause(self, index: int, op: Pause) -> None:
        if not op.past_ttl:
            time.sleep(op.seconds)
            return
        self._settle()
        self.idle_before = self._tracked()
        time.sleep(op.seconds)
        for workflow_id, view in self.liveness.items():
            if view.latest == -inf:
                continue
            outcome, _ = self._ask("GET", f"/kvflow/workflows/{quote(workflow_id, safe='')}")
            if outcome.status != 404:
                self.result.fail(f"op {index}: registered {workflow_id} idle past the TTL: {outcome.status}")
            self.result.registry_expiries += 1
            view.forget()


def check_server(name: str, server: ServerProcess, result: ChurnResult) -> None:
    """Alive, and no ``Traceback`` in its log."""
    if server.process.poll() is not None:
        result.fail(f"{name} server exited with {server.process.returncode}:\n{server.log_tail(20)}")
    log = server.log_path.read_text(errors="replace")
    if "Traceback" in log:
        start = log.index("Traceback")
        result.fail(f"{name} server log ({server.log_path}) has a Traceback:\n{log[start : start + 4000]}")


def run_churn(config: ChurnConfig, log_dir: Path | None = None) -> ChurnResult:
    """Start both servers side by side, send the stream to both, check them, stop them."""
    logs = {name: log_dir / f"churn-{name}.log" if log_dir else None for name in ("kvflow", "stock")}
    servers = {
        "kvflow": ServerProcess(config.kvflow_args(), log_path=logs["kvflow"]),
        "stock": ServerProcess(config.stock_args(), log_path=logs["stock"]),
    }
    started = time.monotonic()
    try:
        for server in servers.values():
            server.start()
        for server in servers.values():
            server.wait_ready()
        startup = time.monotonic() - started
        ops = StreamBuilder(config).build()
        churn = Churn(config, servers["kvflow"].url, servers["stock"].url)
        result = churn.run(ops, alive=lambda: all(s.process.poll() is None for s in servers.values()))
        result.startup_seconds = startup
        for name, server in servers.items():
            check_server(name, server, result)
    finally:
        for server in servers.values():
            server.stop()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=800, help="generation requests per server")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workflows", type=int, default=10)
    parser.add_argument("--ttl", type=float, default=ChurnConfig.ttl, help="--kvflow-hint-ttl, seconds")
    parser.add_argument("--pool-tokens", type=int, default=ChurnConfig.pool_tokens)
    parser.add_argument("--log-dir", type=Path, help="keep the server logs here")
    parser.add_argument("kvflow_extra", nargs="*", help="after --: more flags for the kvflow server")
    args = parser.parse_args(argv)
    config = ChurnConfig(
        requests=args.requests,
        seed=args.seed,
        workflows=args.workflows,
        ttl=args.ttl,
        pool_tokens=args.pool_tokens,
        kvflow_extra=tuple(args.kvflow_extra),
    )
    if args.log_dir:
        args.log_dir.mkdir(parents=True, exist_ok=True)
    result = run_churn(config, args.log_dir)
    for failure in result.failures[:MAX_DETAILS]:
        print(failure, file=sys.stderr)
    print(result.summary())
    return 1 if result.failures else 0


if __name__ == "__main__":
    sys.exit(main())
