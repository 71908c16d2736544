"""Where a result came from: the commit whose code it measured and the machine it ran on.

Every benchmark and harness writes its result JSON through :func:`write_result`, which adds:

- ``commit``: ``git rev-parse HEAD`` of the checkout this package was imported from, or
  ``$KVFLOW_COMMIT`` where that is no git checkout (the GPU machine gets a copy of the tree
  without ``.git``; then ``commit_source`` says so), else ``"unknown"``;
- ``dirty``: whether tracked files outside ``benchmarks/results/`` differed from that commit
  (the numbers then measured uncommitted code); ``None`` where unknown;
- ``machine``: host name, CPU count, GPU and Python version.

The checkout is read once per process; a run calls :func:`provenance` as it starts, so a file
edited while it runs does not make its result look dirty.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
COMMIT_ENV = "KVFLOW_COMMIT"


def machine() -> str:
    """``host: N CPUs, GPU name (or no GPU), Python x.y.z``."""
    try:
        gpu = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        gpu = ""
    return f"{platform.node()}: {os.cpu_count()} CPUs, {gpu or 'no GPU'}, Python {platform.python_version()}"


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def checkout(root: Path = REPO) -> dict[str, Any]:
    """``commit`` and ``dirty`` of the tree at ``root`` (plus ``commit_source`` when not from git)."""
    commit = _git(root, "rev-parse", "HEAD")
    if commit is None:
        given = os.environ.get(COMMIT_ENV)
        if given:
            return {"commit": given, "dirty": None, "commit_source": COMMIT_ENV}
        return {"commit": "unknown", "dirty": None}
    changed = _git(root, "status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results")
    return {"commit": commit, "dirty": None if changed is None else bool(changed)}


@functools.cache
def provenance() -> dict[str, Any]:
    """The commit, dirty flag and machine of this process's run (read once)."""
    return {**checkout(), "machine": machine()}


def write_result(path: Path, result: dict[str, Any]) -> dict[str, Any]:
    """Write ``result`` as JSON with its provenance fields; returns what was written."""
    stamped = {**result, **provenance()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stamped, indent=2) + "\n")
    return stamped
