"""Patch: ``GET /kvflow/stats``, the workflow cache's counters.

Targets: ``SchedulerInternalStateController.get_internal_state`` (an AFTER
hook in the scheduler process adds the cache's ``kvflow_stats()`` to the
internal-state reply SGLang already sends to the HTTP process) and the FastAPI
``app`` of ``sglang.srt.entrypoints.http_server`` (the route that asks for it).
"""

from __future__ import annotations

from fastapi.responses import ORJSONResponse
from sglang.srt.plugins.hook_registry import HookRegistry, HookType

TARGETS = (
    "sglang.srt.managers.scheduler_components.internal_state.SchedulerInternalStateController.get_internal_state",
    "sglang.srt.entrypoints.http_server.app",
)
ROUTE = "/kvflow/stats"


def _add_kvflow_stats(result, controller, *args, **kwargs):
    from kvflow.patches import active_patches

    stats = getattr(controller.scheduler.tree_cache, "kvflow_stats", None)
    if stats is not None:
        result.internal_state["kvflow"] = {**stats(), "patches_active": active_patches()}
    return result


def register_hooks() -> None:
    HookRegistry.register(TARGETS[0], _add_kvflow_stats, HookType.AFTER)


async def kvflow_stats() -> ORJSONResponse:
    """Per-workflow and per-agent cache counters from every scheduler (one per DP rank)."""
    from sglang.srt.entrypoints.http_server import _global_state

    states = await _global_state.tokenizer_manager.get_internal_state()
    ranks = [state["kvflow"] for state in states if "kvflow" in state]
    if not ranks:
        return ORJSONResponse(
            status_code=404,
            content={"error": "the kvflow cache is not active on this server (stock --radix-cache-backend?)"},
        )
    return ORJSONResponse(ranks[0] if len(ranks) == 1 else {"ranks": ranks})


def install(app) -> None:
    app.add_api_route(ROUTE, kvflow_stats, methods=["GET"])
