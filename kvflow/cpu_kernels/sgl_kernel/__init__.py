"""Pure-torch stand-in for ``sgl_kernel`` on machines without CUDA (see ``kvflow.cpu_kernels``).

Every ``from sgl_kernel[.sub] import NAME`` succeeds so that SGLang's import-time
references resolve; the ops SGLang's CPU engine calls are implemented in
``_ops``; any other op raises ``NotImplementedError`` naming itself when called.
"""

import importlib.abc
import importlib.machinery
import sys
import types

from . import _ops

__version__ = "0.4.10"


class _MissingOp:
    """An op this stand-in does not implement; calling it raises."""

    def __init__(self, name: str) -> None:
        self._name = name
        self.__name__ = name.rsplit(".", 1)[-1]

    def __call__(self, *args, **kwargs):
        raise NotImplementedError(f"sgl_kernel CPU stand-in: {self._name} is not implemented")

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _MissingOp(f"{self._name}.{attr}")

    def __bool__(self) -> bool:
        return False


def _module_getattr(module_name: str, implemented: dict):
    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        if name in implemented:
            return implemented[name]
        return _MissingOp(f"{module_name}.{name}")

    return __getattr__


__getattr__ = _module_getattr("sgl_kernel", {name: getattr(_ops, name) for name in _ops.__all__})


class _SubmoduleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes every ``sgl_kernel.<sub>`` importable as a module of missing ops."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith("sgl_kernel.") and fullname != "sgl_kernel._ops":
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = _module_getattr(spec.name, {})
        return module

    def exec_module(self, module):
        return None


sys.meta_path.insert(0, _SubmoduleFinder())
