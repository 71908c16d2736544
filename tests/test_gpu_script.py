"""benchmarks/gpu/device_compare.sh, checked on CPU by its dry run.

``DRY_RUN=1`` prints, per setting, the ``python3 -m benchmarks.compare`` command the GPU run
would start; each is handed here to ``compare.main`` with the comparison itself replaced, so
what is checked is what main() would pass on to it.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
from pathlib import Path

import pytest

from benchmarks import compare

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu" / "device_compare.sh"
FOUR = ["lru", "lru-hicache", "kvflow-hicache", "ideal"]
# What the dry run must not start: each records its name and fails.
MACHINE_COMMANDS = ("nvidia-smi", "python3", "pip", "ln", "mkdir", "pgrep")


def dry_run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    for name in MACHINE_COMMANDS:
        tool = fake_bin / name
        tool.write_text(f'#!/bin/sh\necho {name} >> "{tmp_path}/called"\nexit 1\n')
        tool.chmod(0o755)
    return subprocess.run(
        ["bash", str(SCRIPT)],
        cwd=ROOT,
        env={
            **os.environ,
            "PATH": f"{fake_bin}:{os.environ['PATH']}",
            "OUT": str(tmp_path / "out"),
            "DRY_RUN": "1",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )


def compare_lines(stdout: str) -> list[list[str]]:
    """Each ``DRY_RUN compare:`` line's arguments after ``python3 -m benchmarks.compare``."""
    lines = []
    for line in stdout.splitlines():
        if line.startswith("DRY_RUN compare:"):
            words = shlex.split(line.removeprefix("DRY_RUN compare:"))
            assert words[:3] == ["python3", "-m", "benchmarks.compare"]
            lines.append(words[3:])
    return lines


def what_main_passes_on(argv: list[str], monkeypatch) -> dict:
    seen = {}

    def record(*args, **kwargs):
        names = (
            "workload",
            "configs",
            "pool",
            "repeats",
            "extra",
            "one_at_a_time",
            "log_dir",
            "partial_path",
        )
        seen.update(zip(names, args, strict=True), **kwargs)
        raise SystemExit(0)

    monkeypatch.setattr(compare, "compare", record)
    monkeypatch.setattr(signal, "signal", lambda *_: None)  # main's SIGTERM handler stays out of pytest
    with pytest.raises(SystemExit):
        compare.main(argv)
    return seen


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], timeout=60).returncode == 0


def test_the_dry_run_prints_settings_a_b_and_c_and_touches_nothing(tmp_path, monkeypatch):
    done = dry_run(tmp_path, SETTINGS="abc")
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "called").exists(), (tmp_path / "called").read_text()
    assert not (tmp_path / "out").exists()
    lines = compare_lines(done.stdout)
    assert len(lines) == 3, done.stdout

    expected = [  # (workload name, workflows, result name, host-tier ratio)
        ("sequential-8192", 1, "gpu-sequential-8192", "4"),
        ("concurrent-32x1024", 32, "gpu-concurrent-32x1024", "3"),
        ("concurrent-64x1024", 64, "gpu-concurrent-64x1024", "3"),
    ]
    for argv, (workload, workflows, name, ratio) in zip(lines, expected, strict=True):
        seen = what_main_passes_on(argv, monkeypatch)
        assert seen["workload"].name == workload
        assert len(seen["workload"].workflows) == workflows
        assert seen["configs"] == FOUR
        assert seen["repeats"] == 1
        assert seen["log_dir"] == tmp_path / "out" / "results" / "logs" / name
        extra = seen["extra"]
        assert "--enable-cache-report" in extra
        assert extra[extra.index("--hicache-ratio") + 1] == ratio
    # (b) and (c) differ only in their number of workflows
    assert (
        lines[1][lines[1].index("--params") + 1].replace("32", "64")
        == lines[2][lines[2].index("--params") + 1]
    )


def test_the_one_call_form_fits_a_device_call(tmp_path):
    done = dry_run(
        tmp_path,
        SETTINGS="bc",
        CONFIGS="kvflow-hicache,lru",
        TIMEOUT_B="240",
        TIMEOUT_C="300",
        NAME_SUFFIX="-pair",
    )
    assert done.returncode == 0, done.stderr
    assert "b 240s c 300s, 540 s" in done.stdout and "warning" not in done.stdout
    lines = compare_lines(done.stdout)
    assert [argv[argv.index("--name") + 1] for argv in lines] == [
        "gpu-concurrent-32x1024-pair",
        "gpu-concurrent-64x1024-pair",
    ]
    assert all(argv[argv.index("--configs") + 1] == "kvflow-hicache,lru" for argv in lines)


def test_unknown_settings_and_c_with_four_servers_are_refused(tmp_path):
    assert dry_run(tmp_path, SETTINGS="bd").returncode == 2
    # A real run of (c) with the four servers side by side would not fit the GPU: refused
    # before anything runs (the fake commands would record it).
    done = dry_run(tmp_path, SETTINGS="c", DRY_RUN="0")
    assert done.returncode == 2 and "at most two servers" in done.stderr
    assert not (tmp_path / "called").exists()
