"""``python -m kvflow.launch_server``: SGLang's server with the workflow-aware cache.

Takes every ``sglang.launch_server`` flag plus the ``--kvflow-*`` flags. By
default it selects ``--radix-cache-backend kvflow --radix-eviction-policy
kvflow``; pass other values (e.g. ``--radix-eviction-policy lru`` or
``--radix-cache-backend stock``) to run stock behaviour through the same
launcher. Without ``--model-path`` it serves the embedded default model with
dummy weights. Without CUDA it configures SGLang's CPU engine (and, with
``--enable-hierarchical-cache``, the io backend and layout of the CPU host tier;
with several ranks (``--dp-size``, ``--tp-size``, ``--pp-size``), the cores each scheduler binds to).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Iterable, Mapping
from importlib.metadata import entry_points

from kvflow import NAME
from kvflow.config import KVFlowConfig
from kvflow.model import EMBEDDED_MODEL_PATH

# SGLang's CPU engine binds each rank's OpenMP threads to the "|"-separated core group at its
# index (sglang.srt.utils.numa_utils.init_threads_binding); unset, it asks for one NUMA node per rank.
CPU_THREADS_BIND_ENV = "SGLANG_CPU_OMP_THREADS_BIND"
PARALLEL_SIZE_FLAGS = (
    ("--dp-size", "--data-parallel-size"),
    ("--tp-size", "--tensor-parallel-size"),
    ("--pp-size", "--pipeline-parallel-size"),
)

logger = logging.getLogger(__name__)

# Defaults for SGLang's CPU engine (see ../shared/KVFLOW.md section 6), each
# applied only when the user did not pass the flag.
CPU_DEFAULTS = (
    ("--device", "cpu"),
    ("--attention-backend", "torch_native"),
    ("--sampling-backend", "pytorch"),
    ("--dtype", "float32"),
    ("--cuda-graph-backend-decode", "disabled"),
    ("--cuda-graph-backend-prefill", "disabled"),
    ("--max-total-tokens", "32768"),
)
# With --enable-hierarchical-cache on CPU: the only host-tier path kvflow's
# ``cpu_host_tier`` patch implements in torch (see patches/cpu_host_tier.py).
CPU_HICACHE_FLAGS = ("--enable-hierarchical-cache", "--enable-hicache")
CPU_HICACHE_DEFAULTS = (
    ("--hicache-io-backend", "direct"),
    ("--hicache-mem-layout", "layer_first"),
)


def has_flag(argv: list[str], *names: str) -> bool:
    """Whether any of ``names`` appears in ``argv`` (``--flag value`` or ``--flag=value``)."""
    return any(arg in names or arg.split("=", 1)[0] in names for arg in argv)


def flag_value(argv: list[str], name: str) -> str | None:
    """The value given to ``name`` (last one wins), or None."""
    value = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def with_defaults(argv: list[str], cuda: bool) -> list[str]:
    """SGLang's argv with kvflow's defaults added where the user gave none."""
    argv = list(argv)
    if not has_flag(argv, "--model-path", "--model"):
        argv += ["--model-path", EMBEDDED_MODEL_PATH]
        if not has_flag(argv, "--load-format"):
            argv += ["--load-format", "dummy"]
    backend = flag_value(argv, "--radix-cache-backend")
    if backend is None:
        argv += ["--radix-cache-backend", NAME]
    # The kvflow policy needs kvflow's tree core; other backends keep SGLang's default policy.
    if backend in (None, NAME) and not has_flag(argv, "--radix-eviction-policy"):
        argv += ["--radix-eviction-policy", NAME]
    if not cuda:
        for flag, value in CPU_DEFAULTS:
            if not has_flag(argv, flag):
                argv += [flag, value]
        if not has_flag(argv, "--sleep-on-idle"):
            argv.append("--sleep-on-idle")
        if has_flag(argv, *CPU_HICACHE_FLAGS):
            for flag, value in CPU_HICACHE_DEFAULTS:
                if not has_flag(argv, flag):
                    argv += [flag, value]
    return argv


def _size(argv: list[str], names: tuple[str, ...]) -> int:
    values = [value for name in names if (value := flag_value(argv, name)) is not None]
    # SGLang's own parser reports a malformed size.
    return int(values[-1]) if values and values[-1].isdigit() else 1


def _core_list(cores: list[int]) -> str:
    """``cores`` (sorted) as SGLang's core list: runs as ``a-b``, joined by commas."""
    runs: list[list[int]] = []
    for core in cores:
        if runs and core == runs[-1][1] + 1:
            runs[-1][1] = core
        else:
            runs.append([core, core])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def split_cores(cores: Iterable[int], ranks: int) -> str:
    """``SGLANG_CPU_OMP_THREADS_BIND`` giving each of ``ranks`` ranks its own share of ``cores``.

    Contiguous groups, sizes differing by at most one; with fewer cores than
    ranks, ranks share cores round robin (each rank still gets one).
    """
    cores = sorted(set(cores))
    if len(cores) < ranks:
        return "|".join(str(cores[rank % len(cores)]) for rank in range(ranks))
    size, extra = divmod(len(cores), ranks)
    groups, start = [], 0
    for rank in range(ranks):
        end = start + size + (rank < extra)
        groups.append(_core_list(cores[start:end]))
        start = end
    return "|".join(groups)


