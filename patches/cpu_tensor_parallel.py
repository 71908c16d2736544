"""Patch: tensor parallelism (``--tp-size N``) on SGLang's CPU engine.

As shipped, ``--tp-size 2 --device cpu`` cannot start: every model-parallel ``GroupCoordinator``
(``distributed/parallel_state.py``) is created with ``use_pynccl`` true off NPU/XPU, and when the
NCCL library can be loaded (the torch wheel ships it, GPU or not) ``PyNcclCommunicator.__init__``
goes on to ``torch.cuda.device(device)`` with the group's CPU device and raises ``Expected a cuda
device, but got: cpu``.

- Target (``TARGETS``, under ``sglang.srt``):
  ``distributed.device_communicators.pynccl.PyNcclCommunicator.__init__`` (AROUND,
  :func:`_disable_pynccl_on_cpu`): a CPU device's communicator is built disabled, so gloo reduces
  the group's CPU tensors; on a CUDA device SGLang's ``__init__`` runs unchanged.
- No shared-memory ops are needed from the ``sgl_kernel`` stand-in, and with more ranks than
  NUMA nodes SGLang asks for ``SGLANG_CPU_OMP_THREADS_BIND`` (see :func:`_disable_pynccl_on_cpu`).
"""

from __future__ import annotations

import torch
from sglang.srt.plugins.hook_registry import HookRegistry, HookType

TARGETS = ("sglang.srt.distributed.device_communicators.pynccl.PyNcclCommunicator.__init__",)


def _cpu_device(device) -> bool:
    return not isinstance(device, int) and torch.device(device).type == "cpu"


def _disable_pynccl_on_cpu(original, communicator, group, device, *args, **kwargs):
    """Build a CPU device's communicator as SGLang does when NCCL cannot be loaded.

    That is SGLang's path "e.g. in a non-GPU environment": ``available`` and ``disabled`` set, no
    NCCL communicator. ``GroupCoordinator`` then skips it, and its CPU tensors are reduced and
    gathered by ``torch.distributed`` on the group's ``device_group``, which is gloo for the CPU
    device (``get_default_distributed_backend``). On a CUDA device SGLang's ``__init__`` runs
    unchanged.

    SGLang's shared-memory all-reduce (``sgl_kernel.shm_allreduce``) is used only on AMX or arm64
    hosts, where ``_init_cpu_threads_env`` sets ``LOCAL_SIZE``; elsewhere ``LOCAL_SIZE`` stays 0
    and ``is_shm_available`` is false, so the stand-in needs no shared-memory ops. With more ranks
    than NUMA nodes SGLang asks for ``SGLANG_CPU_OMP_THREADS_BIND`` (one ``|``-separated core list
    per rank, e.g. ``0|1`` for two ranks on a 2-core machine).
    """
    if not _cpu_device(device):
        return original(communicator, group, device, *args, **kwargs)
    communicator.group = group
    communicator.available = False
    communicator.disabled = True
    return None


def register_hooks() -> None:
    HookRegistry.register(TARGETS[0], _disable_pynccl_on_cpu, HookType.AROUND)
