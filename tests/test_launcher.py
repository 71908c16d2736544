"""The launcher's argument handling (no server)."""

import argparse
import re
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from kvflow import launch_server
from kvflow.config import CONFIG_ENV, KVFlowConfig, flag_name
from kvflow.launch_server import (
    CPU_THREADS_BIND_ENV,
    EMBEDDED_MODEL_PATH,
    cpu_threads_bind,
    eviction_config_error,
    flag_value,
    kvflow_arg_parser,
    link_emulation_error,
    split_cores,
    with_defaults,
)


def test_defaults_select_kvflow_the_embedded_model_and_the_cpu_engine():
    argv = with_defaults(["--port", "1"], cuda=False)
    assert (
        flag_value(argv, "--model-path") == EMBEDDED_MODEL_PATH
        and flag_value(argv, "--load-format") == "dummy"
    )
    assert flag_value(argv, "--radix-cache-backend") == "kvflow"
    assert flag_value(argv, "--radix-eviction-policy") == "kvflow"
    assert flag_value(argv, "--device") == "cpu" and flag_value(argv, "--attention-backend") == "torch_native"
    assert "--sleep-on-idle" in argv


def test_user_flags_win_and_gpu_machines_get_no_cpu_settings():
    argv = with_defaults(
        ["--model-path", "/m", "--radix-eviction-policy=lru", "--dtype", "bfloat16"], cuda=True
    )
    assert flag_value(argv, "--model-path") == "/m" and flag_value(argv, "--load-format") is None
    assert flag_value(argv, "--radix-eviction-policy") == "lru"
    assert flag_value(argv, "--dtype") == "bfloat16"
    assert flag_value(argv, "--device") is None and "--sleep-on-idle" not in argv


def test_stock_backend_keeps_sglangs_default_policy():
    argv = with_defaults(["--radix-cache-backend", "stock"], cuda=True)
    assert flag_value(argv, "--radix-cache-backend") == "stock"
    assert flag_value(argv, "--radix-eviction-policy") is None


def test_hicache_on_cpu_gets_the_direct_layer_first_host_tier_unless_given():
    for enable in ("--enable-hierarchical-cache", "--enable-hicache"):
        argv = with_defaults([enable, "--hicache-ratio", "4"], cuda=False)
        assert flag_value(argv, "--hicache-io-backend") == "direct"
        assert flag_value(argv, "--hicache-mem-layout") == "layer_first"
    argv = with_defaults(["--enable-hicache", "--hicache-mem-layout=page_first_direct"], cuda=False)
    assert flag_value(argv, "--hicache-mem-layout") == "page_first_direct"
    assert argv.count("--hicache-mem-layout") == 0 and flag_value(argv, "--hicache-io-backend") == "direct"
    # Without HiCache, or on a GPU machine, SGLang's own HiCache defaults stay.
    assert flag_value(with_defaults([], cuda=False), "--hicache-io-backend") is None
    argv = with_defaults(["--enable-hierarchical-cache"], cuda=True)
    assert (
        flag_value(argv, "--hicache-io-backend") is None and flag_value(argv, "--hicache-mem-layout") is None
    )


def test_link_emulation_is_off_by_default_and_given_in_gigabytes_per_second():
    parser = kvflow_arg_parser()
    assert KVFlowConfig.from_cli(parser.parse_known_args([])[0]).emulate_link_gbps == 0
    args, rest = parser.parse_known_args(["--kvflow-emulate-link-gbps", "52.8", "--port", "1"])
    assert KVFlowConfig.from_cli(args).emulate_link_gbps == 52.8 and rest == ["--port", "1"]
    help_text = " ".join(parser.format_help().split())
    assert "GB/s, 1e9 bytes/s, not Gbit/s" in help_text and "0 (default) = off" in help_text


def test_every_config_field_is_one_flag_that_round_trips():
    parser = kvflow_arg_parser()
    assert KVFlowConfig.from_cli(parser.parse_known_args([])[0]) == KVFlowConfig()
    argv = [
        "--kvflow-learn-graph",
        "--no-kvflow-prefetch",
        "--kvflow-hint-ttl",
        "5",
        "--kvflow-max-agents",
        "9",
    ]
    config = KVFlowConfig.from_cli(parser.parse_known_args(argv)[0])
    assert (config.learn_graph, config.prefetch, config.hint_ttl, config.max_agents) == (True, False, 5.0, 9)
    flags = [flag for flag, _ in KVFlowConfig.cli_arguments()]
    assert flags == [flag_name(option) for option in fields(KVFlowConfig)] and len(set(flags)) == len(flags)


