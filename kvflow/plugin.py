"""SGLang plugin entry point (entry-point group ``sglang.srt.plugins``).

SGLang calls :func:`load` early in every process it starts (HTTP server,
scheduler, detokenizer). It does nothing unless the process belongs to a server
started by ``python -m kvflow.launch_server`` (which publishes
``KVFLOW_CONFIG``), so installing kvflow never changes stock SGLang.
"""

from __future__ import annotations

from kvflow.config import KVFlowConfig

STOCK_BACKEND_NAME = "stock"
_registered = False


def load() -> None:
    """Register kvflow's cache backend, tree core, eviction policy and hooks."""
    global _registered
    if _registered or KVFlowConfig.from_env() is None:
        return
    from sglang.srt.mem_cache.registry import (
        default_radix_cache_factory,
        register_radix_cache_backend,
    )

    from kvflow import patches
    from kvflow.cache.eviction import register_eviction_policy
    from kvflow.cache.radix_cache import CACHE_BACKEND_NAME, workflow_cache_factory
    from kvflow.cache.tree_core import register_tree_core

    patches.check_sglang_version()
    register_eviction_policy()
    register_tree_core()
    register_radix_cache_backend(CACHE_BACKEND_NAME, workflow_cache_factory)
    register_radix_cache_backend(STOCK_BACKEND_NAME, default_radix_cache_factory)
    patches.register_hooks()
    _registered = True
