"""Property-based fuzz of one real kvflow CPU server over loopback.

Hypothesis sends valid and hostile bodies, as raw JSON bytes, to every endpoint kvflow reads
hints on or adds: ``/generate`` (single and batch), ``/v1/chat/completions``, ``/v1/completions``,
``/kvflow/workflows`` and ``/kvflow/stats``. Every answer must be below 500, a refused hint (or
graph, frontier, query) must be a 400 naming its field, a valid one must be accepted, and after
every case the server must still answer a plain ``/generate`` and ``GET /kvflow/stats`` with 200.
The last test checks that the process is alive, answers at once and logged no traceback.

Runs are reproducible (``derandomize``). Shrinking is off: the server keeps state across cases,
and each case costs real requests. ``pytest -s`` prints the requests sent by endpoint and status.
"""

from __future__ import annotations

import itertools
import json
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import quote

import pytest
import requests
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from kvflow.harness.server_process import ServerProcess
from kvflow.hints import HINT_FIELDS, MAX_ID_LEN, MAX_STEPS_ENTRIES, MAX_STEPS_VALUE

pytestmark = pytest.mark.e2e

TIMEOUT = 30
HEADERS = {"Content-Type": "application/json"}
PLAIN = {"input_ids": list(range(40, 60)), "sampling_params": {"max_new_tokens": 1, "temperature": 0}}
OPENAI_PATHS = ("/v1/chat/completions", "/v1/completions")


class _Bulky:
    """A bulky value that Hypothesis prints by its size, not in full, in a failing case."""

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(f"<{type(self).__name__} of {len(self)}>")


class BulkyStr(_Bulky, str):
    pass


class BulkyDict(_Bulky, dict):
    pass


class BulkyList(_Bulky, list):
    pass


LONG = "x" * (MAX_ID_LEN + 1)
HUGE = BulkyStr("y" * 100_000)
LONE_SURROGATES = ("\ud800", "\udfff", "a\udc00b", "\udc00\ud800")
FULL_STEPS = BulkyDict({f"s{i}": i for i in range(MAX_STEPS_ENTRIES)})
OVERFULL_STEPS = BulkyDict({f"s{i}": i for i in range(MAX_STEPS_ENTRIES + 1)})
DEEP = 100_000

TALLY: Counter[tuple[str, int]] = Counter()  # requests sent, by endpoint and status
CASES: Counter[str] = Counter()  # cases run, by test
_registrations = itertools.count()


def fuzz(max_examples: int) -> settings:
    """Reproducible, bounded settings: real requests per case, no deadline, no shrinking."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        phases=(Phase.explicit, Phase.generate),
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )


@dataclass(frozen=True)
class Case:
    """A value to send and what a correct server does with it.

    ``bad`` is the field a refusal (400) must name, ``""`` for the value as a whole (named by
    where it was placed); None: the value is valid and must be accepted. ``may_pass`` marks
    values the spec leaves open (lone surrogates, null for an optional field): accepting them
    is fine too, as long as the server keeps serving.
    """

    value: Any
    bad: str | None = None
    may_pass: bool = False

    def placed(self, name: str) -> Case:
        """This case, its refusal as a whole named ``name``."""
        return replace(self, bad=name) if self.bad == "" else self


# ---- the server and the checks every case ends with ------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    args = ["--max-total-tokens", "4096", "--random-seed", "0", "--kvflow-learn-graph"]
    with ServerProcess(args) as process:
        yield process
    print_tally()


def print_tally() -> None:
    print(f"\nfuzz cases: {sum(CASES.values())} ({', '.join(f'{k} {n}' for k, n in sorted(CASES.items()))})")
    print("requests by endpoint and status:")
    for endpoint in sorted({endpoint for endpoint, _ in TALLY}):
        statuses = {status: n for (e, status), n in sorted(TALLY.items()) if e == endpoint}
        detail = ", ".join(f"{status}: {n}" for status, n in statuses.items())
        print(f"  {endpoint:<42} {sum(statuses.values()):>5}  ({detail})")


def send(
    server: ServerProcess, method: str, path: str, body: bytes | None = None, label: str | None = None
) -> requests.Response:
    """One request with ``body`` as is; counted under ``label`` (default: method and path)."""
    headers = HEADERS if body is not None else None
    response = requests.request(method, server.url + path, data=body, headers=headers, timeout=TIMEOUT)
    TALLY[(label or f"{method} {path}", response.status_code)] += 1
    return response


def still_serving(server: ServerProcess, test: str) -> None:
    """The server answers a plain request and its stats after a case of ``test``."""
    CASES[test] += 1
    plain = send(server, "POST", "/generate", encode(PLAIN), "check: POST /generate")
    assert plain.status_code == 200, f"plain /generate after the case: {plain.status_code} {plain.text[:500]}"
    stats = send(server, "GET", "/kvflow/stats", label="check: GET /kvflow/stats")
    assert stats.status_code == 200, f"/kvflow/stats after the case: {stats.status_code} {stats.text[:500]}"


def encode(body: Any, escaped: Sequence[str] = ()) -> bytes:
    """ASCII JSON (a lone surrogate becomes ``\\ud800``); each word of ``escaped`` has its first
    letter written as a ``\\u`` escape wherever it occurs, which leaves the document the same."""
    raw = json.dumps(body, ensure_ascii=True).encode()
    for word in escaped:
        raw = raw.replace(word.encode(), b"\\u%04x" % ord(word[0]) + word[1:].encode())
    return raw


def describe(body: bytes) -> str:
    """A body's size and first bytes, for assertion messages."""
    return f"{len(body)}-byte body {body[:300]!r}{'...' if len(body) > 300 else ''}"


