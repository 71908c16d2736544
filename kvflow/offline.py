"""Drive real SGLang radix caches without a model, the way the scheduler does.

A :class:`CacheDriver` owns a real ``TokenToKVPoolAllocator`` and a cache built
from real ``CacheInitParams``; :meth:`serve` matches a prompt, evicts what the
allocator lacks, allocates the rest and inserts the whole sequence, like a
finished request. After every step it checks SGLang's accounting invariant:
available + evictable + protected == pool size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.radix_cache import RadixKey
from sglang.srt.mem_cache.unified_cache.components import ComponentType
from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

from kvflow.cache import WorkflowRadixCache
from kvflow.eviction import register_eviction_policy
from kvflow.hints import WorkflowHint
from kvflow.tree_core import register_tree_core


class RecordingAllocator(TokenToKVPoolAllocator):
    """The real allocator, remembering every freed index in order."""

    def __init__(self, size: int) -> None:
        super().__init__(size, torch.float32, "cpu", kvcache=None, need_sort=False)
        self.freed: list[int] = []

    def free(self, free_index: torch.Tensor) -> None:
        self.freed.extend(free_index.tolist())
        super().free(free_index)


@dataclass
class CacheDriver:
    size: int
    cache_class: type = WorkflowRadixCache
    policy: str = "kvflow"
    policy_config: dict | None = None
    allocator: RecordingAllocator = field(init=False)
    cache: UnifiedRadixCache = field(init=False)

    def __post_init__(self) -> None:
        register_eviction_policy()
        register_tree_core()
        self.allocator = RecordingAllocator(self.size)
        params = CacheInitParams(
            disable=False,
            req_to_token_pool=None,
            token_to_kv_pool_allocator=self.allocator,
            page_size=1,
            eviction_policy=self.policy,
            eviction_policy_config=self.policy_config,
            tree_components=(ComponentType.FULL,),
            tree_core_backend="python",
        )
        self.cache = self.cache_class(params)

    def check_accounting(self) -> None:
        cache = self.cache
        total = self.allocator.available_size() + cache.evictable_size() + cache.protected_size()
        assert total == self.size, f"accounting drifted: {total} != {self.size}"

    def cached_len(self, tokens: list[int]) -> int:
        return self.cache.match_prefix(MatchPrefixParams(key=RadixKey(list(tokens)))).device_prefix_len

    def serve(self, tokens: list[int], hint: WorkflowHint | None = None) -> int:
        """Process one request; return how many of its tokens were already cached."""
        cache = self.cache
        agent = cache.observe_hint(hint, tokens) if hint is not None else None
        match = cache.match_prefix(MatchPrefixParams(key=RadixKey(list(tokens))))
        hit = match.device_prefix_len
        prefix = cache.path_device_indices(match.last_device_node)[:hit]
        lock = cache.lock(match.last_device_node)
        need = len(tokens) - hit
        if self.allocator.available_size() < need:
            cache.evict(EvictParams(num_tokens=need - self.allocator.available_size()))
        new = self.allocator.alloc(need)
        assert new is not None, "pool exhausted"
        cache.unlock(lock)
        cache.insert(
            InsertParams(key=RadixKey(list(tokens)), value=torch.cat([prefix, new]), prev_prefix_len=hit)
        )
        if agent is not None:
            cache.claim(agent, tokens)
            cache.agent_finished(agent)
        self.check_accounting()
        return hit
