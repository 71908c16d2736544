"""Patch: ``/kvflow/workflows``, workflows registered on the server.

Targets:

* the FastAPI ``app`` of ``sglang.srt.entrypoints.http_server``: the routes
  ``POST /kvflow/workflows`` (register ``{workflow_id, graph}``),
  ``GET | PATCH | DELETE /kvflow/workflows/{workflow_id}`` (inspect, move the
  frontier, end). They are plain routes, so SGLang's ``--api-key`` middleware
  guards them like ``/generate``. The registry they manage lives in the HTTP
  process (:mod:`kvflow.frontend.registry`); the hint middleware asks it to
  complete every hinted request.
* ``SchedulerInternalStateController.set_internal_state`` (an AROUND hook in
  the scheduler process): the cache lives in the scheduler, and SGLang's
  internal-state update is the RPC that reaches it from the HTTP process.
  kvflow commands ride in its ``server_args`` map as keys
  ``"kvflow:" + JSON`` (the map's values must be numbers, its keys may be any
  string); the hook pops them before SGLang validates the rest and applies
  them to the cache: ``end`` (a DELETEd workflow becomes plain LRU at once,
  ``WorkflowCache.end_workflow``), ``steps`` (a moved frontier: after a
  ``PATCH``, and after each response of a registered or learned workflow) and
  ``clock`` (expire stale workflows). Every command carries the HTTP process's time (``at``), the only
  time the cache reads (:mod:`kvflow.cache.stamped_clock`); the app's lifespan
  sends a ``clock`` command every quarter TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import ORJSONResponse
from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from kvflow import NAME, WORKFLOWS_ROUTE
from kvflow.cache.radix_cache import workflow_cache
from kvflow.config import KVFlowConfig
from kvflow.frontend.graph_learning import GraphLearner
from kvflow.frontend.registry import RegistryError, WorkflowRegistry, activate, active_registry
from kvflow.hints import read_stamp

TARGETS = (
    "sglang.srt.managers.scheduler_components.internal_state.SchedulerInternalStateController.set_internal_state",
    "sglang.srt.entrypoints.http_server.app",
)
ROUTE = WORKFLOWS_ROUTE
COMMAND_PREFIX = f"{NAME}:"

logger = logging.getLogger(__name__)

# ---- scheduler process -------------------------------------------------------


def encode_command(command: dict[str, Any]) -> str:
    """The ``server_args`` key that carries one kvflow command to the scheduler."""
    return COMMAND_PREFIX + json.dumps(command, separators=(",", ":"), sort_keys=True)


def _apply_command(cache: Any, key: str) -> bool:
    core = workflow_cache(cache)
    try:
        command = json.loads(key[len(COMMAND_PREFIX) :])
        if core is not None:
            core.advance_clock(read_stamp(command.get("at")))
        if command["op"] == "clock":
            return core is not None
        if command["op"] == "end":
            return core is not None and core.end_workflow(command["workflow_id"])
        if command["op"] == "steps":
            return core is not None and core.set_steps(command["workflow_id"], command["steps"])
    except (ValueError, KeyError, TypeError) as error:
        logger.warning("ignoring malformed kvflow command %r: %s", key, error)
    return False


def _run_kvflow_commands(original, controller, recv_req, *args, **kwargs):
    """Apply and remove the kvflow keys of a ``SetInternalStateReq``; SGLang handles the rest."""
    from sglang.srt.managers.io_struct import SetInternalStateReqOutput

    requested = recv_req.server_args
    keys = [key for key in requested if key.startswith(COMMAND_PREFIX)]
    if not keys:
        return original(controller, recv_req, *args, **kwargs)
    applied = True
    for key in keys:
        del requested[key]
        applied = _apply_command(controller.scheduler.tree_cache, key) and applied
    if not requested:
        return SetInternalStateReqOutput(updated=applied)
    result = original(controller, recv_req, *args, **kwargs)
    result.updated = result.updated and applied
    return result


def register_hooks() -> None:
    HookRegistry.register(TARGETS[0], _run_kvflow_commands, HookType.AROUND)


# ---- HTTP process --------------------------------------------------------------


async def send_commands(commands: list[dict[str, Any]]) -> bool:
    """Send kvflow commands to every scheduler; True if any applied all of them."""
    from sglang.srt.entrypoints.http_server import _global_state
    from sglang.srt.managers.io_struct import SetInternalStateReq

    now = time.monotonic()  # the stamp every rank's cache reads as the time (stamped_clock.py)
    request = SetInternalStateReq(server_args={encode_command({**c, "at": now}): 1 for c in commands})
    return any(await _global_state.tokenizer_manager.set_internal_state(request))


def clock_period(ttl: float) -> float:
    """How often the HTTP process sends the caches the time: a quarter TTL, from 50 ms to 30 s."""
    return min(max(ttl / 4, 0.05), 30.0)


async def send_clock(period: float) -> None:
    """Send the time every ``period`` seconds, so hints expire while no hinted request comes."""
    while True:
        await asyncio.sleep(period)
        try:
            await send_commands([{"op": "clock"}])
        except Exception:
            logger.exception("sending the kvflow clock failed")


def _with_clock(lifespan: Callable[[Any], Any], period: float) -> Callable[[Any], Any]:
    """SGLang's app lifespan, sending the clock while the app serves."""

    @contextlib.asynccontextmanager
    async def lifespan_with_clock(app: Any):
        async with lifespan(app) as state:
            task = asyncio.get_running_loop().create_task(send_clock(period))
            try:
                yield state
            finally:
                task.cancel()

    return lifespan_with_clock