def names_field(response: requests.Response, field: str) -> bool:
    """Whether the JSON error's ``param`` or ``message`` names ``field``."""
    try:
        doc = response.json()
    except ValueError:
        return False
    error = doc.get("error", doc) if isinstance(doc, dict) else None
    if not isinstance(error, dict):
        return False
    return any(isinstance(error.get(key), str) and field in error[key] for key in ("param", "message"))


def check_answer(
    response: requests.Response,
    body: bytes,
    cases: Sequence[Case],
    accepted: int = 200,
    streamed: bool = False,
) -> None:
    """``response`` is what a correct server answers to ``body``, which carries ``cases``."""
    context = f"HTTP {response.status_code} for {describe(body)} -> {response.text[:500]!r}"
    assert response.status_code < 500, context
    refusable = [case for case in cases if case.bad is not None]
    if not refusable:
        assert response.status_code == accepted, context
        assert not (streamed and '"error"' in response.text), context
        return
    fields = [case.bad for case in refusable]
    if response.status_code == accepted:
        if all(case.may_pass for case in refusable):
            return
        if streamed and any(field in response.text for field in fields):
            return  # refused after tokenization: an error event in the stream
    assert response.status_code == 400 and any(names_field(response, f) for f in fields), (
        f"expected a 400 naming one of {fields}; {context}"
    )


def item_path(workflow_id: str, keep_slashes: bool = False) -> str:
    """``/kvflow/workflows/{id}``, percent-encoded (dots too, so that no client folds ``..``)."""
    raw = workflow_id.encode("utf-8", "surrogatepass")
    return "/kvflow/workflows/" + quote(raw, safe="/" if keep_slashes else "").replace(".", "%2E")


def unused_name(taken: Sequence[str], stem: str = "ghost") -> str:
    """``stem`` plus the first number that makes a name not in ``taken``."""
    return next(name for i in itertools.count() if (name := f"{stem}{i}") not in taken)


# ---- hints ---------------------------------------------------------------------------------

TEXT = st.text(st.characters(codec="utf-8"), max_size=24)
CONTROL_CHARACTERS = [chr(c) for c in (*range(32), 127)]  # refused in ids: no route could name them
ID_CHARACTERS = st.characters(codec="utf-8", exclude_characters=CONTROL_CHARACTERS)
IDS = st.one_of(
    st.sampled_from(["fz-0", "fz-1", "fz:a", "fz:b", "review:42", "a/b", "w" * MAX_ID_LEN]),
    st.text(ID_CHARACTERS, min_size=1, max_size=24),
)
NON_STRINGS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
NON_INTEGERS = st.one_of(
    st.booleans(),
    st.floats(allow_nan=False).filter(lambda x: not x.is_integer()),
    st.text(max_size=4),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
SCALARS = st.one_of(st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8))
NON_OBJECTS = st.one_of(st.none(), SCALARS, st.lists(st.integers(), max_size=3))
ESCAPES = st.sampled_from(
    [
        (),
        ("kvflow",),
        ("kvflow", "custom_params", "sampling_params", "kv_hints", "actions", "action_type", "payload")
        + HINT_FIELDS,
    ]
)
PROMPT_IDS = st.lists(st.integers(1, 255), min_size=1, max_size=48)  # SGLang: prompt [0] is empty
TEXTS = st.one_of(
    st.just("You are the fuzzing agent. Answer briefly."),
    st.text(st.characters(codec="utf-8"), min_size=1, max_size=40),
)


def _valid(draw, hint: dict, too_long: int) -> Case:
    return Case(hint)


def _full_steps(draw, hint: dict, too_long: int) -> Case:
    return Case({**hint, "workflow_id": "fz-full", "steps_to_execution": FULL_STEPS})


def _not_an_object(draw, hint: dict, too_long: int) -> Case:
    value = draw(st.one_of(NON_OBJECTS, st.just(json.dumps(hint))))  # the hint as a JSON string, too
    return Case(value, "", may_pass=value is None)


def _missing_id(draw, hint: dict, too_long: int) -> Case:
    field = draw(st.sampled_from(["workflow_id", "agent_id"]))
    return Case({k: v for k, v in hint.items() if k != field}, field)


def _bad_id(draw, hint: dict, too_long: int) -> Case:
    field = draw(st.sampled_from(["workflow_id", "agent_id"]))
    return Case({**hint, field: draw(st.one_of(NON_STRINGS, st.sampled_from(["", LONG, HUGE])))}, field)


def _lone_surrogate(draw, hint: dict, too_long: int) -> Case:
    field = draw(st.sampled_from(["workflow_id", "agent_id", "steps_to_execution"]))
    text = draw(st.sampled_from(LONE_SURROGATES))
    return Case({**hint, field: {text: 1} if field == "steps_to_execution" else text}, field, may_pass=True)


