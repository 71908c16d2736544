"""kvflow's patch set against SGLang 0.5.23 (installed as ``kvflow.patches``).

Only what SGLang's registries cannot reach lives here, one concern per module. Hooks on
functions go through SGLang's plugin hook registry, so they are applied in every SGLang process
that loads plugins (HTTP server and scheduler alike); additions to the FastAPI app are made by the
launcher in the HTTP process.

- Each patch module names the SGLang objects it hooks (``TARGETS``) and why.
- Every other SGLang name kvflow reads, writes or replaces is listed here: ``SGLANG_INTERNALS``
  (resolvable on a module or class) and ``SGLANG_INSTANCE_ATTRIBUTES`` (set on instances);
  tests/test_patches.py checks all of them against the installed SGLang.
- ``check_sglang_version`` refuses any SGLang but the pinned release.
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

_SRT = "sglang.srt"
_CACHE = f"{_SRT}.mem_cache.unified_radix_cache.UnifiedRadixCache"
_TREE_MODULE = f"{_SRT}.mem_cache.unified_cache.unified_tree_core"
_TREE = f"{_TREE_MODULE}.UnifiedTreeCore"
_NODE = f"{_TREE_MODULE}.UnifiedTreeNode"
_FULL = f"{_SRT}.mem_cache.unified_cache.components.full.FullComponent"
_IO = f"{_SRT}.managers.io_struct"
_CONTROLLER = f"{_SRT}.managers.cache_controller"
_L2 = f"{_SRT}.mem_cache.l2_transfer"
_HOST_POOL = f"{_SRT}.mem_cache.pool_host.mha.MHATokenToKVPoolHost"


def _on(owner: str, *names: str) -> tuple[str, ...]:
    return tuple(f"{owner}.{name}" for name in names)


# SGLang internals kvflow relies on outside the hook registry, each resolvable on its module or
# class: methods, properties, class attributes and the fields of SGLang's dataclasses, structs and
# NamedTuples kvflow reads, writes or builds (the README's touch-point table). tests/test_patches.py
# resolves each and checks that every SGLang method kvflow's classes override is listed here.
SGLANG_INTERNALS = (
    # The eviction-policy registry and CLI choices (kvflow.cache.eviction).
    f"{_SRT}.mem_cache.utils._EVICTION_POLICY_FACTORIES",
    f"{_SRT}.arg_groups.choices.RADIX_EVICTION_POLICY_CHOICES",
    # UnifiedRadixCache: overridden by WorkflowRadixCache (kvflow.cache.radix_cache) ...
    *_on(
        _CACHE,
        "__init__",
        "reset",
        "init_hicache",
        "check_hicache_events",
        "match_prefix",
        "checkpoint_into_tree",
        "on_release",
        "evict",
        "evict_for_alloc",
    ),
    # ... and called or read by its core (kvflow.cache.workflow_cache), the prefetcher
    # (kvflow.cache.prefetch) and the integrity checks.
    *_on(
        _CACHE,
        "_apply_cache_actions",
        "load_back",
        "has_free_load_back_slot",
        "ready_to_load_host_cache",
        "sanity_check",
        "_component_available_size",
        "evictable_size",
        "protected_size",
        "page_size",
        "cache_controller",
    ),
    f"{_SRT}.mem_cache.allocator.BaseTokenToKVPoolAllocator.available_size",
    # What the cache builds and reads: its init parameters (the tree core and Full component it
    # asks for), a match's request, an eviction's size, a device eviction's deferred write-back.
    *_on(
        f"{_SRT}.mem_cache.cache_init_params.CacheInitParams",
        "tree_core_backend",
        "component_registry_override",
        "eviction_policy",
    ),
    f"{_SRT}.mem_cache.base_prefix_cache.MatchPrefixParams.req",
    f"{_SRT}.mem_cache.base_prefix_cache.EvictParams.num_tokens",
    f"{_SRT}.mem_cache.unified_cache.unified_tree_core_interface.EvictDeviceLeafResult.backup_kv",
    # UnifiedTreeCore: private methods WorkflowTreeCore (kvflow.cache.tree_core) overrides or calls.
    *_on(
        _TREE,
        "reset",
        "_new_node",
        "_split_node",
        "_remove_leaf_from_parent",
        "evict_device_leaf",
        "_evict_host_leaf",
        "node_by_id",
    ),
    # A node's tiers, and the Full component's data on it (device indices, lock count).
    *_on(_NODE, "evicted", "backuped"),
    f"{_SRT}.mem_cache.unified_cache.components.ComponentType.FULL",
    *_on(f"{_SRT}.mem_cache.unified_cache.components.base.ComponentData", "value", "lock_ref"),
    # The device-eviction walk of SGLang's Full component, which WorkflowFullComponent
    # (kvflow.cache.victims) overrides; the cache installs it through the component override; the
    # tree core's leaf set gains nodes only in _update_evictable_leaf_sets (its ``add``).
    *_on(_FULL, "_evict_device_start", "_evict_device_next_node", "_evict_device_end", "component_type"),
    f"{_TREE}._update_evictable_leaf_sets",
    f"{_SRT}.mem_cache.radix_cache.RadixKey.child_key_at",
    f"{_SRT}.mem_cache.radix_cache.RadixKey.match_at",
    # A request as the cache reads it (its hint's transport, its end) and as prefetch_hold
    # estimates it (output budget, the running batch).
    f"{_SRT}.managers.schedule_batch.Req.finished",
    *_on(f"{_SRT}.sampling.sampling_params.SamplingParams", "custom_params", "ignore_eos", "max_new_tokens"),
    f"{_SRT}.managers.schedule_batch.ScheduleBatch.reqs",
    # The scheduler's reservation for the running requests, mirrored by patches/prefetch_hold.py.
    f"{_SRT}.managers.schedule_policy.CLIP_MAX_NEW_TOKENS",
    f"{_SRT}.managers.schedule_policy.PrefillAdder._get_running_request_total_token_offset",
    f"{_SRT}.managers.scheduler_components.new_token_ratio_tracker.NewTokenRatioTracker.current",
    # SGLang's rank-consensus checker, on kvflow's cache decisions as on the base class's.
    f"{_SRT}.utils.rank_consensus_checker.rank_consensus",
    # The idle check's tree cache and flag (patches/idle_integrity.py).
    f"{_SRT}.managers.scheduler_components.invariant_checker.SchedulerInvariantChecker.tree_cache",
    f"{_SRT}.environ.envs.SGLANG_ENABLE_TREE_CACHE_SANITY_CHECK",
    # The app's lifespan, wrapped to send the caches the clock (patches/workflow_endpoints.py).
    f"{_SRT}.entrypoints.http_server.app.router.lifespan_context",
    # The HTTP process's tokenizer manager, reached by the kvflow routes (stats, workflows), and
    # the internal-state requests and replies they ride.
    f"{_SRT}.entrypoints.http_server._global_state",
    f"{_SRT}.entrypoints.http_server._GlobalState.tokenizer_manager",
    *_on(
        f"{_SRT}.managers.tokenizer_manager.TokenizerManager",
        "get_internal_state",
        "set_internal_state",
        "auto_create_handle_loop",
    ),
    # ``TokenizerManager.get_internal_state_communicator`` is made by ``setattr`` from these specs.
    f"{_SRT}.managers.tokenizer_control_mixin._COMMUNICATOR_SPECS",
    f"{_IO}.GetInternalStateReq.rid",
    f"{_IO}.GetInternalStateReqOutput.internal_state",
    f"{_IO}.SetInternalStateReq.server_args",
    f"{_IO}.SetInternalStateReqOutput.updated",
    # The request bodies patches/hint_middleware.py rewrites before SGLang parses them.
    *_on(f"{_IO}.GenerateReqInput", "sampling_params", "input_ids", "kv_hints", "session_params"),
    *_on(
        f"{_SRT}.entrypoints.openai.protocol.CompletionRequest", "prompt", "custom_params", "session_params"
    ),
    *_on(f"{_SRT}.entrypoints.openai.protocol.ChatCompletionRequest", "custom_params", "session_params"),
    f"{_SRT}.managers.kv_hints.KvHintsEnvelope.actions",
    *_on(f"{_SRT}.managers.kv_hints.KvHintAction", "action_type", "payload"),
    # The scheduler's metric classes (SGLang's injectable ones), for kvflow's series (patches/metrics.py).
    f"{_SRT}.managers.scheduler_components.metrics_reporter.SchedulerMetricsReporter.metrics_collector",
    f"{_SRT}.observability.metrics_collector.SchedulerMetricsCollector._counter_cls",
    f"{_SRT}.observability.metrics_collector.SchedulerMetricsCollector._gauge_cls",
    # Data parallel routing (patches/dp_routing.py): the field that pins a request to a rank, the
    # hint's transport in it, the policy left alone, the schedulers' load snapshots.
    f"{_IO}.TokenizedGenerateReqInput.routed_dp_rank",
    f"{_IO}.TokenizedGenerateReqInput.sampling_params",
    f"{_SRT}.managers.data_parallel_controller.LoadBalanceMethod.FOLLOW_BOOTSTRAP_ROOM",
    f"{_SRT}.managers.load_snapshot.ShmLoadSnapshotReader.read_all",
    *_on(f"{_SRT}.managers.load_snapshot.LoadSnapshot", "dp_rank", "num_running_reqs", "num_waiting_reqs"),
    # The rank index a scheduler labels its /kvflow/stats answer with (patches/stats_endpoint.py).
    f"{_SRT}.runtime_context.ParallelContext.dp_rank",
    # The host tier's copies (patches/cpu_host_tier.py) and their emulated link
    # (patches/link_emulation.py): transfers, completions and acks, a load's per-layer events.
    *_on(_HOST_POOL, "k_buffer", "v_buffer"),
    *_on(f"{_L2}.L2Transfer", "host_pool", "host_indices"),
    *_on(f"{_L2}.TransferCompletion", "start_event", "finish_event"),
    *_on(f"{_CONTROLLER}.HiCacheAck", "start_event", "finish_event"),
    f"{_CONTROLLER}.LayerLoadingEvent.finish_event",
    # The launcher logs the core split it chose in SGLang's format, before SGLang does.
    f"{_SRT}.utils.common.configure_logger",
)
# Attributes of SGLang objects kvflow reads, writes or replaces that only instances have (set by
# ``__init__`` or a later method), by class. tests/test_patches.py checks each on a real object it
# builds on CPU where that is cheap (the cache, tree core, node, allocator, request), else finds
# the ``self.<name> = ...`` assignment in the class's source.
SGLANG_INSTANCE_ATTRIBUTES = (
    # The cache's tree core, pool, and the HiCache loads in flight (read by the prefetcher).
    (_CACHE, ("tree_core", "token_to_kv_pool_allocator", "ongoing_load_back")),
    # ``evictable_device_leaves`` is replaced by kvflow.cache.victims.EvictableLeaves (a set subclass).
    (
        _TREE,
        (
            "evictable_device_leaves",
            "enable_session_radix_cache",
            "eviction_strategy",
            "root_node",
            "page_size",
            "components_by_type",
            "is_host_memory_buffer_only",
        ),
    ),
    (
        _NODE,
        (
            "key",
            "parent",
            "children",
            "id",
            "last_access_time",
            "component_data",
            "write_through_pending_id",
            "load_back_pending_id",
        ),
    ),
    (_FULL, ("tree_core", "cache", "_evict_device_request_cnt")),
    (f"{_SRT}.mem_cache.allocator.BaseTokenToKVPoolAllocator", ("size", "page_size")),
    (
        f"{_SRT}.managers.schedule_batch.Req",
        (
            "origin_input_ids",
            "extra_key",
            "cache_salt",
            "sampling_params",
            "finished_reason",
            "cached_tokens",
            "cached_tokens_device",
            "cached_tokens_host",
            "output_ids",
            "prefix_len",
        ),
    ),
    (
        f"{_SRT}.managers.scheduler.Scheduler",
        ("tree_cache", "waiting_queue", "new_token_ratio_tracker", "metrics_reporter"),
    ),
    (f"{_SRT}.managers.scheduler_components.internal_state.SchedulerInternalStateController", ("scheduler",)),
    (f"{_SRT}.observability.metrics_collector.SchedulerMetricsCollector", ("labels",)),
    (f"{_SRT}.managers.tokenizer_manager.TokenizerManager", ("model_config",)),
    (f"{_SRT}.configs.model_config.ModelConfig", ("vocab_size",)),
    (f"{_SRT}.managers.data_parallel_controller.DataParallelController", dp_routing.CONTROLLER_ATTRIBUTES),
    (
        _HOST_POOL,
        (
            "_transfer_device",
            "layout",
            "device_k_buffers",
            "device_v_buffers",
            "host_kv_data_refs",
            "page_size",
            "target_layer_num",
            "size_per_token",
        ),
    ),
    (f"{_L2}.L2TransferEngine", ("device_to_host_stream", "host_to_device_stream", "io_backend")),
    (f"{_CONTROLLER}.HiCacheController", ("layer_done_counter", "load_queue", "ack_load_queue")),
    (f"{_CONTROLLER}.LayerDoneCounter", ("events", "producer_index", "num_counters")),
    (f"{_CONTROLLER}.LayerLoadingEvent", ("load_events",)),
    # Set by patches/cpu_tensor_parallel.py for a CPU device, as SGLang sets them without NCCL.
    (
        f"{_SRT}.distributed.device_communicators.pynccl.PyNcclCommunicator",
        ("group", "available", "disabled"),
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
