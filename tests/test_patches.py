"""kvflow's touch points exist in the pinned SGLang, and the version guard works.

- Every hook target (``TARGETS`` of each patch module) resolves.
- Every SGLang internal (``SGLANG_INTERNALS``) resolves on its module or class: an attribute, or a
  field of a dataclass, msgspec struct, pydantic model or NamedTuple.
- Every instance attribute (``SGLANG_INSTANCE_ATTRIBUTES``) is on a real object built on CPU for
  the classes in ``BUILT`` (cache, tree core, node, allocator, request), else assigned as
  ``self.<name>`` in the source of its class or an SGLang base.
- Every SGLang method kvflow's classes override is listed; the patch tables of the README and of
  docs/design.md name every patch module, the full one every target.
- ``kvflow.plugin.load`` registers kvflow's names in SGLang's registries.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import pkgutil
import re
import textwrap
from functools import cache
from pathlib import Path

import pytest

from kvflow import NAME, patches

ROOT = Path(__file__).resolve().parents[1]
PATCH_MODULES = {
    module.__name__.rsplit(".", 1)[-1]: module
    for module in (
        *patches.HOOK_PATCHES,
        *patches.CPU_ONLY_PATCHES,
        *patches.OPT_IN_PATCHES,
        *patches.APP_PATCHES,
    )
}
_SRT = "sglang.srt"
# The classes whose instance attributes are checked on a real object (the ``sglang_objects`` fixture).
BUILT = (
    f"{_SRT}.mem_cache.unified_radix_cache.UnifiedRadixCache",
    f"{_SRT}.mem_cache.unified_cache.unified_tree_core.UnifiedTreeCore",
    f"{_SRT}.mem_cache.unified_cache.unified_tree_core.UnifiedTreeNode",
    f"{_SRT}.mem_cache.allocator.BaseTokenToKVPoolAllocator",
    f"{_SRT}.managers.schedule_batch.Req",
)


def test_installed_sglang_is_the_pinned_release():
    patches.check_sglang_version()


def test_version_guard_refuses_another_release(monkeypatch):
    monkeypatch.setattr(patches, "version", lambda name: "0.5.24")
    with pytest.raises(RuntimeError, match="sglang==0.5.23"):
        patches.check_sglang_version()


@pytest.mark.parametrize("target", sorted(set(patches.ALL_TARGETS)))
def test_every_hook_target_exists(target):
    assert pkgutil.resolve_name(target) is not None


def _fields(cls: type) -> set[str]:
    """Field names of a dataclass, msgspec struct, pydantic model or NamedTuple (none otherwise)."""
    names = {*getattr(cls, "__struct_fields__", ()), *getattr(cls, "_fields", ())}
    names |= set(getattr(cls, "model_fields", {}))
    if dataclasses.is_dataclass(cls):
        names |= {field.name for field in dataclasses.fields(cls)}
    return names


@pytest.mark.parametrize("name", patches.SGLANG_INTERNALS)
def test_every_sglang_internal_kvflow_relies_on_exists(name):
    # Resolve the owner, then look the last part up: some are runtime-set attributes (``_global_state``
    # is None until the server starts) or fields without a class attribute (pydantic, dataclasses).
    owner, _, attribute = name.rpartition(".")
    resolved = pkgutil.resolve_name(owner)
    assert hasattr(resolved, attribute) or (isinstance(resolved, type) and attribute in _fields(resolved)), (
        name
    )


@cache
def _assigned_attributes(cls: type) -> frozenset[str]:
    """Names assigned as ``self.<name>`` anywhere in the source of ``cls`` and its SGLang bases."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if not klass.__module__.startswith("sglang."):
            continue
        for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(klass)))):
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, ast.AnnAssign | ast.AugAssign):
                targets = [node.target]
            else:
                continue
            names |= {
                target.attr
                for root in targets
                for target in ast.walk(root)
                if isinstance(target, ast.Attribute)
                and isinstance(target.value, ast.Name)
                and target.value.id == "self"
            }
    return frozenset(names)