def _control_character(draw, hint: dict, too_long: int) -> Case:
    field = draw(st.sampled_from(["workflow_id", "agent_id", "steps_to_execution"]))
    text = "id" + draw(st.sampled_from(CONTROL_CHARACTERS)) + "x"
    return Case({**hint, field: {text: 1} if field == "steps_to_execution" else text}, field)


def _bad_prefix_len(draw, hint: dict, too_long: int) -> Case:
    value = draw(
        st.one_of(st.integers(max_value=-1), st.integers(min_value=too_long), NON_INTEGERS, st.none())
    )
    return Case({**hint, "fixed_prefix_len": value}, "fixed_prefix_len", may_pass=value is None)


def _bad_steps(draw, hint: dict, too_long: int) -> Case:
    bad_value = st.one_of(
        st.integers(max_value=-1), st.integers(min_value=MAX_STEPS_VALUE + 1), NON_INTEGERS, st.none()
    )
    steps = draw(
        st.one_of(
            NON_OBJECTS,
            st.dictionaries(IDS, bad_value, min_size=1, max_size=1),
            st.sampled_from([{"": 1}, {LONG: 1}, OVERFULL_STEPS]),
        )
    )
    return Case({**hint, "steps_to_execution": steps}, "steps_to_execution", may_pass=steps is None)


def _unknown_field(draw, hint: dict, too_long: int) -> Case:
    key = draw(st.one_of(st.sampled_from(["workflowId", "Agent_id", "kvflow", "steps"]), TEXT))
    if key in HINT_FIELDS:
        return Case(hint)
    return Case({**hint, key: draw(NON_OBJECTS)}, key)


HINT_FLAWS = (
    _valid,
    _valid,
    _valid,
    _full_steps,
    _not_an_object,
    _missing_id,
    _bad_id,
    _lone_surrogate,
    _control_character,
    _bad_prefix_len,
    _bad_steps,
    _unknown_field,
)


@st.composite
def hints(draw, bound: int, too_long: int) -> Case:
    """A valid hint or one with a single flaw, for prompts of ``bound`` to ``too_long - 1`` tokens."""
    hint: dict[str, Any] = {"workflow_id": draw(IDS), "agent_id": draw(IDS)}
    if draw(st.booleans()):
        hint["fixed_prefix_len"] = draw(st.integers(0, bound))
    if draw(st.booleans()):
        hint["steps_to_execution"] = draw(st.dictionaries(IDS, st.integers(0, MAX_STEPS_VALUE), max_size=4))
    return draw(st.sampled_from(HINT_FLAWS))(draw, hint, too_long)


def with_hint(body: dict, hint: Any, placement: str) -> str:
    """Put ``hint`` where ``placement`` says (README "Workflow hints"); return its name as a whole."""
    if placement == "kvflow":
        body["kvflow"] = hint
    elif placement == "custom_params.kvflow":
        body["custom_params"] = {"kvflow": hint}
    elif placement == "sampling_params.custom_params.kvflow":
        body["sampling_params"]["custom_params"] = {"kvflow": hint}
    else:
        action = {"action_id": "1", "action_type": "kvflow", "action_version": "1", "payload": hint}
        body["kv_hints"] = {"protocol_version": "1", "message_id": "m", "actions": [action]}
        return "payload"
    return "kvflow"


@st.composite
def prompts(draw) -> tuple[dict, int, int]:
    """A ``/generate`` prompt (token ids or text), its length, and a length beyond it."""
    if draw(st.booleans()):
        ids = draw(PROMPT_IDS)
        return {"input_ids": ids}, len(ids), len(ids) + 1
    text = draw(TEXTS)
    length = len(text.encode())  # the embedded tokenizer is byte-level, one token per byte
    return {"text": text}, length, length + 1


@st.composite
def generate_requests(draw) -> tuple[dict, list[Case], bool]:
    """A single ``/generate`` body, the hint it carries (if any) and whether it streams."""
    body, bound, too_long = draw(prompts())
    body["sampling_params"] = {"max_new_tokens": draw(st.integers(1, 3)), "temperature": 0}
    streamed = draw(st.booleans())
    if streamed:
        body["stream"] = True
    placement = draw(st.sampled_from([None, "kvflow", "sampling_params.custom_params.kvflow", "kv_hints"]))
    if placement is None:
        return body, [], streamed
    hint = draw(hints(bound, too_long))
    return body, [hint.placed(with_hint(body, hint.value, placement))], streamed


@st.composite
def openai_requests(draw) -> tuple[str, dict, list[Case], bool]:
    """An OpenAI endpoint, a body for it, the hint it carries (if any) and whether it streams."""
    path = draw(st.sampled_from(OPENAI_PATHS))
    text = draw(TEXTS)
    length = len(text.encode())
    if path == "/v1/chat/completions":
        # The chat template adds tokens around the message: its content bounds the prompt from below.
        body: dict[str, Any] = {"messages": [{"role": "user", "content": text}]}
        bound, too_long = length, length + 10_000
    elif draw(st.booleans()):
        ids = draw(PROMPT_IDS)
        body, bound, too_long = {"prompt": ids}, len(ids), len(ids) + 1
    else:
        body, bound, too_long = {"prompt": text}, length, length + 1
    body.update(model="default", max_tokens=draw(st.integers(1, 3)), temperature=0)
    streamed = draw(st.booleans())
    if streamed:
        body["stream"] = True
    placement = draw(st.sampled_from([None, "kvflow", "custom_params.kvflow"]))
    if placement is None:
        return path, body, [], streamed
    hint = draw(hints(bound, too_long))
    return path, body, [hint.placed(with_hint(body, hint.value, placement))], streamed


