"""CPU-only stand-in for the CUDA-only ``sgl_kernel`` package.

SGLang's CPU engine imports a few ``*_cpu`` ops from ``sgl_kernel`` at import
time, but the PyPI ``sglang-kernel`` wheel is built for CUDA only. The launcher
puts this directory first on the module path when no CUDA device is present,
so ``import sgl_kernel`` resolves to the pure-torch package below. On a GPU
machine it is never used.
"""

from pathlib import Path

STANDIN_PATH = str(Path(__file__).resolve().parent)
