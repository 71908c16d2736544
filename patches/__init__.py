"""kvflow's patch set against SGLang 0.5.23 (installed as ``kvflow.patches``).

Only what SGLang's registries cannot reach lives here, one concern per module.
Each module names the SGLang object it touches (``TARGET``) and why. Hooks on
functions go through SGLang's plugin hook registry, so they are applied in
every SGLang process that loads plugins (HTTP server and scheduler alike);
additions to the FastAPI app are made by the launcher in the HTTP process.
"""

from __future__ import annotations

from importlib.metadata import version

import torch
from kvflow.patches import (
    cpu_host_tier,
    cpu_tensor_parallel,
    dp_routing,
    hint_middleware,
    idle_integrity,
    link_emulation,
    metrics,
    prefetch_hold,
    request_checks,
    stats_endpoint,
    workflow_endpoints,
)

from kvflow.config import KVFlowConfig

PINNED_SGLANG_VERSION = "0.5.23"

HOOK_PATCHES = (
    request_checks,
    stats_endpoint,
    prefetch_hold,
    workflow_endpoints,
    idle_integrity,
    metrics,
    dp_routing,
)
CPU_ONLY_PATCHES = (cpu_host_tier, cpu_tensor_parallel)  # registered only where there is no CUDA
OPT_IN_PATCHES = (link_emulation,)  # registered only with --kvflow-emulate-link-gbps
APP_PATCHES = (hint_middleware, stats_endpoint, workflow_endpoints)
# Every module's targets, each module listed once.
ALL_TARGETS = tuple(
    target
    for module in dict.fromkeys((*HOOK_PATCHES, *CPU_ONLY_PATCHES, *OPT_IN_PATCHES, *APP_PATCHES))
    for target in module.TARGETS
)

