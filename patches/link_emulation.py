"""Patch: emulate the host<->device link of the CPU host tier (``--kvflow-emulate-link-gbps``).

On the CPU host tier (``cpu_host_tier``) every HiCache copy is synchronous, so a load costs no
more than a memory copy and overlap cannot show. With ``--kvflow-emulate-link-gbps G`` (GB/s:
1e9 bytes per second) a transfer still copies at once, data unchanged, but the events SGLang
observes its completion through become :class:`LinkEvent`: ``query()`` is false until the
deadline and ``synchronize()`` sleeps until it (docs/design.md, "Two tiers and prefetch").

- The hooks are registered only when G > 0 (the launcher refuses the flag on a CUDA machine and
  without HiCache); each acts only on the CPU direct/layer_first path of ``cpu_host_tier``
  (:func:`kvflow.cpu_kernels.direct_copy.cpu_direct_path`).
- One FIFO link per direction (:class:`EmulatedLink`): a transfer of B bytes starts when it is
  issued or when the one before it in its direction completed, whichever is later, and completes
  B / (G * 1e9) seconds after it starts.

Targets (``TARGETS``, under ``sglang.srt``; the detail is in each hook's docstring):

- ``mem_cache.l2_transfer.L2TransferEngine.submit_device_to_host`` and ``.submit_host_to_device``
  (AROUND, :func:`_delay_transfer`): every host tier copy is booked on its direction's link.
- ``managers.cache_controller.HiCacheController.start_loading`` (AROUND,
  :func:`_spread_load_over_layers`): a load lands layer by layer, its layers' deadlines spread.
- ``managers.cache_controller.LayerLoadingEvent.wait`` (AROUND, :func:`_wait_for_layer`): the
  forward pass waits for each layer's deadline (the stock CPU wait is a no-op).
- ``mem_cache.l2_transfer.L2TransferEngine.__init__`` (AFTER, :func:`_announce`): logs at
  start-up that the link is emulated.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

import torch
from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from kvflow.cpu_kernels.direct_copy import cpu_direct_path

TARGETS = (
    "sglang.srt.mem_cache.l2_transfer.L2TransferEngine.submit_device_to_host",
    "sglang.srt.mem_cache.l2_transfer.L2TransferEngine.submit_host_to_device",
    "sglang.srt.managers.cache_controller.HiCacheController.start_loading",
    "sglang.srt.managers.cache_controller.LayerLoadingEvent.wait",
    "sglang.srt.mem_cache.l2_transfer.L2TransferEngine.__init__",
)

logger = logging.getLogger(__name__)


class LinkEvent:
    """A transfer's completion event: done at ``deadline`` (``time.monotonic()`` seconds)."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline

    def record(self, stream: Any = None) -> None:
        """Nothing to record: the deadline was set when the transfer was booked."""

    def query(self) -> bool:
        """Whether the transfer has completed."""
        return time.monotonic() >= self.deadline

    def synchronize(self) -> None:
        """Sleep until the transfer has completed."""
        delay = self.deadline - time.monotonic()
        if delay > 0:
            time.sleep(delay)


class EmulatedLink:
    """One direction of the link: transfers cross it one after another at ``gbps`` GB/s."""

    def __init__(self, gbps: float) -> None:
        self.bytes_per_second = gbps * 1e9
        self.free_at = 0.0

    def book(self, num_bytes: int, issued: float) -> tuple[float, float]:
        """Start and finish (monotonic seconds) of a transfer of ``num_bytes`` issued at ``issued``."""
        start = max(issued, self.free_at)
        self.free_at = start + num_bytes / self.bytes_per_second
        return start, self.free_at


def layer_events(start: float, finish: float, num_layers: int) -> list[LinkEvent]:
    """Per-layer completion events of a layer-by-layer load on the link from ``start`` to ``finish``."""
    return [LinkEvent(start + (finish - start) * (i + 1) / num_layers) for i in range(num_layers)]


