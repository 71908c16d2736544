"""Drive real SGLang radix caches without a model, the way the scheduler does.

A :class:`CacheDriver` owns a real SGLang allocator (``TokenToKVPoolAllocator``,
or ``PagedTokenToKVPoolAllocator`` for a page size above 1) and a cache built
from real ``CacheInitParams``; :meth:`serve` matches a prompt, evicts what the
allocator lacks, allocates the rest and inserts the sequence, like a finished
request. After every step it checks SGLang's accounting invariant (available +
evictable + protected == pool size) and, for a ``WorkflowRadixCache``, the
rest of its ``check_integrity()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from sglang.srt.mem_cache.allocator import (
    BaseTokenToKVPoolAllocator,
    PagedTokenToKVPoolAllocator,
    TokenToKVPoolAllocator,
)
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.radix_cache import RadixKey
from sglang.srt.mem_cache.unified_cache.components import ComponentType
from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache
from sglang.srt.runtime_context import get_server_args

from kvflow.cache.eviction import POLICY_NAME, register_eviction_policy
from kvflow.cache.integrity import check_pool_accounting
from kvflow.cache.radix_cache import WorkflowRadixCache, workflow_cache
from kvflow.cache.tree_core import register_tree_core
from kvflow.hints import WorkflowHint


class RecordingAllocator(TokenToKVPoolAllocator):
    """The real allocator, remembering every freed index in order."""

    def __init__(self, size: int, kvcache: Any = None) -> None:
        super().__init__(size, torch.float32, "cpu", kvcache=kvcache, need_sort=False)
        self.freed: list[int] = []

    def free(self, free_index: torch.Tensor) -> None:
        self.freed.extend(free_index.tolist())
        super().free(free_index)


@dataclass
class CacheDriver:
    """A cache on a ``size``-token pool. Only at page size 1 does the allocator record ``freed``.

    ``check_every`` spaces the invariant checks of :meth:`serve` (each walks the
    whole tree): 1, the default, checks after every request; replays of
    thousands of workflows check every ``check_every``-th and at the end.

    ``host_tier``: the cache gets SGLang's real host tier (HiCache) over a tiny real KV pool, as
    SGLang's factory builds it for ``--enable-hierarchical-cache``; the caller publishes the server
    args it reads (``get_context().override_server_args``) and, without CUDA, puts the
    ``sgl_kernel`` stand-in on the path and the ``cpu_host_tier`` patch's hooks in place. The
    scheduler's per-iteration ``check_hicache_events`` is then the caller's to run.
    """

    size: int
    cache_class: type = WorkflowRadixCache
    policy: str = POLICY_NAME
    policy_config: dict | None = None
    page_size: int = 1
    check_every: int = 1
    session_radix: bool = False  # SGLang's --enable-session-radix-cache
    host_tier: bool = False
    allocator: BaseTokenToKVPoolAllocator = field(init=False)
    cache: UnifiedRadixCache = field(init=False)
    served: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        register_eviction_policy()
        register_tree_core()
        kvcache = self._kv_pool() if self.host_tier else None
        if self.page_size == 1:
            self.allocator = RecordingAllocator(self.size, kvcache)
        else:
            self.allocator = PagedTokenToKVPoolAllocator(
                self.size, self.page_size, torch.float32, "cpu", kvcache=kvcache, need_sort=False
            )
        params = CacheInitParams(
            disable=False,
            req_to_token_pool=None,
            token_to_kv_pool_allocator=self.allocator,
            page_size=self.page_size,
            eviction_policy=self.policy,
            eviction_policy_config=self.policy_config,
            tree_components=(ComponentType.FULL,),
            tree_core_backend="python",
            enable_session_radix_cache=self.session_radix,
        )
        self.cache = self.cache_class(params)
        if self.host_tier:
            self.cache.init_hicache(get_server_args(), params)

    def _kv_pool(self) -> Any:
        """A real device KV pool of ``size`` tokens, as small as SGLang allows (what a host tier copies)."""
        from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool  # needs sgl_kernel (see above)

        return MHATokenToKVPool(
            self.size, self.page_size, torch.float32, head_num=1, head_dim=4, layer_num=2,
            device="cpu", enable_memory_saver=False,
        )  # fmt: skip

    def check_accounting(self) -> None:
        """Pool accounting; for a ``WorkflowRadixCache``, its full ``check_integrity()``."""
        core = workflow_cache(self.cache)
        if core is not None:
            core.check_integrity()
        else:
            check_pool_accounting(self.cache)

    def cached_len(self, tokens: list[int]) -> int:
        """Device-cached prefix length of ``tokens`` (a match may split a node, so it is checked too)."""
        hit = self.cache.match_prefix(MatchPrefixParams(key=RadixKey(list(tokens)))).device_prefix_len
        self.check_accounting()
        return hit

    def serve(
        self,
        tokens: list[int],
        hint: WorkflowHint | None = None,
        session_id: str | None = None,
        prompt_len: int | None = None,
        stamp: float | None = None,
    ) -> int:
        """Process one request; return how many of its tokens were already cached.

        ``tokens`` is its prompt and output, inserted whole as a finished request; the hint sees
        the first ``prompt_len`` of them as the prompt (all of them when None). ``stamp`` is the
        time (seconds) the HTTP process would have stamped on a hinted request.

        Like the scheduler, it allocates whole pages and inserts only the
        prompt's full pages; the slots of a trailing partial page are freed.
        With ``session_radix``, a ``session_id`` tags the inserted path as the
        scheduler does for a finished request of that session.
        """
        cache, core, page = self.cache, workflow_cache(self.cache), self.page_size
        agent = core.observe_hint(hint, tokens[:prompt_len], stamp=stamp) if hint is not None else None
        if agent is not None and core.prefetcher is not None:
            core.prefetcher.on_admit(agent)
        generation = (
            cache.ensure_session_generation(session_id) if self.session_radix and session_id else None
        )
        match = cache.match_prefix(MatchPrefixParams(key=RadixKey(list(tokens))))
        hit = match.device_prefix_len
        prefix = cache.path_device_indices(match.last_device_node)[:hit]
        lock = cache.lock(match.last_device_node)
        need = -(-len(tokens) // page) * page - hit
        if self.allocator.available_size() < need:
            cache.evict(EvictParams(num_tokens=need - self.allocator.available_size()))
        new = self.allocator.alloc(need)
        assert new is not None, "pool exhausted"
        cache.unlock(lock)
        aligned = len(tokens) // page * page
        inserted = cache.insert(
            InsertParams(
                key=RadixKey(list(tokens[:aligned])),
                value=torch.cat([prefix, new[: aligned - hit]]),
                prev_prefix_len=hit,
                session_id=session_id,
            )
        )
        if generation is not None:
            req = SimpleNamespace(session_id=session_id, session=None, session_generation=generation)
            cache.session_refs.register_session_ref(req, leaf=inserted.last_device_node)
        if aligned < len(tokens):
            self.allocator.free(new[aligned - hit :])
        if agent is not None:
            core.claim(agent, tokens)
            if hint.expected_pause_s is not None:
                core.expect_pause(agent, hint.expected_pause_s, agent.pauses.last_request)
            core.claim_context(agent, tokens, keep=hint.keep_context)
            core.agent_finished(agent)
        self.served += 1
        if self.served % self.check_every == 0:
            self.check_accounting()
        return hit

    def close_session(self, session_id: str) -> None:
        """The client closed the session (``/close_session``): its KV loses its session reference."""
        self.cache.release_radix_session(session_id)