@pytest.fixture(scope="module")
def sglang_objects() -> dict[str, object]:
    """Real SGLang objects built on CPU (a stock cache that served one prompt), by the classes in
    ``BUILT``: each is an instance of its class."""
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache
    from sglang.srt.sampling.sampling_params import SamplingParams

    from kvflow.harness.offline import CacheDriver

    driver = CacheDriver(size=64, cache_class=UnifiedRadixCache, policy="lru")
    driver.serve(list(range(1, 9)))
    tree = driver.cache.tree_core
    (node,) = tree.root_node.children.values()
    request = Req("rid", "", [1, 2, 3], SamplingParams())
    objects = dict(zip(BUILT, (driver.cache, tree, node, driver.allocator, request), strict=True))
    for owner, instance in objects.items():
        assert isinstance(instance, pkgutil.resolve_name(owner)), owner
    return objects


@pytest.mark.parametrize(
    ("owner", "attribute"),
    [(owner, attribute) for owner, names in patches.SGLANG_INSTANCE_ATTRIBUTES for attribute in names],
    ids=lambda value: value.rsplit(".", 1)[-1],
)
def test_every_sglang_instance_attribute_kvflow_uses_exists(owner, attribute, sglang_objects):
    if owner in BUILT:
        assert hasattr(sglang_objects[owner], attribute), f"{owner}.{attribute} (on a built instance)"
    else:
        cls = pkgutil.resolve_name(owner)
        assert attribute in _assigned_attributes(cls), f"{owner}.{attribute} (assigned in its source)"


def test_the_evictable_leaf_set_kvflow_replaces_is_a_set(sglang_objects):
    # kvflow.cache.victims.EvictableLeaves subclasses set and takes the set's place.
    from sglang.srt.mem_cache.unified_cache.unified_tree_core import UnifiedTreeCore

    assert (
        type(sglang_objects[f"{UnifiedTreeCore.__module__}.UnifiedTreeCore"].evictable_device_leaves) is set
    )


def test_the_tokenizer_manager_makes_the_internal_state_communicator():
    from sglang.srt.managers.tokenizer_control_mixin import _COMMUNICATOR_SPECS

    # init_communicators: setattr(self, f"{name}_communicator", ...), read by patches/stats_endpoint.py.
    assert "get_internal_state" in {spec[0] for spec in _COMMUNICATOR_SPECS}


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


@pytest.fixture
def fresh_registries(monkeypatch):
    """SGLang's registries without kvflow's names (restored afterwards), and hooks not registered."""
    from sglang.srt.arg_groups.choices import RADIX_EVICTION_POLICY_CHOICES
    from sglang.srt.mem_cache import registry
    from sglang.srt.mem_cache.unified_cache import tree_core_registry
    from sglang.srt.mem_cache.utils import _EVICTION_POLICY_FACTORIES
    from sglang.srt.plugins.hook_registry import HookRegistry

    from kvflow import plugin

    monkeypatch.setattr(registry, "_RADIX_CACHE_REGISTRY", {})
    monkeypatch.setattr(tree_core_registry, "_TREE_CORE_REGISTRY", {})
    monkeypatch.delitem(_EVICTION_POLICY_FACTORIES, NAME, raising=False)
    choices = list(RADIX_EVICTION_POLICY_CHOICES)
    RADIX_EVICTION_POLICY_CHOICES[:] = [choice for choice in choices if choice != NAME]
    monkeypatch.setattr(HookRegistry, "register", lambda *args, **kwargs: None)
    monkeypatch.setattr(patches, "_active", [])
    monkeypatch.setattr(plugin, "_registered", False)
    yield plugin
    RADIX_EVICTION_POLICY_CHOICES[:] = choices


