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
            help="Workflows tracked at once; past it the least recently hinted workflow is dropped.",
        )

    @classmethod
    def from_cli(cls, args: argparse.Namespace) -> KVFlowConfig:
        """Build the config from parsed ``--kvflow-*`` flags."""
        return cls(**{f.name: getattr(args, f"kvflow_{f.name}") for f in fields(cls)})
