"""The patch set's hook targets exist in the pinned SGLang, and the version guard works."""

from __future__ import annotations

import ast
import inspect
import pkgutil
import re
from pathlib import Path

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


@pytest.mark.parametrize("name", patches.SGLANG_INTERNALS)
def test_every_sglang_internal_kvflow_relies_on_exists(name):
    # Resolve the owner, then look the last part up: some are runtime-set attributes (``_global_state``
    # is None until the server starts) or fields of SGLang's request structs.
    owner, _, attribute = name.rpartition(".")
    assert hasattr(pkgutil.resolve_name(owner), attribute), name


@pytest.mark.parametrize(("owner", "attributes"), patches.SGLANG_INSTANCE_ATTRIBUTES)
def test_every_sglang_instance_attribute_kvflow_reads_is_set_by_its_init(owner, attributes):
    source = inspect.getsource(pkgutil.resolve_name(owner).__init__)
    for attribute in attributes:
        assert re.search(rf"self\.{re.escape(attribute)}\s*(:[^=\n]+)?=", source), f"{owner}.{attribute}"


def _overrides(cls: type, base: type) -> set[str]:
    # Dunders other than __init__ come from the class machinery (ABCMeta adds __subclasshook__).
    methods = {name for name, value in vars(cls).items() if callable(value) and hasattr(base, name)}
    return {name for name in methods if not name.startswith("__") or name == "__init__"}


def test_every_sglang_method_kvflow_overrides_is_listed_as_an_internal():
    from sglang.srt.mem_cache.unified_cache.components.full import FullComponent
    from sglang.srt.mem_cache.unified_cache.unified_tree_core import UnifiedTreeCore
    from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

    from kvflow.cache.radix_cache import WorkflowRadixCache
    from kvflow.cache.tree_core import WorkflowTreeCore
    from kvflow.cache.victims import WorkflowFullComponent

    pairs = (
        (WorkflowRadixCache, UnifiedRadixCache),
        (WorkflowTreeCore, UnifiedTreeCore),
        (WorkflowFullComponent, FullComponent),
    )
    for cls, base in pairs:
        listed = {name.rsplit(".", 1)[-1] for name in patches.SGLANG_INTERNALS if base.__name__ in name}
        assert _overrides(cls, base) <= listed, sorted(_overrides(cls, base) - listed)


def test_the_sgl_kernel_standin_is_importable_as_sgl_kernel():
    from kvflow.cpu_kernels import STANDIN_PATH

    assert (Path(STANDIN_PATH) / patches.SGL_KERNEL_STANDIN_FOR / "__init__.py").is_file()


def test_cpu_host_tier_is_registered_only_without_cuda(monkeypatch):
    from sglang.srt.plugins.hook_registry import HookRegistry

    registered = []
    monkeypatch.setattr(HookRegistry, "register", lambda target, *args, **kw: registered.append(target))
    for cuda in (False, True):
        registered.clear()
        monkeypatch.setattr(patches, "_active", [])
        monkeypatch.setattr(patches.torch.cuda, "is_available", lambda cuda=cuda: cuda)
        patches.register_hooks()
        assert ("cpu_host_tier" in patches.active_patches()) is not cuda
        assert bool(set(patches.cpu_host_tier.TARGETS) & set(registered)) is not cuda
        assert "prefetch_hold" in patches.active_patches()


def test_registries_kvflow_plugs_into_exist():
    from sglang.srt.arg_groups.choices import add_radix_eviction_policy_choices
    from sglang.srt.mem_cache.registry import create_unified_radix_cache, register_radix_cache_backend
    from sglang.srt.mem_cache.unified_cache.tree_core_registry import register_tree_core_backend
    from sglang.srt.mem_cache.unified_cache.unified_tree_core import UnifiedTreeCore
    from sglang.srt.mem_cache.utils import _EVICTION_POLICY_FACTORIES

    from kvflow.cache.tree_core import WorkflowTreeCore

    assert callable(register_radix_cache_backend) and callable(register_tree_core_backend)
    assert callable(add_radix_eviction_policy_choices) and callable(create_unified_radix_cache)
    assert "lru" in _EVICTION_POLICY_FACTORIES
    assert issubclass(WorkflowTreeCore, UnifiedTreeCore)


PATCH_DIR = Path(patches.__file__).resolve().parent
PATCH_MODULES = sorted(path.stem for path in PATCH_DIR.glob("*.py") if path.stem != "__init__")


def imported_names(source: str) -> set[str]:
    """Every module (and ``module.name``) a source file imports, relative imports with their dots."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            names.add(base)
            names.update(base + ("" if base.endswith(".") else ".") + alias.name for alias in node.names)
    return names


@pytest.mark.parametrize("name", PATCH_MODULES)
def test_no_patch_imports_another_patch(name):
    # Shared helpers live in kvflow (kvflow.control, kvflow.frontend, kvflow.cpu_kernels), not in a patch.
    siblings = {
        prefix + other
        for other in PATCH_MODULES
        if other != name
        for prefix in ("kvflow.patches.", "patches.", ".")
    }
    assert not imported_names((PATCH_DIR / f"{name}.py").read_text()) & siblings


def test_the_import_check_sees_every_spelling():
    source = "from kvflow.patches.a import x\nfrom kvflow.patches import b\nfrom . import c\nimport patches.d"
    assert {"kvflow.patches.a", "kvflow.patches.b", ".c", "patches.d"} <= imported_names(source)
