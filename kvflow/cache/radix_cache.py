"""``WorkflowRadixCache``: SGLang's ``UnifiedRadixCache`` driven by workflow hints.

The class SGLang builds for ``--radix-cache-backend kvflow``. It keeps only SGLang's
overrides, each handing kvflow's part to one attribute, ``cache.kvflow``, a
:class:`~kvflow.cache.workflow_cache.WorkflowCache` (the core); patches reach that
core through :func:`workflow_cache`. Eviction order itself lives in
:class:`kvflow.cache.eviction.WorkflowAwareStrategy`, applied by the tree core on
both tiers.

- Every override calls SGLang's method and the core, nothing else.
- ``workflow_cache`` answers None for any other cache (stock SGLang, ``--radix-cache-backend stock``).
- All methods run on the scheduler thread, like SGLang's own.
"""

from __future__ import annotations

from typing import Any

from sglang.srt.managers.schedule_batch import Req
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, EvictResult, MatchPrefixParams, MatchResult
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.registry import TreeCacheBuildContext, create_unified_radix_cache
from sglang.srt.mem_cache.unified_cache.components import ComponentType
from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

from kvflow import NAME
from kvflow.cache.tree_core import TREE_CORE_NAME
from kvflow.cache.victims import WorkflowFullComponent
from kvflow.cache.workflow_cache import WorkflowCache
from kvflow.config import KVFlowConfig

CACHE_BACKEND_NAME = NAME


class WorkflowRadixCache(UnifiedRadixCache):
    """A ``UnifiedRadixCache`` on the ``kvflow`` tree core whose kvflow state is ``self.kvflow``."""

    kvflow: WorkflowCache

    def __init__(self, params: CacheInitParams) -> None:
        params.tree_core_backend = TREE_CORE_NAME
        # Device victims come from the tree core's heap kept across evictions (kvflow.cache.victims).
        params.component_registry_override = {
            **(params.component_registry_override or {}),
            ComponentType.FULL: WorkflowFullComponent,
        }
        super().__init__(params)
        self.kvflow = WorkflowCache(self, KVFlowConfig.from_env() or KVFlowConfig(), params.eviction_policy)

    def reset(self) -> None:
        """SGLang's full reset (``/flush_cache``); SGLang's ``__init__`` calls it before the core exists."""
        super().reset()
        if "kvflow" in vars(self):
            self.kvflow.tree_reset()

    def init_hicache(self, server_args: Any, params: CacheInitParams) -> None:
        super().init_hicache(server_args, params)
        self.kvflow.start_prefetching()

    def check_hicache_events(self) -> None:
        super().check_hicache_events()
        self.kvflow.prefetch_step()

    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        if params.req is not None:
            self.kvflow.admit(params.req)
        return super().match_prefix(params)

    def checkpoint_into_tree(self, req: Req, *, up_to: int, **kwargs) -> None:
        super().checkpoint_into_tree(req, up_to=up_to, **kwargs)
        self.kvflow.request_inserted(req, up_to)

    def on_release(self, req: Req, *, checkpointed: bool) -> None:
        super().on_release(req, checkpointed=checkpointed)
        self.kvflow.request_released(req)

    def evict(self, params: EvictParams) -> EvictResult:
        self.kvflow.expire()
        return super().evict(params)

    def evict_for_alloc(
        self, params: EvictParams, *, allocation_reclaim_satisfied: Any = None
    ) -> EvictResult:
        self.kvflow.expire()
        if allocation_reclaim_satisfied is not None or params.num_tokens <= 0:
            return super().evict_for_alloc(params, allocation_reclaim_satisfied=allocation_reclaim_satisfied)
        # SGLang stops this eviction once the pool has the shortfall free: tell the Full component
        # where that is, so it can cut its last victim to it (kvflow.cache.victims).
        full = self.tree_core.components_by_type[ComponentType.FULL]
        full.available_target = self._component_available_size(ComponentType.FULL) + params.num_tokens
        try:
            return super().evict_for_alloc(params)
        finally:
            full.available_target = None


def workflow_cache(tree_cache: Any) -> WorkflowCache | None:
    """The kvflow core of the scheduler's ``tree_cache``; None for any other cache."""
    return tree_cache.kvflow if isinstance(tree_cache, WorkflowRadixCache) else None


def workflow_cache_factory(ctx: TreeCacheBuildContext) -> UnifiedRadixCache:
    """Radix-cache backend factory: SGLang's unified construction, our class."""
    return create_unified_radix_cache(ctx, cache_class=WorkflowRadixCache)