@st.composite
def batch_requests(draw) -> tuple[dict, list[Case | None]]:
    """A batch ``/generate`` body and the hint each prompt carries (None: none).

    Either one top-level hint for every prompt, or each prompt's own in its ``sampling_params``.
    Valid hints get a workflow of their own per prompt (``fz-batch-<i>``), so that the stats show
    which prompt's hint reached the cache.
    """
    texts = draw(st.booleans())
    items = draw(st.lists(TEXTS if texts else PROMPT_IDS, min_size=2, max_size=3))
    lengths = [len(item.encode()) if texts else len(item) for item in items]
    body: dict[str, Any] = {
        "text" if texts else "input_ids": items,
        "sampling_params": [{"max_new_tokens": 1, "temperature": 0} for _ in items],
    }
    if draw(st.booleans()):
        hint = draw(hints(min(lengths), max(lengths) + 1))
        if hint.bad is None:
            hint = replace(hint, value={**hint.value, "workflow_id": "fz-batch-shared"})
        body["kvflow"] = hint.value
        return body, [hint.placed("kvflow")] * len(items)
    own: list[Case | None] = []
    for i, (params, length) in enumerate(zip(body["sampling_params"], lengths, strict=True)):
        hint = draw(st.none() | hints(length, length + 1))
        if hint is not None:
            if hint.bad is None:
                hint = replace(hint, value={**hint.value, "workflow_id": f"fz-batch-{i}"})
            params["custom_params"] = {"kvflow": hint.value}
            hint = hint.placed("kvflow")
        own.append(hint)
    return body, own


def agent_counters(server: ServerProcess, workflow_id: str) -> dict[str, Any]:
    """The cache's counters of one workflow's agents, page by page (``GET /kvflow/stats?workflow_id=``)."""
    agents: dict[str, Any] = {}
    offset = 0
    while True:
        query = f"workflow_id={quote(workflow_id, safe='')}&offset={offset}&limit={MAX_STEPS_ENTRIES}"
        response = send(server, "GET", f"/kvflow/stats?{query}", label="GET /kvflow/stats?workflow_id=")
        assert response.status_code == 200, f"stats of {workflow_id!r}: {response.text[:500]}"
        page = response.json().get("workflow") or {}
        agents.update(page.get("agents", {}))
        offset += len(page.get("agents", {}))
        if not page.get("agents") or offset >= page["total"]:
            return agents


def check_each_hint_counted(server: ServerProcess, raw: bytes, item_hints: list[Case | None]) -> None:
    """Each valid hint's agent was invoked once per prompt carrying it; then end its workflow."""
    expected: dict[str, Counter[str]] = {}
    for hint in item_hints:
        if hint is not None and hint.bad is None:
            expected.setdefault(hint.value["workflow_id"], Counter())[hint.value["agent_id"]] += 1
    for workflow_id, wanted in sorted(expected.items()):
        counters = agent_counters(server, workflow_id)
        got = {agent: counters.get(agent, {}).get("invocations") for agent in wanted}
        assert got == dict(wanted), (
            f"{workflow_id}: invocations {got}, expected {dict(wanted)}; {describe(raw)}"
        )
        ended = send(server, "DELETE", item_path(workflow_id), label="DELETE /kvflow/workflows/{id}")
        assert ended.status_code == 200, f"DELETE {workflow_id}: {ended.status_code} {ended.text[:500]}"


def hinted_generate(
    hint: Any, bad: str | None = None, may_pass: bool = False
) -> tuple[dict, list[Case], bool]:
    """An explicit ``/generate`` case: three prompt tokens and a top-level ``hint``."""
    body = {
        "input_ids": [1, 2, 3],
        "sampling_params": {"max_new_tokens": 1, "temperature": 0},
        "kvflow": hint,
    }
    return body, [Case(hint, bad, may_pass)], False


@fuzz(150)
@example(request=hinted_generate({"workflow_id": 7, "agent_id": "a"}, "workflow_id"), escaped=("kvflow",))
@example(request=hinted_generate({"workflow_id": "\ud800", "agent_id": "a"}, "workflow_id", True), escaped=())
@example(
    request=hinted_generate({"workflow_id": "w", "agent_id": "a", "fixed_prefix_len": 4}, "fixed_prefix_len"),
    escaped=(),
)
@given(request=generate_requests(), escaped=ESCAPES)
def test_generate_hints(server, request, escaped):
    body, cases, streamed = request
    raw = encode(body, escaped)
    check_answer(send(server, "POST", "/generate", raw), raw, cases, streamed=streamed)
    still_serving(server, "generate")


