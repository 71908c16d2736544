"""Patch: check kvflow's ownership bookkeeping where SGLang checks its tree cache when idle.

Target: ``SchedulerInvariantChecker._check_tree_cache`` (an AFTER hook in the
scheduler process). SGLang calls it on every idle pass, after its pool
accounting check, and runs its own tree check there only with
``SGLANG_ENABLE_TREE_CACHE_SANITY_CHECK`` (on by default in SGLang's CI). With
that flag this hook also runs the kvflow core's ``check_ownership()``: every
cached subtree minimum recomputed, every owner's back-link. A violation raises
in the scheduler, as SGLang's own strict checks do.
"""

from __future__ import annotations

from sglang.srt.environ import envs
from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from kvflow.cache.radix_cache import workflow_cache

TARGETS = (
    "sglang.srt.managers.scheduler_components.invariant_checker.SchedulerInvariantChecker._check_tree_cache",
)


def _check_ownership(result, checker, *args, **kwargs):
    core = workflow_cache(checker.tree_cache)
    if envs.SGLANG_ENABLE_TREE_CACHE_SANITY_CHECK.get() and core is not None:
        core.check_ownership()
    return result


def register_hooks() -> None:
    HookRegistry.register(TARGETS[0], _check_ownership, HookType.AFTER)
