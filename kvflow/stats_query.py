"""What ``GET /kvflow/stats`` asks the cache for beyond its bounded summary: one page of detail."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from kvflow import NAME

MAX_STATS_PAGE = 1024  # one whole workflow's agents (hints name at most 1024)
QUERY_RID_PREFIX = f"{NAME}-stats:"
_PARAMS = ("workflow_id", "detail", "offset", "limit")


@dataclass(frozen=True)
class StatsQuery:
    """One workflow's agents (``workflow_id``), or the tracked workflows, paged."""

    workflow_id: str | None = None
    offset: int = 0
    limit: int = 100


class QueryError(ValueError):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


def _count(params: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = params.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or not low <= int(raw) <= high:
        raise QueryError(name, f"must be an integer from {low} to {high}")
    return int(raw)


def parse_query(params: Mapping[str, str]) -> StatsQuery | None:
    """The page of detail the query string asks for (None: the summary alone); :class:`QueryError`."""
    for name in params:
        if name not in _PARAMS:
            raise QueryError(name, f"unknown parameter (expected {', '.join(_PARAMS)})")
    workflow_id, detail = params.get("workflow_id"), params.get("detail")
    if detail is not None and detail != "workflows":
        raise QueryError("detail", "the only detail listed is 'workflows'")
    if workflow_id is not None and detail is not None:
        raise QueryError("detail", "give workflow_id or detail, not both")
    if workflow_id is None and detail is None:
        if "offset" in params or "limit" in params:
            raise QueryError("offset" if "offset" in params else "limit", "needs workflow_id or detail")
        return None
    offset = _count(params, "offset", 0, 0, 2**31)
    limit = _count(params, "limit", 100, 1, MAX_STATS_PAGE)
    return StatsQuery(workflow_id, offset, limit)
