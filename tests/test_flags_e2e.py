"""Every ``--kvflow-*`` flag parses in a real server and reaches the process that reads it.

The flags are generated from :class:`kvflow.config.KVFlowConfig`'s fields. One CPU server on the
embedded model starts with every flag away from its default (link emulation stays off: it needs
the host tier), given in its own form (a switch, a ``--no-`` form, or a value).

- The scheduler's cache reports the limits it was given (``/kvflow/stats``).
- The HTTP process's registry applies ``--kvflow-max-agents`` to registered graphs.
"""

from __future__ import annotations

from dataclasses import asdict, fields

import pytest
import requests

from kvflow.config import KVFlowConfig, flag_name
from kvflow.graph import AgentStepGraph
from kvflow.harness.server_process import ServerProcess
from kvflow.launch_server import kvflow_arg_parser

pytestmark = pytest.mark.e2e

CONFIG = KVFlowConfig(
    hint_ttl=120.0,
    max_workflows=7,
    max_agents=3,
    max_tracked_agents=50,
    max_protected_fraction=0.25,
    learn_graph=True,
    learn_min_observations=3,
    prefetch=False,
    prefetch_steps=2,
    max_prefetch_tokens=1024,
)


def config_argv(config: KVFlowConfig) -> list[str]:
    """The ``--kvflow-*`` flags that give ``config``."""
    argv: list[str] = []
    for option in fields(config):
        value = getattr(config, option.name)
        if value == option.default:
            continue
        flag = flag_name(option)
        if isinstance(value, bool):
            argv.append(flag if value else f"--no-{flag[2:]}")
        else:
            argv += [flag, str(value)]
    return argv


def cycle(agents: int) -> dict:
    names = [f"a{i}" for i in range(agents)]
    graph = AgentStepGraph(names)
    for i, name in enumerate(names):
        graph.add_edge(name, names[(i + 1) % agents])
    return graph.to_json()


def test_every_flag_parses_and_reaches_the_server():
    argv = config_argv(CONFIG)
    assert KVFlowConfig.from_cli(kvflow_arg_parser().parse_args(argv)) == CONFIG
    changed = {k for k, v in asdict(CONFIG).items() if v != getattr(KVFlowConfig(), k)}
    assert changed == {option.name for option in fields(KVFlowConfig)} - {"emulate_link_gbps"}
    with ServerProcess([*argv, "--max-total-tokens", "2048"]) as server:
        stats = requests.get(f"{server.url}/kvflow/stats", timeout=30).json()
        assert stats["limits"] == {
            "max_workflows": 7,
            "max_tracked_agents": 50,
            "max_protected_fraction": 0.25,
            "hint_ttl": 120.0,
        }
        url = f"{server.url}/kvflow/workflows"
        assert (
            requests.post(url, json={"workflow_id": "w3", "graph": cycle(3)}, timeout=30).status_code == 201
        )
        refused = requests.post(url, json={"workflow_id": "w4", "graph": cycle(4)}, timeout=30)
        assert refused.status_code == 400 and refused.json()["param"] == "graph.agents"
