"""kvflow's patch set against SGLang 0.5.23 (installed as ``kvflow.patches``).

Only what SGLang's registries cannot reach lives here, one concern per module.
Each module names the SGLang object it touches (``TARGET``) and why. Hooks on
functions go through SGLang's plugin hook registry, so they are applied in
every SGLang process that loads plugins (HTTP server and scheduler alike);
additions to the FastAPI app are made by the launcher in the HTTP process.
"""

from __future__ import annotations

from importlib.metadata import version

from kvflow.patches import (
    cpu_host_tier,
    hint_middleware,
    idle_integrity,
    link_emulation,
    prefetch_hold,
    request_checks,
    stats_endpoint,
    workflow_endpoints,
)

from kvflow.config import KVFlowConfig

PINNED_SGLANG_VERSION = "0.5.23"

HOOK_PATCHES = (
    request_checks,
    stats_endpoint,
    prefetch_hold,
    cpu_host_tier,
    workflow_endpoints,
    idle_integrity,
)
APP_PATCHES = (hint_middleware, stats_endpoint, workflow_endpoints)
# Every module's targets: the hook patches, the app-only middleware, and link_emulation (opt-in).
ALL_TARGETS = tuple(
    target for module in (*HOOK_PATCHES, hint_middleware, link_emulation) for target in module.TARGETS
)

_active: list[str] = []


def check_sglang_version() -> None:
    """Refuse to run against any SGLang release other than the pinned one."""
    installed = version("sglang")
    if installed != PINNED_SGLANG_VERSION:
        raise RuntimeError(
            f"kvflow's patch set targets sglang=={PINNED_SGLANG_VERSION}, but sglang=={installed} "
            "is installed; install the pinned release."
        )


def register_hooks() -> None:
    """Register the hook-registry patches (the caller's ``load_plugins`` applies them).

    ``link_emulation`` is registered only when ``--kvflow-emulate-link-gbps`` is set.
    """
    check_sglang_version()
    for module in HOOK_PATCHES:
        module.register_hooks()
        _active.append(module.__name__.rsplit(".", 1)[-1])
    gbps = (KVFlowConfig.from_env() or KVFlowConfig()).emulate_link_gbps
    if gbps > 0:
        link_emulation.register_hooks(gbps)
        _active.append("link_emulation")


def install_app_patches(app) -> None:
    """Add kvflow's middleware and routes to SGLang's FastAPI ``app`` (HTTP process only)."""
    check_sglang_version()
    for module in APP_PATCHES:
        module.install(app)


def active_patches() -> list[str]:
    """Names of the hook patches registered in this process."""
    return list(_active)
