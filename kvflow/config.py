"""kvflow's own server options (the ``--kvflow-*`` flags).

The launcher parses them and hands them to every SGLang process through one
environment variable, because SGLang starts its scheduler with ``spawn`` and
only the environment (not our argument parser) reaches it.

- Each option is one field of :class:`KVFlowConfig`: its flag is ``--kvflow-`` plus the field's
  name with dashes, its type and default the field's, its help text the field's metadata.
- A boolean that defaults to off is a switch; one that defaults to on also has ``--no-`` form.
- The README's flag table lists exactly these flags and defaults (tests/test_launcher.py).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import Field, asdict, dataclass, field, fields
from typing import Any

CONFIG_ENV = "KVFLOW_CONFIG"
FLAG_PREFIX = "--kvflow-"


def _option(default: Any, help: str, metavar: str | None = None) -> Any:
    """A config field with its ``--kvflow-*`` flag's help text (and metavar)."""
    return field(default=default, metadata={"help": help, "metavar": metavar})


def flag_name(option: Field) -> str:
    """The command-line flag of a :class:`KVFlowConfig` field."""
    return FLAG_PREFIX + option.name.replace("_", "-")


@dataclass(frozen=True)
class KVFlowConfig:
    """Options of the workflow-aware cache."""

    hint_ttl: float = _option(
        300.0, "Seconds without a hint after which a workflow reverts to plain LRU and its state is freed."
    )
    max_workflows: int = _option(
        4096,
        "Workflows tracked at once; past it the least recently hinted workflow is dropped "
        "(and registering another workflow is refused with HTTP 429).",
    )
    max_agents: int = _option(
        64, "Agents per registered or learned workflow (at most 1024); larger graphs are refused."
    )
    max_tracked_agents: int = _option(
        32768,
        "Agents the cache tracks over all workflows; past it the least recently hinted "
        "workflows are forgotten first (each agent keeps at most 16384 prompt tokens, 8 bytes each).",
    )
    max_protected_fraction: float = _option(
        0.5,
        "Share of the device pool (0 to 1] one workflow's prompts are protected in: past it, its "
        "farthest prompts are evicted before any workflow's prompts within their share (un-owned KV "
        "still goes first).",
        metavar="FRACTION",
    )
    learn_graph: bool = _option(
        False, "Learn the step structure of unregistered workflows from the order their agents run in."
    )
    learn_min_observations: int = _option(
        2, "Transitions out of an agent needed before the learned graph trusts its likely successor."
    )
    prefetch: bool = _option(
        True,
        "With --enable-hierarchical-cache, load the fixed prompts of the agents due next and "
        "the contexts of paused agents about to resume from host to device in the background.",
    )
    prefetch_steps: int = _option(
        1,
        "Prefetch agents whose steps-to-execution is at most this (and at least 1), and contexts "
        "whose agent's next request is expected within this many hinted requests.",
    )
    max_prefetch_tokens: int = _option(65536, "Prefetched tokens in flight at once.")
    emulate_link_gbps: float = _option(
        0.0,
        "CPU host tier only (no CUDA): emulate a host<->device link of this many gigabytes per "
        "second (GB/s, 1e9 bytes/s, not Gbit/s), one link per direction. Each HiCache transfer "
        "still copies at once, but completes (is acknowledged, and unblocks the forward pass that "
        "reads it) only after its bytes crossed the emulated link, queued behind earlier transfers. "
        "0 (default) = off; anything measured with it on is emulation.",
        metavar="GB_PER_S",
    )

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

    @classmethod
    def cli_arguments(cls) -> list[tuple[str, dict[str, Any]]]:
        """Each field's flag and ``add_argument`` keywords (see the module docstring)."""
        arguments = []
        for option in fields(cls):
            kwargs: dict[str, Any] = {"default": option.default, "help": option.metadata["help"]}
            if option.default is False:
                kwargs["action"] = "store_true"
            elif option.default is True:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["type"] = type(option.default)
            if option.metadata["metavar"] is not None:
                kwargs["metavar"] = option.metadata["metavar"]
            arguments.append((flag_name(option), kwargs))
        return arguments

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        """Register the ``--kvflow-*`` flags."""
        group = parser.add_argument_group("kvflow")
        for flag, kwargs in cls.cli_arguments():
            group.add_argument(flag, **kwargs)

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
