"""Patch: SGLang's HiCache host (CPU memory) tier on a machine without a GPU.

As shipped, ``--enable-hierarchical-cache`` cannot start when the device KV pool itself lives in
CPU memory (SGLang's CPU engine). The launcher adds ``--hicache-io-backend direct
--hicache-mem-layout layer_first`` on CPU, the path implemented here.

- Each hook checks at call time that it is on that path and otherwise calls SGLang's own code
  unchanged, so nothing changes on a GPU machine.
- Copies are synchronous on the scheduler thread, so SGLang's acknowledgement protocol is kept
  unchanged (the optional ``link_emulation`` patch delays the events to emulate a link).

Targets (``TARGETS``, under ``sglang.srt``; the detail is in each hook's docstring):

- ``mem_cache.pool_host.common._cuda_host_register`` (AROUND,
  :func:`_skip_host_register_without_cuda`): no page-locking without CUDA.
- ``mem_cache.pool_host.mha.MHATokenToKVPoolHost.backup_from_device_all_layer`` and
  ``.load_to_device_per_layer`` (AROUND, :func:`_backup_from_device_all_layer`,
  :func:`_load_to_device_per_layer`): the ``direct`` backend's copies in plain torch.
- ``mem_cache.l2_transfer.L2TransferEngine.__init__`` (AFTER, :func:`_add_stream_synchronize`):
  a no-op ``synchronize`` on its CPU streams.
"""

from __future__ import annotations

import torch
from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from kvflow.cpu_kernels.direct_copy import cpu_direct_path, transfer_kv_direct

TARGETS = (
    "sglang.srt.mem_cache.pool_host.common._cuda_host_register",
    "sglang.srt.mem_cache.pool_host.mha.MHATokenToKVPoolHost.backup_from_device_all_layer",
    "sglang.srt.mem_cache.pool_host.mha.MHATokenToKVPoolHost.load_to_device_per_layer",
    "sglang.srt.mem_cache.l2_transfer.L2TransferEngine.__init__",
)


def _skip_host_register_without_cuda(original, buffer, *args, **kwargs):
    """Skip page-locking the host pool's buffer when ``torch.cuda.is_available()`` is false.

    The buffer (``alloc_with_host_register``, the default ``ALLOC_MEMORY_FUNCS`` entry) is
    page-locked with ``cudaHostRegister``, which initialises CUDA and raises without a driver;
    without CUDA there is no DMA to pin for. (Unregistration, ``HostKVCache.destroy``, is already
    skipped off CUDA/ROCm.)
    """
    if not torch.cuda.is_available():
        return None
    return original(buffer, *args, **kwargs)


def _backup_from_device_all_layer(original, pool, device_pool, host_indices, device_indices, io_backend):
    """The ``direct`` backend's device-to-host copy of all layers, on the CPU path.

    The stock code calls ``transfer_kv_direct``, which ``pool_host/mha.py`` imports from
    ``sgl_kernel.kvcacheio`` only on CUDA/ROCm (a ``NameError`` on CPU, so the ``sgl_kernel``
    stand-in cannot help). When the pool's ``_transfer_device`` is the CPU, the backend
    ``direct`` and the layout ``layer_first``, the same copies (host ``k_buffer``/``v_buffer``
    rows, ``host_kv_data_refs``, device ``device_k_buffers``/``device_v_buffers``) are made by
    :func:`kvflow.cpu_kernels.direct_copy.transfer_kv_direct`: plain torch, the CUDA op's
    signature. The copy is synchronous on the scheduler thread, so the acknowledgement protocol
    is unchanged: the completion events are ``torch.cpu.Event`` (``record`` a no-op, ``query()``
    true, ``synchronize`` a no-op), exact once the copy has returned, and the acks are reaped as
    usual.
    """
    if not cpu_direct_path(pool, io_backend):
        return original(pool, device_pool, host_indices, device_indices, io_backend)
    transfer_kv_direct(
        pool.device_k_buffers + pool.device_v_buffers,
        pool.host_kv_data_refs,
        device_indices,
        host_indices,
        pool.page_size,
    )


def _load_to_device_per_layer(
    original, pool, device_pool, host_indices, device_indices, layer_id, io_backend, **kwargs
):
    """The ``direct`` backend's host-to-device copy of one layer, on the CPU path.

    As :func:`_backup_from_device_all_layer`, in the other direction.
    """
    if not cpu_direct_path(pool, io_backend):
        return original(pool, device_pool, host_indices, device_indices, layer_id, io_backend, **kwargs)
    if not kwargs.get("is_draft", False) and not 0 <= layer_id < pool.target_layer_num:
        return
    transfer_kv_direct(
        [pool.k_buffer[layer_id], pool.v_buffer[layer_id]],
        [pool.device_k_buffers[layer_id], pool.device_v_buffers[layer_id]],
        host_indices,
        device_indices,
        pool.page_size,
    )


def _stream_synchronize_noop() -> None:
    """CPU work is synchronous: nothing is ever pending on a ``torch.cpu.Stream``."""


def _add_stream_synchronize(result, engine, *args, **kwargs):
    """Set a no-op ``synchronize`` on the engine's two CPU stream instances only.

    Its transfer streams are ``device_module.Stream()``, i.e. ``torch.cpu.Stream`` on CPU, which
    has no ``synchronize``; ``_submission`` calls it when a transfer raises, which would replace
    the real error with an ``AttributeError``.
    """
    for stream in (engine.device_to_host_stream, engine.host_to_device_stream):
        if isinstance(stream, torch.cpu.Stream) and not hasattr(stream, "synchronize"):
            stream.synchronize = _stream_synchronize_noop
    return None


def register_hooks() -> None:
    HookRegistry.register(TARGETS[0], _skip_host_register_without_cuda, HookType.AROUND)
    HookRegistry.register(TARGETS[1], _backup_from_device_all_layer, HookType.AROUND)
    HookRegistry.register(TARGETS[2], _load_to_device_per_layer, HookType.AROUND)
    HookRegistry.register(TARGETS[3], _add_stream_synchronize, HookType.AFTER)
