"""Patch: ``GET /kvflow/stats``, the workflow cache's counters.

The cache lives in the scheduler process, so its counters ride SGLang's internal-state request;
the query format is :mod:`kvflow.stats_query`.

- The default answer is a bounded summary; ``?workflow_id=ID`` and ``?detail=workflows`` add one
  page of detail (:func:`kvflow_stats`).
- With data parallelism every DP rank answers for its own cache.
- Target ``SchedulerInternalStateController.get_internal_state`` (AFTER, in the scheduler
  process, :func:`_add_kvflow_stats`): adds the kvflow core's ``stats()`` to the reply.
- Target: the FastAPI ``app`` of ``sglang.srt.entrypoints.http_server`` (:func:`install`): the
  route that asks for it.
"""

from __future__ import annotations

import json

from fastapi import Request
from fastapi.responses import ORJSONResponse
from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from kvflow import NAME, STATS_ROUTE
from kvflow.cache.radix_cache import workflow_cache
from kvflow.frontend.errors import error_response, refusal
from kvflow.stats_query import QUERY_RID_PREFIX, QueryError, StatsQuery, parse_query

TARGETS = (
    "sglang.srt.managers.scheduler_components.internal_state.SchedulerInternalStateController.get_internal_state",
    "sglang.srt.entrypoints.http_server.app",
)
ROUTE = STATS_ROUTE


def _add_kvflow_stats(result, controller, recv_req=None, *args, **kwargs):
    """Add the kvflow core's ``stats()`` to the internal-state reply SGLang sends the HTTP process.

    The page asked for rides in the request's ``rid`` (``GetInternalStateReq`` has no other
    field; SGLang sends these requests one at a time and does not read their ``rid``).
    """
    from kvflow.patches import active_patches
    from sglang.srt.runtime_context import get_parallel

    core = workflow_cache(controller.scheduler.tree_cache)
    if core is not None:
        query = None
        rid = getattr(recv_req, "rid", None)
        if isinstance(rid, str) and rid.startswith(QUERY_RID_PREFIX):
            query = StatsQuery(**json.loads(rid[len(QUERY_RID_PREFIX) :]))
        # The same rank index the scheduler publishes its load snapshot under.
        dp_rank = get_parallel().dp_rank or 0
        result.internal_state[NAME] = {
            **core.stats(query),
            "patches_active": active_patches(),
            "dp_rank": dp_rank,
        }
    return result


def register_hooks() -> None:
    HookRegistry.register(TARGETS[0], _add_kvflow_stats, HookType.AFTER)


async def kvflow_stats(request: Request) -> ORJSONResponse:
    """Cache counters from every scheduler (one per DP rank), with a page of detail on request.

    ``?workflow_id=ID`` adds one page of that workflow's agents, ``?detail=workflows`` one page of
    the tracked workflows (both paged by ``offset`` and ``limit``). With data parallelism every DP
    rank has its own cache and answers: the route returns ``{"ranks": [...]}``, one summary per
    rank in rank order, each labelled ``dp_rank`` (the index SGLang's DP controller routes by).
    """
    from sglang.srt.entrypoints.http_server import _global_state
    from sglang.srt.managers.io_struct import GetInternalStateReq

    try:
        query = parse_query(request.query_params)
    except QueryError as error:
        return refusal(error)
    manager = _global_state.tokenizer_manager
    manager.auto_create_handle_loop()
    rid = None if query is None else QUERY_RID_PREFIX + json.dumps(query.__dict__)
    replies = await manager.get_internal_state_communicator(GetInternalStateReq(rid=rid))
    ranks = [reply.internal_state[NAME] for reply in replies if NAME in reply.internal_state]
    if not ranks:
        message = "the kvflow cache is not active on this server (stock --radix-cache-backend?)"
        return error_response(404, message, None, "NotFoundError")
    ranks.sort(key=lambda rank: rank["dp_rank"])
    return ORJSONResponse(ranks[0] if len(ranks) == 1 else {"ranks": ranks})


def install(app) -> None:
    app.add_api_route(ROUTE, kvflow_stats, methods=["GET"])
