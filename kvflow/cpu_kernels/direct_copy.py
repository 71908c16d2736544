"""The host tier's copies on a CPU-only machine: the ``direct`` io backend, ``layer_first`` layout.

SGLang's ``direct`` backend calls ``sgl_kernel.kvcacheio.transfer_kv_direct``, a CUDA op that
``pool_host/mha.py`` imports only on CUDA/ROCm. ``patches/cpu_host_tier.py`` makes the same
copies with :func:`transfer_kv_direct` below, and ``patches/link_emulation.py`` delays exactly
the transfers made on this path.

- :func:`cpu_direct_path` is the one test of the path: a host pool whose transfer device is
  the CPU, backend ``direct``, layout ``layer_first``.
- The copy is plain torch, synchronous, with the CUDA op's signature.
"""

from __future__ import annotations

from typing import Any

import torch


def transfer_kv_direct(src_layers, dst_layers, src_indices, dst_indices, page_size: int = 1) -> None:
    """``sgl_kernel.kvcacheio.transfer_kv_direct`` in torch: ``dst[d] = src[s]`` along dim 0, per layer."""
    if src_indices.numel() == 0:
        return
    src_indices = src_indices.to(torch.int64)
    dst_indices = dst_indices.to(torch.int64)
    for src, dst in zip(src_layers, dst_layers, strict=True):
        dst.index_copy_(0, dst_indices, src.index_select(0, src_indices))


def cpu_direct_path(pool: Any, io_backend: str) -> bool:
    """Whether a transfer of host pool ``pool`` is a CPU device pool on the direct/layer_first path."""
    return pool._transfer_device.type == "cpu" and io_backend == "direct" and pool.layout == "layer_first"
