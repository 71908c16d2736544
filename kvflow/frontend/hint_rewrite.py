"""Hints moved out of a request body, before SGLang parses it: the pure JSON rewriting.

SGLang's request models drop unknown fields, and its OpenAI endpoints drop ``kv_hints``, so the
hint middleware (``patches/hint_middleware.py``, the ASGI side) hands every hinted body here.

- Accepted forms, first found wins per prompt: a top-level ``kvflow`` object;
  ``custom_params.kvflow`` (``sampling_params[i].custom_params.kvflow`` on a batch ``/generate``);
  a ``kv_hints`` action of ``action_type`` ``"kvflow"`` (``/generate``); ``session_params.kvflow``,
  the one form SGLang's router forwards, with an optional ``session_params.kvflow_graph`` beside it.
- Each hint is validated (:class:`~kvflow.hints.HintError` naming the field) and re-attached as a
  canonical JSON string under ``custom_params["kvflow"]``, which SGLang carries to the scheduler.
- ``session_params`` loses both keys (and goes when nothing else was in it).
- A body without a hint is passed on byte for byte.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from kvflow.hints import (
    GRAPH_KEY,
    KV_HINTS_ACTION_TYPE,
    ROUTED_FIELD,
    TRANSPORT_KEY,
    HintError,
    WorkflowHint,
    check_fixed_prefix_len,
    parse_hint,
    transport,
)

GENERATE_PATH = "/generate"
OPENAI_PATHS = ("/v1/chat/completions", "/v1/completions")


def _holders(body: dict, path: str) -> tuple[list[Any], bool]:
    """The objects whose ``custom_params`` SGLang forwards, and whether there is one per prompt.

    ``/generate`` with a list of ``sampling_params`` has one per prompt of its batch.
    """
    if path != GENERATE_PATH:
        return [body], False
    sampling = body.get("sampling_params")
    if isinstance(sampling, list):
        return sampling, True
    return [sampling], False


def _pop_own_hint(holder: Any) -> tuple[bool, Any]:
    custom = holder.get("custom_params") if isinstance(holder, dict) else None
    if isinstance(custom, dict) and TRANSPORT_KEY in custom:
        return True, custom.pop(TRANSPORT_KEY)
    return False, None


def _top_level_hint(body: dict) -> tuple[Any, str] | None:
    if TRANSPORT_KEY in body:
        return body.pop(TRANSPORT_KEY), TRANSPORT_KEY
    return None


def _envelope_hint(body: dict, path: str) -> tuple[Any, str] | None:
    """A ``kv_hints`` action of type ``kvflow`` (``/generate`` only); it stays in the envelope."""
    envelope = body.get("kv_hints") if path == GENERATE_PATH else None
    if isinstance(envelope, dict) and isinstance(envelope.get("actions"), list):
        for i, action in enumerate(envelope["actions"]):
            if isinstance(action, dict) and action.get("action_type") == KV_HINTS_ACTION_TYPE:
                return action.get("payload"), f"kv_hints.actions[{i}].payload"
    return None


def _routed_hint(body: dict) -> tuple[tuple[Any, str] | None, Any]:
    """The hint and graph in ``session_params``, both removed (and the field if nothing else was in it)."""
    session = body.get(ROUTED_FIELD)
    if not isinstance(session, dict) or not (TRANSPORT_KEY in session or GRAPH_KEY in session):
        return None, None
    where = f"{ROUTED_FIELD}.{TRANSPORT_KEY}"
    hint = (session.pop(TRANSPORT_KEY), where) if TRANSPORT_KEY in session else None
    graph = session.pop(GRAPH_KEY, None)
    if not session:
        del body[ROUTED_FIELD]
    if graph is not None and hint is None:
        raise HintError(
            f"{ROUTED_FIELD}.{GRAPH_KEY}", f"needs a {ROUTED_FIELD}.{TRANSPORT_KEY} hint beside it"
        )
    return hint, graph


def _token_count(ids: Any) -> int | None:
    if isinstance(ids, list) and ids and all(isinstance(t, int) for t in ids):
        return len(ids)
    return None


def _prompt_lens(body: dict, path: str, count: int, per_prompt: bool) -> list[int | None]:
    """Per holder, its prompt's length when the body gives token ids directly.

    A batch sharing one holder is checked per prompt later, once tokenized
    (``patches/request_checks.py``).
    """
    ids = body.get("input_ids") if path == GENERATE_PATH else body.get("prompt")
    if not per_prompt:
        return [_token_count(ids)]
    if isinstance(ids, list) and len(ids) == count:
        return [_token_count(item) for item in ids]
    return [None] * count


def rewrite_body(
    body: Any,
    path: str,
    resolve: Callable[[WorkflowHint], WorkflowHint] | None = None,
    register: Callable[[str, Any], None] | None = None,
) -> Any:
    """Validate and move every hint into ``custom_params``; raise :class:`HintError` if one is malformed.

    Per prompt, the first found is used: the top-level ``kvflow`` (for every
    prompt), the prompt's own ``custom_params.kvflow`` (on a batch
    ``/generate``, ``sampling_params[i].custom_params.kvflow``), a ``kv_hints``
    action, ``session_params.kvflow`` (both for every prompt); the others are
    dropped unread, but a ``session_params.kvflow_graph`` is always handed to
    ``register`` with the workflow id of the ``session_params`` hint beside it
    (which may raise the registry's error), once every hint is valid.
    ``resolve`` then completes each hint (the workflow registry fills in its
    steps). Returns None when the body holds no hint (it is then passed on
    untouched).
    """
    if not isinstance(body, dict):
        return None
    top, envelope = _top_level_hint(body), _envelope_hint(body, path)
    routed, graph = _routed_hint(body)
    fallback = envelope if envelope is not None else routed
    holders, per_prompt = _holders(body, path)
    own = [_pop_own_hint(holder) for holder in holders]
    if top is None and fallback is None and not any(found for found, _ in own):
        return None
    lens = _prompt_lens(body, path, len(holders), per_prompt)
    hinted: list[tuple[dict, WorkflowHint]] = []
    shared: dict[str, WorkflowHint] = {}  # a hint given for every prompt, parsed once

    def parse_shared(raw_hint: Any, where: str) -> WorkflowHint:
        if where not in shared:
            shared[where] = parse_hint(raw_hint, prefix=where)
        return shared[where]

    for i, (found, raw) in enumerate(own):
        holder_name = f"sampling_params[{i}]" if per_prompt else "sampling_params"
        if top is not None or (not found and fallback is not None):
            raw_hint, where = top if top is not None else fallback
            hint = parse_shared(raw_hint, where)
            check_fixed_prefix_len(hint.fixed_prefix_len, lens[i], where)
        elif found:
            where = f"custom_params.{TRANSPORT_KEY}"
            if path == GENERATE_PATH:
                where = f"{holder_name}.{where}"
            hint = parse_hint(raw, prompt_len=lens[i], prefix=where)
        else:
            continue
        holder = holders[i]
        if holder is None and not per_prompt:
            holder = body["sampling_params"] = {}
        if not isinstance(holder, dict):
            raise HintError(
                holder_name, f"must be an object to carry a kvflow hint, got {type(holder).__name__}"
            )
        hinted.append((holder, hint))
    if graph is not None and register is not None:
        register(parse_shared(*routed).workflow_id, graph)
    # Every hint is valid: only now may the registry count the requests as started.
    for holder, hint in hinted:
        if resolve is not None:
            hint = resolve(hint)
        custom = holder.get("custom_params")
        if not isinstance(custom, dict):
            custom = holder["custom_params"] = {}
        custom.update(transport(hint))
    return body


def rewrite_request(
    raw: bytes,
    path: str,
    resolve: Callable[[WorkflowHint], WorkflowHint] | None = None,
    register: Callable[[str, Any], None] | None = None,
) -> bytes:
    """The body SGLang gets for the request body ``raw`` on ``path`` (:func:`rewrite_body` on its JSON).

    ``raw`` itself when it holds no hint or is not JSON (SGLang then reports it as usual); raises
    :class:`HintError` for a malformed hint (a JSON document nested too deeply included) and what
    ``resolve`` or ``register`` raise.
    """
    # A key spelled with JSON escapes ("\u006bvflow") holds a backslash-u; anything else is literal.
    # SGLang 0.5.23's OpenAI request models answer a JSON body that is not an object with a 500.
    not_object = path in OPENAI_PATHS and not raw.lstrip().startswith(b"{")
    if not (b"kvflow" in raw or b"\\u" in raw or not_object):
        return raw
    try:
        try:
            parsed = json.loads(raw)
        except ValueError:
            return raw
        if not_object and not isinstance(parsed, dict):
            raise HintError("body", f"must be a JSON object, got {type(parsed).__name__}")
        body = rewrite_body(parsed, path, resolve, register)
        return raw if body is None else json.dumps(body).encode()
    except RecursionError:
        raise HintError("body", "JSON nested too deeply") from None