@fuzz(120)
@given(request=openai_requests(), escaped=ESCAPES)
def test_openai_hints(server, request, escaped):
    path, body, cases, streamed = request
    raw = encode(body, escaped)
    check_answer(send(server, "POST", path, raw), raw, cases, streamed=streamed)
    still_serving(server, "openai")


def own_hints_batch(*hints: Case) -> tuple[dict, list[Case | None]]:
    """An explicit batch ``/generate`` case: one prompt per hint, each carrying its own."""
    params = [{"max_new_tokens": 1, "custom_params": {"kvflow": hint.value}} for hint in hints]
    return {"input_ids": [[1, 2, 3 + i] for i in range(len(hints))], "sampling_params": params}, list(hints)


@fuzz(80)
@example(
    request=own_hints_batch(
        Case({"workflow_id": "fz-batch-0", "agent_id": "a"}),
        Case({"workflow_id": "fz-batch-1", "agent_id": "b"}),
    ),
    escaped=(),
)
@example(
    request=own_hints_batch(
        Case({"workflow_id": "fz-batch-0", "agent_id": "a"}),
        Case({"workflow_id": 7, "agent_id": "b"}, "workflow_id"),
    ),
    escaped=(),
)
@given(request=batch_requests(), escaped=ESCAPES)
def test_batch_generate_applies_each_prompts_own_hint(server, request, escaped):
    body, item_hints = request
    raw = encode(body, escaped)
    response = send(server, "POST", "/generate", raw, "POST /generate (batch)")
    check_answer(response, raw, [hint for hint in item_hints if hint is not None])
    if response.status_code == 200:
        check_each_hint_counted(server, raw, item_hints)
    still_serving(server, "batch")


# ---- registered workflows --------------------------------------------------------------------

AGENT_IDS = st.one_of(
    st.sampled_from(["planner", "coder", "reviewer", "tool", "a/b", "x" * MAX_ID_LEN]),
    st.text(ID_CHARACTERS, min_size=1, max_size=16),
)
ID_SUFFIXES = st.one_of(
    st.sampled_from(["", "a/b", "a%2Fb", "x?y#z", "..", "100%", " "]), st.text(ID_CHARACTERS, max_size=24)
)


def fresh_workflow_id(suffix: str) -> str:
    return f"reg-{next(_registrations)}-{suffix}"


@st.composite
def graphs(draw) -> dict:
    """A valid Agent Step Graph document: cycles, self-loops and declared joins included."""
    agents = draw(st.lists(AGENT_IDS, min_size=1, max_size=6, unique=True))
    edges = draw(
        st.lists(st.tuples(st.sampled_from(agents), st.sampled_from(agents)), max_size=10, unique=True)
    )
    targets = {dst for _, dst in edges}
    docs = []
    for agent in agents:
        join = draw(st.sampled_from([None, "and", "or"])) if agent in targets else None
        docs.append({"id": agent} if join is None else {"id": agent, "join": join})
    return {"agents": docs, "edges": [list(edge) for edge in edges]}


def _g_valid(draw, body: dict) -> Case:
    return Case(body)


def _g_bad_workflow_id(draw, body: dict) -> Case:
    if draw(st.booleans()):
        return Case({"graph": body["graph"]}, "workflow_id")
    return Case(
        {**body, "workflow_id": draw(st.one_of(NON_STRINGS, st.sampled_from(["", LONG, HUGE])))},
        "workflow_id",
    )


def _g_unknown_field(draw, body: dict) -> Case:
    key = draw(st.one_of(st.just("kvflow"), TEXT))
    if key in body:
        return Case(body)
    return Case({**body, key: draw(NON_OBJECTS)}, key)


def _g_lone_surrogate(draw, body: dict) -> Case:
    text = draw(st.sampled_from(LONE_SURROGATES))
    if draw(st.booleans()):
        return Case({**body, "workflow_id": body["workflow_id"] + text}, "workflow_id", may_pass=True)
    graph = body["graph"]
    return Case(
        {**body, "graph": {**graph, "agents": [*graph["agents"], {"id": text}]}}, "graph", may_pass=True
    )


def _g_control_character(draw, body: dict) -> Case:
    text = "id" + draw(st.sampled_from(CONTROL_CHARACTERS)) + "x"
    if draw(st.booleans()):
        return Case({**body, "workflow_id": body["workflow_id"] + text}, "workflow_id")
    graph = body["graph"]
    return Case({**body, "graph": {**graph, "agents": [*graph["agents"], {"id": text}]}}, "graph")


def _g_not_a_graph(draw, body: dict) -> Case:
    if draw(st.booleans()):
        return Case({"workflow_id": body["workflow_id"]}, "graph")
    graph = body["graph"]
    variants = [
        json.dumps(graph),
        {},
        {"agents": graph["agents"]},
        {"edges": graph["edges"]},
        {**graph, "join": "and"},
        {"agents": [], "edges": []},
    ]
    return Case({**body, "graph": draw(st.one_of(NON_OBJECTS, st.sampled_from(variants)))}, "graph")


