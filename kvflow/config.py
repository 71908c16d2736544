"""kvflow's own server options (the ``--kvflow-*`` flags).

The launcher parses them and hands them to every SGLang process through one
environment variable, because SGLang starts its scheduler with ``spawn`` and
only the environment (not our argument parser) reaches it.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass, fields

CONFIG_ENV = "KVFLOW_CONFIG"


@dataclass(frozen=True)
class KVFlowConfig:
    """Options of the workflow-aware cache."""

    hint_ttl: float = 300.0
    max_workflows: int = 4096
    max_agents: int = 64
    max_tracked_agents: int = 32768
    max_protected_fraction: float = 0.5
    learn_graph: bool = False
    learn_min_observations: int = 2
    prefetch: bool = True
    prefetch_steps: int = 1
    max_prefetch_tokens: int = 65536
    emulate_link_gbps: float = 0.0

    def to_env(self) -> None:
        """Publish this config to child processes."""
        os.environ[CONFIG_ENV] = json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> KVFlowConfig | None:
        """The config the launcher published, or None outside a kvflow server."""
        raw = os.environ.get(CONFIG_ENV)
        if raw is None:
            return None
        return cls(**json.loads(raw))

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        """Register the ``--kvflow-*`` flags."""
        group = parser.add_argument_group("kvflow")
        group.add_argument(
            "--kvflow-hint-ttl",
            type=float,
            default=KVFlowConfig.hint_ttl,
            help="Seconds without a hint after which a workflow reverts to plain LRU and its state is freed.",
        )
        group.add_argument(
            "--kvflow-max-workflows",
            type=int,
            default=KVFlowConfig.max_workflows,
            help="Workflows tracked at once; past it the least recently hinted workflow is dropped "
            "(and registering another workflow is refused with HTTP 429).",
        )
        group.add_argument(
            "--kvflow-max-agents",
            type=int,
            default=KVFlowConfig.max_agents,
            help="Agents per registered or learned workflow (at most 1024); larger graphs are refused.",
        )
        group.add_argument(
            "--kvflow-max-tracked-agents",
            type=int,
            default=KVFlowConfig.max_tracked_agents,
            help="Agents the cache tracks over all workflows; past it the least recently hinted "
            "workflows are forgotten first (each agent keeps at most 16384 prompt tokens, 8 bytes each).",
        )
        group.add_argument(
            "--kvflow-max-protected-fraction",
            type=float,
            default=KVFlowConfig.max_protected_fraction,
            metavar="FRACTION",
            help="Share of the device pool (0 to 1] one workflow's prompts are protected in: past it, its "
            "farthest prompts are evicted before any workflow's prompts within their share (un-owned KV "
            "still goes first).",
        )
        group.add_argument(
            "--kvflow-learn-graph",
            action="store_true",
            help="Learn the step structure of unregistered workflows from the order their agents run in.",
        )
        group.add_argument(
            "--kvflow-learn-min-observations",
            type=int,
            default=KVFlowConfig.learn_min_observations,
            help="Transitions out of an agent needed before the learned graph trusts its likely successor.",
        )

        group.add_argument(
            "--kvflow-prefetch",
            action=argparse.BooleanOptionalAction,
            default=KVFlowConfig.prefetch,
            help="With --enable-hierarchical-cache, load the fixed prompts of the agents due next "
            "from host to device in the background.",
        )
        group.add_argument(
            "--kvflow-prefetch-steps",
            type=int,
            default=KVFlowConfig.prefetch_steps,
            help="Prefetch agents whose steps-to-execution is at most this (and at least 1).",
        )
        group.add_argument(
            "--kvflow-max-prefetch-tokens",
            type=int,
            default=KVFlowConfig.max_prefetch_tokens,
            help="Prefetched tokens in flight at once.",
        )
        group.add_argument(
            "--kvflow-emulate-link-gbps",
            type=float,
            default=KVFlowConfig.emulate_link_gbps,
            metavar="GB_PER_S",
            help="CPU host tier only (no CUDA): emulate a host<->device link of this many gigabytes per "
            "second (GB/s, 1e9 bytes/s, not Gbit/s), one link per direction. Each HiCache transfer "
            "still copies at once, but completes (is acknowledged, and unblocks the forward pass that "
            "reads it) only after its bytes crossed the emulated link, queued behind earlier transfers. "
            "0 (default) = off; anything measured with it on is emulation.",
        )

    def error(self) -> str | None:
        """Why these options cannot be served, or None."""
        if not 0 < self.max_protected_fraction <= 1:
            return f"--kvflow-max-protected-fraction must be in (0, 1], got {self.max_protected_fraction}"
        if self.max_tracked_agents < 1:
            return f"--kvflow-max-tracked-agents must be >= 1, got {self.max_tracked_agents}"
        return None

    @classmethod
    def from_cli(cls, args: argparse.Namespace) -> KVFlowConfig:
        """Build the config from parsed ``--kvflow-*`` flags."""
        return cls(**{f.name: getattr(args, f"kvflow_{f.name}") for f in fields(cls)})