_CACHE = "sglang.srt.mem_cache.unified_radix_cache.UnifiedRadixCache"
_TREE = "sglang.srt.mem_cache.unified_cache.unified_tree_core.UnifiedTreeCore"
# SGLang internals kvflow relies on outside the hook registry (the README's touch-point table).
# tests/test_patches.py resolves each and checks that every SGLang method kvflow's classes
# override is listed here.
SGLANG_INTERNALS = (
    # The eviction-policy registry and CLI choices (kvflow.cache.eviction).
    "sglang.srt.mem_cache.utils._EVICTION_POLICY_FACTORIES",
    "sglang.srt.arg_groups.choices.RADIX_EVICTION_POLICY_CHOICES",
    # UnifiedRadixCache: overridden by WorkflowRadixCache (kvflow.cache.radix_cache) ...
    *(
        f"{_CACHE}.{name}"
        for name in (
            "__init__",
            "reset",
            "init_hicache",
            "check_hicache_events",
            "match_prefix",
            "checkpoint_into_tree",
            "on_release",
            "evict",
        )
    ),
    # ... and called by its core (kvflow.cache.workflow_cache) and the prefetcher (kvflow.cache.prefetch).
    f"{_CACHE}._apply_cache_actions",
    f"{_CACHE}.load_back",
    f"{_CACHE}.has_free_load_back_slot",
    f"{_CACHE}.ready_to_load_host_cache",
    f"{_CACHE}.sanity_check",
    # UnifiedTreeCore: private methods WorkflowTreeCore (kvflow.cache.tree_core) overrides or calls.
    *(
        f"{_TREE}.{name}"
        for name in (
            "reset",
            "_new_node",
            "_split_node",
            "_remove_leaf_from_parent",
            "evict_device_leaf",
            "_evict_host_leaf",
            "node_by_id",
        )
    ),
    # The device-eviction walk of SGLang's Full component, which WorkflowFullComponent
    # (kvflow.cache.victims) overrides; the cache installs it through the component override; the
    # tree core's leaf set gains nodes only in _update_evictable_leaf_sets (its ``add``).
    *(
        f"sglang.srt.mem_cache.unified_cache.components.full.FullComponent.{name}"
        for name in ("_evict_device_start", "_evict_device_next_node", "_evict_device_end")
    ),
    "sglang.srt.mem_cache.cache_init_params.CacheInitParams.component_registry_override",
    f"{_TREE}._update_evictable_leaf_sets",
    "sglang.srt.mem_cache.radix_cache.RadixKey.child_key_at",
    "sglang.srt.mem_cache.radix_cache.RadixKey.match_at",
    # The scheduler's reservation for the running requests, mirrored by patches/prefetch_hold.py.
    "sglang.srt.managers.schedule_policy.CLIP_MAX_NEW_TOKENS",
    "sglang.srt.managers.schedule_policy.PrefillAdder._get_running_request_total_token_offset",
    "sglang.srt.managers.scheduler_components.new_token_ratio_tracker.NewTokenRatioTracker.current",
    # SGLang's rank-consensus checker, on kvflow's cache decisions as on the base class's.
    "sglang.srt.utils.rank_consensus_checker.rank_consensus",
    # The app's lifespan, wrapped to send the caches the clock (patches/workflow_endpoints.py).
    "sglang.srt.entrypoints.http_server.app.router.lifespan_context",
    # The HTTP process's tokenizer manager, reached by the kvflow routes (stats, workflows).
    "sglang.srt.entrypoints.http_server._global_state",
    "sglang.srt.managers.tokenizer_manager.TokenizerManager.get_internal_state",
    "sglang.srt.managers.tokenizer_manager.TokenizerManager.set_internal_state",
    "sglang.srt.managers.io_struct.GetInternalStateReq.rid",
    "sglang.srt.managers.io_struct.SetInternalStateReq.server_args",
    # The scheduler's metric classes (SGLang's injectable ones), for kvflow's series (patches/metrics.py).
    "sglang.srt.observability.metrics_collector.SchedulerMetricsCollector._counter_cls",
    "sglang.srt.observability.metrics_collector.SchedulerMetricsCollector._gauge_cls",
    # Data parallel routing (patches/dp_routing.py): the field that pins a request to a rank, the
    # hint's transport in it, the policy left alone, the schedulers' load snapshots.
    "sglang.srt.managers.io_struct.TokenizedGenerateReqInput.routed_dp_rank",
    "sglang.srt.sampling.sampling_params.SamplingParams.custom_params",
    "sglang.srt.managers.data_parallel_controller.LoadBalanceMethod.FOLLOW_BOOTSTRAP_ROOM",
    "sglang.srt.managers.load_snapshot.ShmLoadSnapshotReader.read_all",
    "sglang.srt.managers.load_snapshot.LoadSnapshot.dp_rank",
    "sglang.srt.managers.load_snapshot.LoadSnapshot.num_running_reqs",
    "sglang.srt.managers.load_snapshot.LoadSnapshot.num_waiting_reqs",
    # The rank index a scheduler labels its /kvflow/stats answer with (patches/stats_endpoint.py).
    "sglang.srt.runtime_context.ParallelContext.dp_rank",
    # The launcher logs the core split it chose in SGLang's format, before SGLang does.
    "sglang.srt.utils.common.configure_logger",
)
# Attributes of SGLang objects kvflow reads that their class's ``__init__`` sets (so they are not
# on the class): tests/test_patches.py finds each assignment in the source.
SGLANG_INSTANCE_ATTRIBUTES = (
    (
        "sglang.srt.managers.data_parallel_controller.DataParallelController",
        dp_routing.CONTROLLER_ATTRIBUTES,
    ),
)
# The CPU-only sgl_kernel stand-in (kvflow.cpu_kernels) replaces this module where there is no CUDA.
SGL_KERNEL_STANDIN_FOR = "sgl_kernel"

_active: list[str] = []


def check_sglang_version() -> None:
    """Refuse to run against any SGLang release other than the pinned one."""
    installed = version("sglang")
    if installed != PINNED_SGLANG_VERSION:
        raise RuntimeError(
            f"kvflow's patch set targets sglang=={PINNED_SGLANG_VERSION}, but sglang=={installed} "
            "is installed; install the pinned release."
        )


def register_hooks() -> None:
    """Register the hook-registry patches (the caller's ``load_plugins`` applies them).

    The CPU-only patches (``cpu_host_tier``, ``cpu_tensor_parallel``) are registered only where
    there is no CUDA, ``link_emulation`` only when ``--kvflow-emulate-link-gbps`` is set.
    """
    check_sglang_version()
    modules = list(HOOK_PATCHES)
    if not torch.cuda.is_available():
        modules += CPU_ONLY_PATCHES
    for module in modules:
        module.register_hooks()
        _active.append(_short_name(module))
    gbps = (KVFlowConfig.from_env() or KVFlowConfig()).emulate_link_gbps
    if gbps > 0:
        link_emulation.register_hooks(gbps)
        _active.append(_short_name(link_emulation))


def _short_name(module) -> str:
    return module.__name__.rsplit(".", 1)[-1]


def install_app_patches(app) -> None:
    """Add kvflow's middleware and routes to SGLang's FastAPI ``app`` (HTTP process only)."""
    check_sglang_version()
    for module in APP_PATCHES:
        module.install(app)


def active_patches() -> list[str]:
    """Names of the hook patches registered in this process."""
    return list(_active)