def _readme_flag_rows() -> dict[str, list[str]]:
    """The README's ``--kvflow-*`` flag table: each row's first flag -> its cells."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = {}
    for line in readme.splitlines():
        if line.startswith("| `--kvflow-"):
            cells = [cell.strip() for cell in line.split("|")[1:-1]]
            rows[re.match(r"`(--kvflow-[\w-]+)`", cells[0]).group(1)] = cells
    return rows


def _readme_default(cell: str) -> object:
    if cell in ("on", "off"):
        return cell == "on"
    return float(cell.split()[0])


def test_the_readme_flag_table_lists_every_flag_with_its_default():
    rows = _readme_flag_rows()
    arguments = dict(KVFlowConfig.cli_arguments())
    assert list(rows) == list(arguments)
    for flag, (names, default, _meaning) in rows.items():
        assert _readme_default(default) == arguments[flag]["default"], flag
        negated = arguments[flag].get("action") is argparse.BooleanOptionalAction
        assert (f"`--no-{flag[2:]}`" in names) is negated, flag


def test_link_emulation_needs_the_cpu_host_tier():
    hicache = ["--enable-hierarchical-cache"]
    assert link_emulation_error(0.0, cuda=True, argv=[]) is None
    assert link_emulation_error(0.5, cuda=False, argv=hicache) is None
    assert "CUDA" in link_emulation_error(0.5, cuda=True, argv=hicache)
    assert "--enable-hierarchical-cache" in link_emulation_error(0.5, cuda=False, argv=[])
    for bad in (-1.0, float("nan"), float("inf")):
        assert ">= 0" in link_emulation_error(bad, cuda=False, argv=hicache)


def test_launcher_refuses_link_emulation_on_a_cuda_machine_before_starting(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        launch_server.main(["--kvflow-emulate-link-gbps", "1", "--enable-hierarchical-cache"])
    assert exit_info.value.code == 2 and "real host link" in capsys.readouterr().err


def test_the_kvflow_policy_takes_only_a_known_tie_break_through_sglangs_policy_config():
    kvflow = with_defaults([], cuda=True)
    assert eviction_config_error(kvflow) is None
    assert eviction_config_error([*kvflow, "--radix-eviction-policy-config", '{"tie_break": "mru"}']) is None
    bad_value = eviction_config_error([*kvflow, "--radix-eviction-policy-config", '{"tie_break": "fifo"}'])
    assert "'tie_break'" in bad_value and "lru, mru" in bad_value
    assert "'threshold'" in eviction_config_error(
        [*kvflow, "--radix-eviction-policy-config", '{"threshold": 4}']
    )
    assert "JSON object" in eviction_config_error([*kvflow, "--radix-eviction-policy-config", "[1]"])
    assert eviction_config_error([*kvflow, "--radix-eviction-policy-config", "{"]) is not None
    # another policy's config is SGLang's to check
    assert (
        eviction_config_error(["--radix-eviction-policy", "slru", "--radix-eviction-policy-config", "{}"])
        is None
    )


def test_cores_are_split_into_one_contiguous_group_per_rank():
    assert split_cores([0, 1], 2) == "0|1"
    assert split_cores(range(8), 2) == "0-3|4-7"
    assert split_cores([0, 1, 2, 3, 4, 6, 7], 3) == "0-2|3-4|6-7"
    assert split_cores([3, 1, 2], 1) == "1-3"
    # Fewer cores than ranks: they share, each rank still has one.
    assert split_cores([5], 2) == "5|5" and split_cores([0, 1], 3) == "0|1|0"


def test_data_parallel_on_cpu_binds_each_scheduler_unless_the_user_did():
    cores = range(4)
    assert cpu_threads_bind(["--dp-size", "2"], {}, cores) == "0-1|2-3"
    assert cpu_threads_bind(["--data-parallel-size=2", "--tp-size", "2"], {}, cores) == "0|1|2|3"
    assert cpu_threads_bind(["--dp-size", "2"], {CPU_THREADS_BIND_ENV: "0|0"}, cores) is None
    assert cpu_threads_bind(["--dp-size", "1"], {}, cores) is None and cpu_threads_bind([], {}, cores) is None
    assert cpu_threads_bind(["--tp-size", "2"], {}, cores) == "0-1|2-3"  # tensor parallel alone too
    # A malformed size is left to SGLang's parser.
    assert cpu_threads_bind(["--dp-size", "two"], {}, cores) is None