def _delay_transfer(link: EmulatedLink, original, engine, transfers, **kwargs):
    """Book every host tier copy (backups, load-backs, a retraction's backup and restore) on ``link``.

    A copy counts ``len(host_indices) * host_pool.size_per_token`` bytes (SGLang's own byte
    count); the completion returned to the caller carries the link's start and finish events.
    The controller's ack queues, reaped by ``writing_check`` / ``loading_check`` only once
    ``query()`` is true, and the allocator's transfer-done event get these, so a prefetch is
    acknowledged (and the requests ``prefetch_hold`` holds are released) late, while the
    scheduler goes on with other work.
    """
    issued = time.monotonic()
    completion = original(engine, transfers, **kwargs)
    if not transfers or not all(cpu_direct_path(t.host_pool, engine.io_backend) for t in transfers):
        return completion
    num_bytes = sum(len(t.host_indices) * t.host_pool.size_per_token for t in transfers)
    start, finish = link.book(num_bytes, issued)
    return completion._replace(start_event=LinkEvent(start), finish_event=LinkEvent(finish))


def _spread_load_over_layers(original, controller):
    """Give a load's per-layer events deadlines spread evenly over its time on the link.

    A load lands layer by layer: the per-layer events of its ``LayerDoneCounter`` producer slot
    get layer i of L at start + (i + 1) / L of the load (the last one is the finish). One of the
    three producer slots is reused per load, and ``update_producer`` asserts that the slot's
    previous load finished: before a load starts, this waits for that emulated finish (only an
    on-demand load can find all three slots busy; the prefetcher waits for a free one).
    """
    counter = controller.layer_done_counter
    if controller.load_queue:
        reused = counter.events[(counter.producer_index + 1) % counter.num_counters].finish_event
        if isinstance(reused, LinkEvent):
            reused.synchronize()
    producer_id = original(controller)
    if producer_id >= 0:
        ack = controller.ack_load_queue[-1]
        if isinstance(ack.finish_event, LinkEvent):
            events = counter.events[producer_id].load_events
            events[:] = layer_events(ack.start_event.deadline, ack.finish_event.deadline, len(events))
    return producer_id


def _wait_for_layer(original, layer_event, layer_index):
    """Sleep until a layer's deadline before the forward pass reads its KV.

    A batch that consumes an on-demand load waits for each layer (``LayerDoneCounter.wait_until``
    from the KV pool's ``get_key_buffer`` / ``get_value_buffer``). On CPU the stock wait is
    ``torch.cpu.Stream.wait_event``, a no-op.
    """
    event = layer_event.load_events[layer_index]
    if isinstance(event, LinkEvent):
        event.synchronize()
    return original(layer_event, layer_index)


def _announce(gbps: float, result, engine, *args, **kwargs):
    """Log that the link is emulated, when a HiCache controller builds its CPU transfer engine."""
    if isinstance(engine.host_to_device_stream, torch.cpu.Stream):
        logger.warning(
            "kvflow: the CPU host tier's host<->device link is EMULATED at %g GB/s per direction "
            "(--kvflow-emulate-link-gbps); transfer times are emulation, not measurements",
            gbps,
        )
    return None


def register_hooks(gbps: float) -> None:
    """Register the hooks for a link of ``gbps`` GB/s per direction (call only when ``gbps > 0``)."""
    HookRegistry.register(TARGETS[0], functools.partial(_delay_transfer, EmulatedLink(gbps)), HookType.AROUND)
    HookRegistry.register(TARGETS[1], functools.partial(_delay_transfer, EmulatedLink(gbps)), HookType.AROUND)
    HookRegistry.register(TARGETS[2], _spread_load_over_layers, HookType.AROUND)
    HookRegistry.register(TARGETS[3], _wait_for_layer, HookType.AROUND)
    HookRegistry.register(TARGETS[4], functools.partial(_announce, gbps), HookType.AFTER)
