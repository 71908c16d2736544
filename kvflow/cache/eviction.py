"""The workflow-aware eviction order, as an SGLang ``EvictionStrategy``.

SGLang pops the smallest key first, from the current leaves (device or host
tier alike). Nodes with no hinted owner below them come first, LRU among
themselves; then owned nodes, farthest steps-to-execution first, with a
tie-break among equal steps that is LRU by default. Nothing is pinned.
Without any hint every key is ``(0, 0, last_access_time)``, which orders
exactly like SGLang's ``lru``.

The tie-break is the strategy's one parameter, set through SGLang's own
``--radix-eviction-policy-config '{"tie_break": "mru"}'``. ``mru`` evicts the
most recently used of equally urgent prompts first: with concurrent workflows
advancing in turn, equal steps mean an agent of a workflow that moved on more
recently, so its prompt is needed last (Belady's choice on such a cycle).
"""

from __future__ import annotations

from typing import Any

from sglang.srt.arg_groups.choices import (
    RADIX_EVICTION_POLICY_CHOICES,
    add_radix_eviction_policy_choices,
)
from sglang.srt.mem_cache.evict_policy import EvictionStrategy
from sglang.srt.mem_cache.utils import _EVICTION_POLICY_FACTORIES

from kvflow import NAME

POLICY_NAME = NAME
TIE_BREAKS = ("lru", "mru")


class WorkflowAwareStrategy(EvictionStrategy):
    """Un-owned first (LRU), then owned nodes by descending steps-to-execution, ties by ``tie_break``."""

    def __init__(self, tie_break: str = "lru") -> None:
        if tie_break not in TIE_BREAKS:
            raise ValueError(
                f"--radix-eviction-policy-config: 'tie_break' of the {POLICY_NAME} policy must be one of "
                f"{', '.join(TIE_BREAKS)}, got {tie_break!r}"
            )
        self.tie_break = tie_break
        self._tie_sign = 1 if tie_break == "lru" else -1

    def get_priority(self, node: Any) -> tuple[int, int, float]:
        steps = getattr(node, "kvflow_min", None)
        if steps is None:
            return (0, 0, node.last_access_time)
        return (1, -steps, self._tie_sign * node.last_access_time)


def register_eviction_policy() -> None:
    """Make ``--radix-eviction-policy kvflow`` valid (CLI choices and factory registry)."""
    _EVICTION_POLICY_FACTORIES.setdefault(POLICY_NAME, WorkflowAwareStrategy)
    if POLICY_NAME not in RADIX_EVICTION_POLICY_CHOICES:
        add_radix_eviction_policy_choices([POLICY_NAME])