def _g_bad_agents(draw, body: dict) -> Case:
    graph = body["graph"]
    bad_item = st.one_of(
        NON_OBJECTS,
        st.fixed_dictionaries({"id": st.one_of(NON_STRINGS, st.sampled_from(["", LONG, HUGE]))}),
        # no id, an unknown field, a duplicate
        st.sampled_from([{"name": "x"}, {"id": "extra", "colour": 1}, graph["agents"][0]]),
        st.fixed_dictionaries(
            {"id": st.just("joined"), "join": st.one_of(st.sampled_from(["xor", "AND", ""]), NON_STRINGS)}
        ),
    )
    if draw(st.booleans()):
        agents = [*graph["agents"], draw(bad_item)]
    else:
        agents = draw(st.one_of(st.booleans(), st.integers(), st.text(max_size=8), st.just({"id": "a"})))
    return Case({**body, "graph": {**graph, "agents": agents}}, "graph.agents")


def _g_too_many_agents(draw, body: dict) -> Case:
    count = draw(st.sampled_from([65, 1025]))  # past --kvflow-max-agents (64), past the cap (1024)
    graph = {"agents": BulkyList({"id": f"a{i}"} for i in range(count)), "edges": []}
    return Case({**body, "graph": graph}, "graph.agents")


def _g_join_without_predecessors(draw, body: dict) -> Case:
    graph = body["graph"]
    lonely = unused_name([agent["id"] for agent in graph["agents"]], "lonely")
    join = draw(st.sampled_from(["and", "or"]))
    return Case(
        {**body, "graph": {**graph, "agents": [*graph["agents"], {"id": lonely, "join": join}]}}, "graph"
    )


def _g_bad_edges(draw, body: dict) -> Case:
    graph = body["graph"]
    first = graph["agents"][0]["id"]
    ghost = unused_name([agent["id"] for agent in graph["agents"]])
    bad_edge = st.one_of(
        NON_OBJECTS,
        st.sampled_from([[first], [first, first, first], [first, ghost], [ghost, first], {first: first}]),
        st.lists(NON_STRINGS, min_size=2, max_size=2),
    )
    if draw(st.booleans()):
        edges = [*graph["edges"], draw(bad_edge)]
    else:
        not_a_list = st.one_of(st.booleans(), st.integers(), st.text(max_size=8), st.just({first: first}))
        duplicates = st.sampled_from([[[first, first], [first, first]], BulkyList([[first, first]] * 4097)])
        edges = draw(st.one_of(not_a_list, duplicates))
    return Case({**body, "graph": {**graph, "edges": edges}}, "graph.edges")


GRAPH_FLAWS = (
    _g_valid,
    _g_valid,
    _g_valid,
    _g_bad_workflow_id,
    _g_unknown_field,
    _g_lone_surrogate,
    _g_control_character,
    _g_not_a_graph,
    _g_bad_agents,
    _g_too_many_agents,
    _g_join_without_predecessors,
    _g_bad_edges,
)


@st.composite
def registrations(draw) -> tuple[Case, Case | None, str | None]:
    """A ``POST /kvflow/workflows`` body under a fresh workflow id, valid or with one flaw; for a
    valid one, a ``PATCH`` body and the agent of a request to send (maybe not in the graph)."""
    body = {"workflow_id": draw(st.builds(fresh_workflow_id, ID_SUFFIXES)), "graph": draw(graphs())}
    case = draw(st.sampled_from(GRAPH_FLAWS))(draw, body)
    if case.bad is not None:
        return case, None, None
    agents = [agent["id"] for agent in case.value["graph"]["agents"]]
    return case, draw(frontiers(agents)), draw(st.sampled_from([*agents, unused_name(agents)]))


@st.composite
def frontiers(draw, agents: list[str]) -> Case:
    """A ``PATCH`` body for a workflow of ``agents``: valid, or with one flaw."""
    picked = draw(st.lists(st.sampled_from(agents), unique=True))
    half = len(picked) // 2
    ghost = unused_name(agents)
    return draw(
        st.sampled_from(
            [
                Case({"running": picked}),
                Case({"finished": picked}),
                Case({"running": picked[:half], "finished": picked[half:]}),
                Case({"running": agents[:1], "finished": agents[:1]}, "finished"),
                Case({}, "body"),
                Case([picked], "body"),
                Case({"runing": picked}, "runing"),
                Case({"running": agents[0]}, "running"),
                Case({"finished": [ghost]}, "finished"),
                Case({"running": [1]}, "running"),
            ]
        )
    )


def same_graph(a: dict, b: dict) -> bool:
    def key(doc: dict) -> tuple[set, set]:
        return {(agent["id"], agent.get("join")) for agent in doc["agents"]}, {tuple(e) for e in doc["edges"]}

    return key(a) == key(b)


CYCLE = {"agents": [{"id": "a"}, {"id": "b"}], "edges": [["a", "b"], ["b", "a"]]}


@fuzz(100)
@example(registration=(Case({"workflow_id": "reg-cycle", "graph": CYCLE}), Case({"running": ["b"]}), "a"))
@example(
    registration=(
        Case(
            {"workflow_id": "reg-long-agent", "graph": {"agents": [{"id": LONG}], "edges": []}},
            "graph.agents",
        ),
        None,
        None,
    )
)
@given(registration=registrations())
def test_workflow_registry(server, registration):
    case, frontier, agent = registration
    raw = encode(case.value)
    response = send(server, "POST", "/kvflow/workflows", raw)
    check_answer(response, raw, [case.placed("body")], accepted=201)
    if response.status_code == 201:
        if case.bad is None:
            exercise_registered(server, raw, case.value, frontier, agent)
        else:  # an open case the server accepted: it must still describe and end it
            for method in ("GET", "DELETE"):
                label = f"{method} /kvflow/workflows/{{id}}"
                answer = send(server, method, item_path(case.value["workflow_id"]), label=label)
                assert answer.status_code < 500, (
                    f"{method} after registering {describe(raw)}: {answer.text[:500]}"
                )
    still_serving(server, "registry")


