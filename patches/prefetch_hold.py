"""Patch: hold back waiting requests whose prompt is still being prefetched.

While a kvflow prefetch (``kvflow.cache.prefetch``) is in flight, its nodes already carry device
indices but their KV has not landed. One hook, on ``Scheduler.get_new_batch_prefill`` (AROUND,
:func:`_hold_prefetching`), keeps such requests out of the scheduling pass and tells the cache
how much room the scheduler's requests will still take.

- A held request is neither dispatched on unfinished KV nor triggers a second load; once the
  load is acknowledged it is matched again and uses it. The cache counts each held request once
  (``prefetch.held`` in the stats).
- A prefetch takes room only where the running and waiting requests leave some, or the prompt
  it loads is evicted again before its request comes.
"""

from __future__ import annotations

from typing import Any

from sglang.srt.managers.schedule_policy import CLIP_MAX_NEW_TOKENS
from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from kvflow.cache.radix_cache import workflow_cache

TARGETS = ("sglang.srt.managers.scheduler.Scheduler.get_new_batch_prefill",)


def _decode_estimate(req: Any, tokens_left: int, new_token_ratio: float) -> float:
    """Output tokens ``req`` may still write, as SGLang's ``PrefillAdder`` reserves them
    (``_get_running_request_total_token_offset``)."""
    ratio = 1.0 if req.sampling_params.ignore_eos else new_token_ratio
    return min(tokens_left, CLIP_MAX_NEW_TOKENS) * ratio


def running_growth(running_batch: Any, new_token_ratio: float) -> float:
    """Tokens the running requests may still decode."""
    if running_batch is None:
        return 0.0
    return sum(
        _decode_estimate(req, req.sampling_params.max_new_tokens - len(req.output_ids), new_token_ratio)
        for req in running_batch.reqs
    )


def waiting_demand(waiting_queue: list, new_token_ratio: float) -> float:
    """Tokens the waiting requests will allocate: their prompt beyond the prefix matched on the
    device (``prefix_len``, 0 until first matched) and their output, estimated like the running ones'."""
    return sum(
        len(req.origin_input_ids)
        - req.prefix_len
        + _decode_estimate(req, req.sampling_params.max_new_tokens, new_token_ratio)
        for req in waiting_queue
    )


def _hold_prefetching(original, scheduler, *args, **kwargs):
    """Run a scheduling pass without the requests whose prompt runs through an unlanded prefetch.

    They are taken out of the waiting queue for this pass and put back at its head afterwards.
    The queue is filtered in place because other scheduler parts hold the list, and the held
    requests go back into ``scheduler.waiting_queue`` as it is after the call: when a batch forms,
    SGLang replaces the list with a new one
    (``self.waiting_queue = [x for x in self.waiting_queue if x not in can_run_set]``).

    It also tells the cache how many tokens the scheduler's requests will still take: what the
    running ones may decode (SGLang's own estimate, as its ``PrefillAdder`` reserves them,
    :func:`running_growth`) plus what the waiting ones will prefill and decode
    (:func:`waiting_demand`).
    """
    core = workflow_cache(scheduler.tree_cache)
    if core is not None:
        running_batch = args[0] if args else kwargs.get("running_batch")
        ratio = scheduler.new_token_ratio_tracker.current
        # Summed over both queues only if the cache prefetches (it calls the estimate then).
        core.note_reserved_tokens(
            lambda: running_growth(running_batch, ratio) + waiting_demand(scheduler.waiting_queue, ratio)
        )
    queue = scheduler.waiting_queue
    held = [req for req in queue if core.blocks(req)] if core is not None and queue else []
    if not held:
        return original(scheduler, *args, **kwargs)
    held_ids = {id(req) for req in held}
    queue[:] = [req for req in queue if id(req) not in held_ids]
    try:
        return original(scheduler, *args, **kwargs)
    finally:
        scheduler.waiting_queue[:0] = held


def register_hooks() -> None:
    HookRegistry.register(TARGETS[0], _hold_prefetching, HookType.AROUND)