class FrontierPusher:
    """Sends the registry's current steps of changed workflows to the cache.

    Changes are coalesced: at most one push is in flight, and each push reads
    the registry when it is sent, so the cache never gets an outdated frontier
    after a newer one from the same source.
    """

    def __init__(self, registry: WorkflowRegistry) -> None:
        self.registry = registry
        self._dirty: dict[str, None] = {}
        self._task: asyncio.Task | None = None

    def schedule(self, workflow_id: str) -> None:
        """Push ``workflow_id``'s steps soon (called from the event loop)."""
        self._dirty[workflow_id] = None
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._drain())

    async def push(self, workflow_ids: list[str]) -> bool:
        """Push now; True if the cache tracked (all of) them."""
        commands = [
            {"op": "steps", "workflow_id": workflow_id, "steps": steps}
            for workflow_id in workflow_ids
            if (steps := self.registry.current_steps(workflow_id))
        ]
        return bool(commands) and await send_commands(commands)

    async def _drain(self) -> None:
        while self._dirty:
            workflow_ids = list(self._dirty)
            self._dirty.clear()
            try:
                await self.push(workflow_ids)
            except Exception:
                logger.exception("pushing kvflow frontier updates failed")


_pusher: FrontierPusher | None = None


def _printable(text: str | None) -> str | None:
    """``text`` with lone surrogates escaped: orjson refuses them, and error messages quote client input."""
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_response(status: int, message: str, param: str | None, kind: str) -> ORJSONResponse:
    """kvflow's JSON error answer (OpenAI-style), safe for any client text it quotes."""
    content = {
        "object": "error",
        "message": _printable(message),
        "type": kind,
        "param": _printable(param),
        "code": status,
    }
    return ORJSONResponse(status_code=status, content=content)


def _answers_registry_errors(
    handler: Callable[..., Awaitable[ORJSONResponse]],
) -> Callable[..., Awaitable[ORJSONResponse]]:
    @functools.wraps(handler)
    async def wrapper(*args, **kwargs) -> ORJSONResponse:
        try:
            return await handler(*args, **kwargs)
        except RegistryError as error:
            return error_response(error.status, str(error), error.param, type(error).__name__)
        except RecursionError:  # a document nested nearly as deep as the parser allows
            return error_response(400, "body: JSON nested too deeply", "body", "RegistryError")

    return wrapper


def _registry() -> WorkflowRegistry:
    registry = active_registry()
    assert registry is not None, "workflow endpoints used before install()"
    return registry


async def _json_body(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except ValueError:
        raise RegistryError("body: expected a JSON object", "body") from None
    except RecursionError:
        raise RegistryError("body: JSON nested too deeply", "body") from None


@_answers_registry_errors
async def register_workflow(request: Request) -> ORJSONResponse:
    """Register ``{workflow_id, graph}``: 201 when new, 200 when already registered identically."""
    workflow, created = _registry().register(await _json_body(request))
    return ORJSONResponse(workflow.describe(), status_code=201 if created else 200)


@_answers_registry_errors
async def get_workflow(workflow_id: str) -> ORJSONResponse:
    """A registered workflow's graph, frontier and steps (or a learned workflow's model)."""
    return ORJSONResponse(_registry().describe(workflow_id))


@_answers_registry_errors
async def patch_workflow(workflow_id: str, request: Request) -> ORJSONResponse:
    """Move the frontier (``{"running": [...], "finished": [...]}``) and push the steps to the cache."""
    workflow = _registry().set_frontier(workflow_id, await _json_body(request))
    cache_updated = await _pusher.push([workflow_id])
    return ORJSONResponse({**workflow.describe(), "cache_updated": cache_updated})


@_answers_registry_errors
async def delete_workflow(workflow_id: str) -> ORJSONResponse:
    """End a workflow: forget it here and make its KV plain LRU in the cache at once."""
    registry_knew = _registry().end(workflow_id)
    cache_knew = await send_commands([{"op": "end", "workflow_id": workflow_id}])
    if not (registry_knew or cache_knew):
        return error_response(404, f"workflow {workflow_id!r} is not known", None, "WorkflowNotFound")
    return ORJSONResponse({"workflow_id": workflow_id, "registry": registry_knew, "cache": cache_knew})


def install(app) -> None:
    """Create this process's registry (from the ``--kvflow-*`` flags) and add the routes."""
    global _pusher
    config = KVFlowConfig.from_env() or KVFlowConfig()
    learner = None
    if config.learn_graph:
        learner = GraphLearner(
            config.learn_min_observations, config.max_workflows, config.max_agents, config.hint_ttl
        )
    registry = WorkflowRegistry(config.hint_ttl, config.max_workflows, config.max_agents, learner)
    _pusher = FrontierPusher(registry)
    registry.on_change = _pusher.schedule
    activate(registry)
    app.router.lifespan_context = _with_clock(app.router.lifespan_context, clock_period(config.hint_ttl))
    app.add_api_route(ROUTE, register_workflow, methods=["POST"])
    item = ROUTE + "/{workflow_id:path}"
    app.add_api_route(item, get_workflow, methods=["GET"])
    app.add_api_route(item, patch_workflow, methods=["PATCH"])
    app.add_api_route(item, delete_workflow, methods=["DELETE"])