def exercise_registered(server: ServerProcess, raw: bytes, body: dict, frontier: Case, agent: str) -> None:
    """Register again, inspect, move the frontier, send a request as ``agent`` and end the workflow."""
    workflow_id, graph = body["workflow_id"], body["graph"]
    item = item_path(workflow_id)
    again = send(server, "POST", "/kvflow/workflows", raw)
    assert again.status_code == 200, (
        f"registering {describe(raw)} again: {again.status_code} {again.text[:500]}"
    )
    for path in sorted({item, item_path(workflow_id, keep_slashes=True)}):  # ids may hold "/", encoded or not
        got = send(server, "GET", path, label="GET /kvflow/workflows/{id}")
        assert got.status_code == 200 and same_graph(got.json()["graph"], graph), (
            f"GET {path}: {got.text[:500]}"
        )

    patch = encode(frontier.value)
    check_answer(send(server, "PATCH", item, patch, "PATCH /kvflow/workflows/{id}"), patch, [frontier])

    hinted = encode({**PLAIN, "kvflow": {"workflow_id": workflow_id, "agent_id": agent}})
    in_graph = agent in {item["id"] for item in graph["agents"]}
    check_answer(
        send(server, "POST", "/generate", hinted), hinted, [Case(agent, None if in_graph else "agent_id")]
    )

    for method, status in (("DELETE", 200), ("GET", 404), ("DELETE", 404)):
        answer = send(server, method, item, label=f"{method} /kvflow/workflows/{{id}}")
        assert answer.status_code == status, f"{method} {item}: {answer.status_code} {answer.text[:500]}"


# ---- stats queries ---------------------------------------------------------------------------

PLAIN_QUERIES = (
    "",
    "workflow_id=fz-0",
    "detail=workflows",
    "detail=workflows&offset=0&limit=10",
    f"workflow_id=fz-full&offset=1000&limit={MAX_STEPS_ENTRIES}",
)
QUERY_KEYS = st.sampled_from(["workflow_id", "detail", "offset", "limit", "agent_id", "OFFSET", "", "page"])
QUERY_VALUES = st.one_of(
    st.one_of(
        st.sampled_from(
            ["", "0", "1", "1024", "1025", "-1", "2147483648", "2147483649", "9" * 30, "1e3", "0x10", " 1"]
            + ["\uff11", "NaN", "workflows", "fz-0", "fz-full", LONG]
        ),
        TEXT,
    ).map(lambda value: quote(value, safe="")),
    st.sampled_from(["%ED%A0%80", "%FF", "%", "%zz", "a%00b", "%2F"]),  # sent as is
)


@fuzz(60)
@given(
    pairs=st.one_of(st.sampled_from(PLAIN_QUERIES), st.lists(st.tuples(QUERY_KEYS, QUERY_VALUES), max_size=4))
)
def test_stats_queries(server, pairs):
    query = (
        pairs
        if isinstance(pairs, str)
        else "&".join(f"{quote(key, safe='')}={value}" for key, value in pairs)
    )
    response = send(server, "GET", f"/kvflow/stats?{query}", label="GET /kvflow/stats?<query>")
    context = f"GET /kvflow/stats?{query}: {response.status_code} {response.text[:500]!r}"
    assert response.status_code < 500, context
    if isinstance(pairs, str):
        assert response.status_code == 200, context
    elif response.status_code == 400:
        assert any(names_field(response, key) for key, _ in pairs), context
    still_serving(server, "stats")


# ---- hostile bodies ----------------------------------------------------------------------------