def test_the_plugin_registers_kvflows_names_in_sglangs_registries(fresh_registries, monkeypatch):
    from sglang.srt.arg_groups.choices import RADIX_EVICTION_POLICY_CHOICES
    from sglang.srt.mem_cache.registry import default_radix_cache_factory, get_radix_cache_factory
    from sglang.srt.mem_cache.unified_cache.tree_core_registry import get_tree_core_factory
    from sglang.srt.mem_cache.unified_cache.unified_tree_core import UnifiedTreeCore
    from sglang.srt.mem_cache.utils import get_eviction_strategy

    from kvflow.cache.eviction import WorkflowAwareStrategy
    from kvflow.cache.radix_cache import workflow_cache_factory
    from kvflow.cache.tree_core import WorkflowTreeCore
    from kvflow.config import CONFIG_ENV
    from kvflow.plugin import STOCK_BACKEND_NAME

    monkeypatch.delenv(CONFIG_ENV, raising=False)
    fresh_registries.load()  # outside a kvflow server: nothing registered
    assert get_radix_cache_factory(NAME) is None and NAME not in RADIX_EVICTION_POLICY_CHOICES
    monkeypatch.setenv(CONFIG_ENV, json.dumps({}))
    fresh_registries.load()
    assert get_radix_cache_factory(NAME) is workflow_cache_factory
    assert get_radix_cache_factory(STOCK_BACKEND_NAME) is default_radix_cache_factory
    assert get_tree_core_factory(NAME) is WorkflowTreeCore and issubclass(WorkflowTreeCore, UnifiedTreeCore)
    assert type(get_eviction_strategy(NAME, {"tie_break": "mru"})) is WorkflowAwareStrategy
    assert NAME in RADIX_EVICTION_POLICY_CHOICES


def _table_rows(markdown: str, header: str) -> dict[str, str]:
    """The rows of the markdown table whose header line starts with ``header``: first cell -> row."""
    lines = markdown[markdown.index(header) :].splitlines()
    rows = {}
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows[line.split("|")[1].strip()] = line
    return rows


@pytest.mark.parametrize("document", ["README.md", "docs/design.md"])
def test_the_patch_tables_name_every_patch_module(document):
    rows = _table_rows((ROOT / document).read_text(), "| patch | target | process | why |")
    named = {re.match(r"`(\w+)`", cell).group(1) for cell in rows}
    assert named == set(PATCH_MODULES)
    assert {module.name for module in pkgutil.iter_modules(patches.__path__)} == named


def test_the_full_patch_table_names_every_target():
    rows = _table_rows((ROOT / "docs/design.md").read_text(), "| patch | target | process | why |")
    for name, module in PATCH_MODULES.items():
        (row,) = [row for cell, row in rows.items() if cell.startswith(f"`{name}`")]
        target_cell = row.split("|")[2]
        for target in module.TARGETS:
            assert re.search(rf"\b{re.escape(target.rsplit('.', 1)[-1])}\b", target_cell), (name, target)


PATCH_DIR = Path(patches.__file__).resolve().parent
PATCH_NAMES = sorted(path.stem for path in PATCH_DIR.glob("*.py") if path.stem != "__init__")


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


@pytest.mark.parametrize("name", PATCH_NAMES)
def test_no_patch_imports_another_patch(name):
    # Shared helpers live in kvflow (kvflow.control, kvflow.frontend, kvflow.cpu_kernels), not in a patch.
    siblings = {
        prefix + other
        for other in PATCH_NAMES
        if other != name
        for prefix in ("kvflow.patches.", "patches.", ".")
    }
    assert not imported_names((PATCH_DIR / f"{name}.py").read_text()) & siblings


def test_the_import_check_sees_every_spelling():
    source = "from kvflow.patches.a import x\nfrom kvflow.patches import b\nfrom . import c\nimport patches.d"
    assert {"kvflow.patches.a", "kvflow.patches.b", ".c", "patches.d"} <= imported_names(source)


def test_the_cache_package_docstring_names_every_module():
    import kvflow.cache

    documented = set(re.findall(r"^- ``(\w+)``", kvflow.cache.__doc__, re.MULTILINE))
    assert documented == {module.name for module in pkgutil.iter_modules(kvflow.cache.__path__)}
