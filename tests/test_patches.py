"""The patch set's hook targets exist in the pinned SGLang, and the version guard works."""

from __future__ import annotations

import pkgutil

import pytest

from kvflow import patches


def test_installed_sglang_is_the_pinned_release():
    patches.check_sglang_version()


def test_version_guard_refuses_another_release(monkeypatch):
    monkeypatch.setattr(patches, "version", lambda name: "0.5.24")
    with pytest.raises(RuntimeError, match="sglang==0.5.23"):
        patches.check_sglang_version()


@pytest.mark.parametrize("target", sorted(set(patches.ALL_TARGETS)))
def test_every_hook_target_exists(target):
    assert pkgutil.resolve_name(target) is not None


def test_registries_kvflow_plugs_into_exist():
    from sglang.srt.arg_groups.choices import add_radix_eviction_policy_choices
    from sglang.srt.mem_cache.registry import create_unified_radix_cache, register_radix_cache_backend
    from sglang.srt.mem_cache.unified_cache.tree_core_registry import register_tree_core_backend
    from sglang.srt.mem_cache.unified_cache.unified_tree_core import UnifiedTreeCore
    from sglang.srt.mem_cache.utils import _EVICTION_POLICY_FACTORIES

    assert callable(register_radix_cache_backend) and callable(register_tree_core_backend)
    assert callable(add_radix_eviction_policy_choices) and callable(create_unified_radix_cache)
    assert "lru" in _EVICTION_POLICY_FACTORIES
    for method in (
        "_new_node",
        "_split_node",
        "_remove_leaf_from_parent",
        "evict_device_leaf",
        "_evict_host_leaf",
    ):
        assert callable(getattr(UnifiedTreeCore, method)), method