def cpu_threads_bind(argv: list[str], environ: Mapping[str, str], cores: Iterable[int]) -> str | None:
    """The ``SGLANG_CPU_OMP_THREADS_BIND`` a CPU server with several scheduler processes needs, or None.

    None unless dp x tp x pp is above 1 and the user set no value. One group per
    scheduler process SGLang starts (dp x tp x pp, as it indexes them).
    """
    ranks = 1
    for names in PARALLEL_SIZE_FLAGS:
        ranks *= _size(argv, names)
    if environ.get(CPU_THREADS_BIND_ENV) or ranks <= 1:
        return None
    return split_cores(cores, ranks)


def link_emulation_error(gbps: float, cuda: bool, argv: list[str]) -> str | None:
    """Why ``--kvflow-emulate-link-gbps gbps`` cannot be used with SGLang's ``argv``, or None."""
    if not (math.isfinite(gbps) and gbps >= 0):
        return f"--kvflow-emulate-link-gbps must be a finite number >= 0 (GB/s), got {gbps}"
    if gbps == 0:
        return None
    if cuda:
        return (
            "--kvflow-emulate-link-gbps emulates the host link of the CPU host tier (no CUDA); "
            "this machine has CUDA and a real host link: drop the flag"
        )
    if not has_flag(argv, *CPU_HICACHE_FLAGS):
        return "--kvflow-emulate-link-gbps needs --enable-hierarchical-cache (it delays host tier transfers)"
    return None


def eviction_config_error(argv: list[str]) -> str | None:
    """Why ``--radix-eviction-policy-config`` does not fit the kvflow policy in ``argv``, or None.

    SGLang would only find out in the scheduler process, after loading the model.
    """
    raw = flag_value(argv, "--radix-eviction-policy-config")
    if raw is None or flag_value(argv, "--radix-eviction-policy") != NAME:
        return None
    from kvflow.cache.eviction import WorkflowAwareStrategy

    try:
        config = json.loads(raw)
        if not isinstance(config, dict):
            raise TypeError(f"expected a JSON object, got {raw!r}")
        WorkflowAwareStrategy(**config)
    except (TypeError, ValueError) as error:
        return f"--radix-eviction-policy-config for the {NAME} policy: {error}"
    return None


def use_cpu_engine() -> None:
    """Point this process and its children at SGLang's CPU engine and our sgl_kernel stand-in."""
    from kvflow.cpu_kernels import STANDIN_PATH

    os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
    sys.path.insert(0, STANDIN_PATH)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (STANDIN_PATH, os.environ.get("PYTHONPATH")) if p)


def kvflow_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m kvflow.launch_server",
        description="SGLang server with KVFlow's workflow-aware KV cache. "
        "All sglang.launch_server flags are accepted as well.",
        add_help=False,
    )
    KVFlowConfig.add_cli_args(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = kvflow_arg_parser()
    if has_flag(argv, "-h", "--help"):
        parser.print_help()
        print("\nSGLang flags:\n")
    kvflow_args, sglang_argv = parser.parse_known_args(argv)
    config = KVFlowConfig.from_cli(kvflow_args)

    import torch

    cuda = torch.cuda.is_available()
    error = config.error() or link_emulation_error(config.emulate_link_gbps, cuda, sglang_argv)
    if error is not None:
        parser.error(error)
    config.to_env()
    threads_bind = None
    if not cuda:
        use_cpu_engine()
        threads_bind = cpu_threads_bind(sglang_argv, os.environ, os.sched_getaffinity(0))
        if threads_bind is not None:
            os.environ[CPU_THREADS_BIND_ENV] = threads_bind
    sglang_argv = with_defaults(sglang_argv, cuda)
    error = eviction_config_error(sglang_argv)
    if error is not None:
        parser.error(error)

    if not any(ep.name == NAME for ep in entry_points(group="sglang.srt.plugins")):
        sys.exit("kvflow is not installed as an SGLang plugin: run `pip install -e .` in the kvflow checkout")

    from sglang.launch_server import run_server
    from sglang.srt.entrypoints import http_server
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args
    from sglang.srt.utils import kill_process_tree
    from sglang.srt.utils.common import configure_logger

    from kvflow import patches

    load_plugins()
    patches.install_app_patches(http_server.app)
    server_args = prepare_server_args(sglang_argv)
    if threads_bind is not None:
        configure_logger(server_args)
        logger.info(
            "kvflow: %s=%s (the usable cores split between the ranks)", CPU_THREADS_BIND_ENV, threads_bind
        )
    try:
        run_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)


if __name__ == "__main__":
    main()