# Both left open: more fields may follow before the closing braces.
HINT = b'{"workflow_id": "fz-raw", "agent_id": "a"'
HINTED = b'{"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 1}, "kvflow": ' + HINT + b"}"
NESTED = b"[" * DEEP + b"]" * DEEP
TARGETS = (
    ("POST", "/generate"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/kvflow/workflows"),
    ("PATCH", "/kvflow/workflows/fz-raw"),
)
TARGET_IDS = ("generate", "chat", "completions", "register", "patch")
HOSTILE_BODIES = {
    "deep-hint": b'{"kvflow": ' + NESTED + b"}",
    "deep-beside-hint": HINTED + b', "x": ' + NESTED + b"}",
    "deep-beside-escaped-hint": HINTED.replace(b"kvflow", b"\\u006bvflow") + b', "x": ' + NESTED + b"}",
    "deep-objects-hint": b'{"kvflow": ' + b'{"a": ' * DEEP + b"1" + b"}" * DEEP + b"}",
    "deep-no-hint": NESTED,
    "deep-1000-hint": b'{"kvflow": ' + b"[" * 1000 + b"]" * 1000 + b"}",
    "deep-graph": b'{"workflow_id": "fz-deep", "graph": ' + NESTED + b"}",
    "deep-frontier": b'{"running": ' + NESTED + b"}",
    "empty": b"",
    "null": b"null",
    "list-of-hinted": b"[" + HINTED + b"}]",
    "string-kvflow": b'"kvflow"',
    "bare-kvflow": b"kvflow",
    "unterminated": HINTED,
    "no-value": b'{"kvflow": }',
    "infinity-steps": HINTED[:-1] + b', "steps_to_execution": {"a": Infinity}}}',
    "nan-prefix-len": HINTED[:-1] + b', "fixed_prefix_len": NaN}}',
    "5000-digits": HINTED[:-1] + b', "fixed_prefix_len": ' + b"9" * 5000 + b"}}",
    "5000-digit-steps": HINTED[:-1] + b', "steps_to_execution": {"a": ' + b"9" * 5000 + b"}}}",
    "1e400": HINTED[:-1] + b', "fixed_prefix_len": 1e400}}',
    "nan-pause": HINTED[:-1] + b', "expected_pause_s": NaN}}',
    "1e400-pause": HINTED[:-1] + b', "expected_pause_s": 1e400}}',
    "bom": b"\xef\xbb\xbf" + HINTED + b"}",
    "invalid-utf8-id": HINTED.replace(b'"a"', b'"\xff\xfe"') + b"}",
    "invalid-utf8-outside": HINTED + b"\xff}",
    "duplicate-kvflow": HINTED + b', "kvflow": 7}',
    "trailing-garbage": HINTED + b"} trailing",
    "escaped-key-invalid": b'{"input_ids": [1, 2], "\\u006bvflow": {"workflow_id": 7, "agent_id": "a"}}',
    "escaped-key-custom-params": (
        b'{"input_ids": [1], "sampling_params": {"custom_params": {"\\u006bvflow": 1}}}'
    ),
    "forged-transport": (
        b'{"input_ids": [1], "sampling_params": {"custom_params": {"kvflow": "{\\"a\\": 1}"}}}'
    ),
    "surrogate-text": b'{"text": "\\ud800", "sampling_params": {"max_new_tokens": 1}, "kvflow": '
    + HINT
    + b"}}",
    "surrogate-chat": (
        b'{"model": "default", "messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 1, '
        b'"kvflow": ' + HINT + b"}}"
    ),
    "surrogate-prompt": b'{"model": "default", "prompt": "\\udfff", "max_tokens": 1, "kvflow": '
    + HINT
    + b"}}",
    "surrogate-workflow-id": b'{"workflow_id": "\\ud800", "graph": {"agents": [{"id": "a"}], "edges": []}}',
}


@pytest.fixture(scope="module")
def raw_workflow(server: ServerProcess) -> None:
    """``fz-raw`` registered, so that hostile ``PATCH`` bodies reach the body parser."""
    graph = {"agents": [{"id": "a"}, {"id": "b"}], "edges": [["a", "b"], ["b", "a"]]}
    body = encode({"workflow_id": "fz-raw", "graph": graph})
    assert send(server, "POST", "/kvflow/workflows", body).status_code in (200, 201)


@pytest.mark.parametrize("name", sorted(HOSTILE_BODIES))
@pytest.mark.parametrize(("method", "path"), TARGETS, ids=TARGET_IDS)
def test_hostile_body_is_not_a_5xx(server, raw_workflow, method, path, name):
    body = HOSTILE_BODIES[name]
    response = send(server, method, path, body)
    assert response.status_code < 500, (
        f"{method} {path} {name}: HTTP {response.status_code} {response.text[:500]!r}"
    )
    still_serving(server, "hostile body")


@fuzz(80)
@given(
    target=st.sampled_from(TARGETS),
    body=st.one_of(
        st.integers(0, len(HINTED)).map(lambda n: HINTED[:n]),  # truncated
        st.binary(max_size=64).map(lambda junk: b'{"kvflow": ' + junk),
        st.binary(max_size=64).map(lambda junk: HINTED[:-1] + b", " + junk),
        st.binary(max_size=64),
    ),
)
def test_junk_bodies(server, raw_workflow, target, body):
    method, path = target
    response = send(server, method, path, body)
    assert response.status_code < 500, (
        f"{method} {path} {describe(body)}: HTTP {response.status_code} {response.text[:500]!r}"
    )
    still_serving(server, "junk body")


# ---- afterwards ------------------------------------------------------------------------------


def test_server_survived_the_fuzz(server):
    assert server.process.poll() is None, f"the server exited:\n{server.log_tail()}"
    body = encode({**PLAIN, "sampling_params": {"max_new_tokens": 2, "temperature": 0}})
    started = time.monotonic()
    response = send(server, "POST", "/generate", body, "check: POST /generate")
    elapsed = time.monotonic() - started
    assert response.status_code == 200 and elapsed < 1.0, f"{response.status_code} after {elapsed:.2f}s"
    log = server.log_path.read_text(errors="replace")
    for marker in ("Traceback", "Scheduler hit an exception"):
        at = log.find(marker)
        assert at < 0, f"{server.log_path} holds {marker!r}:\n{log[max(0, at - 300) : at + 3000]}"
