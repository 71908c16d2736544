"""Patch: ``/kvflow/workflows``, workflows registered on the server.

The registry the routes manage lives in the HTTP process (:mod:`kvflow.frontend.registry`); the
hint middleware asks it to complete every hinted request. The cache lives in the scheduler, so
what it must learn (an ended workflow, a moved frontier, the time) rides kvflow commands
(:mod:`kvflow.control`) in SGLang's internal-state update, the RPC that reaches it.

- Every command carries the HTTP process's time (``at``); the app's lifespan sends a ``clock``
  command every quarter TTL (:func:`clock_period`), so hints expire while no request comes.
- Target: the FastAPI ``app`` of ``sglang.srt.entrypoints.http_server`` (:func:`install`): plain
  routes, so SGLang's ``--api-key`` middleware guards them like ``/generate``.
- Target: ``SchedulerInternalStateController.set_internal_state`` (AROUND, in the scheduler
  process, :func:`_run_kvflow_commands`): pops the kvflow commands and applies them to the cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import ORJSONResponse
from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from kvflow import WORKFLOWS_ROUTE, control
from kvflow.cache.radix_cache import workflow_cache
from kvflow.config import KVFlowConfig
from kvflow.frontend.errors import error_response, refusal
from kvflow.frontend.graph_learning import GraphLearner
from kvflow.frontend.registry import RegistryError, WorkflowRegistry, activate, active_registry

TARGETS = (
    "sglang.srt.managers.scheduler_components.internal_state.SchedulerInternalStateController.set_internal_state",
    "sglang.srt.entrypoints.http_server.app",
)
ROUTE = WORKFLOWS_ROUTE

logger = logging.getLogger(__name__)

# ---- scheduler process -------------------------------------------------------


def _apply_command(cache: Any, key: str) -> bool:
    try:
        command = control.decode(key)
    except control.ControlError as error:
        logger.warning("ignoring malformed kvflow command %r: %s", key, error)
        return False
    core = workflow_cache(cache)
    if core is None:  # a stock cache: nothing to apply
        return False
    core.advance_clock(command.at)
    if isinstance(command, control.Clock):
        return True
    if isinstance(command, control.End):
        return core.end_workflow(command.workflow_id)
    return core.set_steps(command.workflow_id, command.steps)


def _run_kvflow_commands(original, controller, recv_req, *args, **kwargs):
    """Apply and remove the kvflow keys of a ``SetInternalStateReq``; SGLang handles the rest.

    The commands ride in its ``server_args`` map; they are popped before SGLang validates the
    rest and applied to the cache: ``end`` (a DELETEd workflow becomes plain LRU at once,
    ``WorkflowCache.end_workflow``), ``steps`` (a moved frontier: after a ``PATCH``, and after
    each response of a registered or learned workflow) and ``clock`` (expire stale workflows).
    """
    from sglang.srt.managers.io_struct import SetInternalStateReqOutput

    requested = recv_req.server_args
    keys = [key for key in requested if control.is_command(key)]
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


async def send_commands(commands: list[control.Command]) -> bool:
    """Send kvflow commands, stamped now, to every scheduler; True if any applied all of them."""
    from sglang.srt.entrypoints.http_server import _global_state
    from sglang.srt.managers.io_struct import SetInternalStateReq

    now = time.monotonic()  # the stamp every rank's cache reads as the time (stamped_clock.py)
    keys = [control.encode(dataclasses.replace(command, at=now)) for command in commands]
    request = SetInternalStateReq(server_args=dict.fromkeys(keys, 1))
    return any(await _global_state.tokenizer_manager.set_internal_state(request))


def clock_period(ttl: float) -> float:
    """How often the HTTP process sends the caches the time: a quarter TTL, from 50 ms to 30 s."""
    return min(max(ttl / 4, 0.05), 30.0)


async def send_clock(period: float) -> None:
    """Send the time every ``period`` seconds, so hints expire while no hinted request comes."""
    while True:
        await asyncio.sleep(period)
        try:
            await send_commands([control.Clock()])
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
            control.Steps(workflow_id, steps)
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


def _answers_registry_errors(
    handler: Callable[..., Awaitable[ORJSONResponse]],
) -> Callable[..., Awaitable[ORJSONResponse]]:
    @functools.wraps(handler)
    async def wrapper(*args, **kwargs) -> ORJSONResponse:
        try:
            return await handler(*args, **kwargs)
        except RegistryError as error:
            return refusal(error)
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
    cache_knew = await send_commands([control.End(workflow_id)])
    if not (registry_knew or cache_knew):
        return error_response(404, f"workflow {workflow_id!r} is not known", None, "WorkflowNotFound")
    return ORJSONResponse({"workflow_id": workflow_id, "registry": registry_knew, "cache": cache_knew})


def install(app) -> None:
    """Create this process's registry (from the ``--kvflow-*`` flags) and add the routes.

    ``POST /kvflow/workflows`` (register ``{workflow_id, graph}``) and ``GET | PATCH | DELETE
    /kvflow/workflows/{workflow_id}`` (inspect, move the frontier, end).
    """
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
