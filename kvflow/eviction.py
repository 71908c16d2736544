"""The workflow-aware eviction order, as an SGLang ``EvictionStrategy``.

SGLang pops the smallest key first, from the current leaves (device or host
tier alike). Nodes with no hinted owner below them come first, LRU among
themselves; then owned nodes, farthest steps-to-execution first, LRU as the
tie-break. Nothing is pinned. Without any hint every key is
``(0, 0, last_access_time)``, which orders exactly like SGLang's ``lru``.
"""

from __future__ import annotations

from typing import Any

from sglang.srt.arg_groups.choices import (
    RADIX_EVICTION_POLICY_CHOICES,
    add_radix_eviction_policy_choices,
)
from sglang.srt.mem_cache.evict_policy import EvictionStrategy
from sglang.srt.mem_cache.utils import _EVICTION_POLICY_FACTORIES

POLICY_NAME = "kvflow"


class WorkflowAwareStrategy(EvictionStrategy):
    """Un-owned first (LRU), then owned nodes by descending steps-to-execution (LRU ties)."""

    def get_priority(self, node: Any) -> tuple[int, int, float]:
        steps = getattr(node, "kvflow_min", None)
        if steps is None:
            return (0, 0, node.last_access_time)
        return (1, -steps, node.last_access_time)


def register_eviction_policy() -> None:
    """Make ``--radix-eviction-policy kvflow`` valid (CLI choices and factory registry)."""
    _EVICTION_POLICY_FACTORIES.setdefault(POLICY_NAME, WorkflowAwareStrategy)
    if POLICY_NAME not in RADIX_EVICTION_POLICY_CHOICES:
        add_radix_eviction_policy_choices([POLICY_NAME])
