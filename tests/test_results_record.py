"""The results record: every result JSON names its commit and machine, every cited file exists."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from kvflow.harness import provenance

REPO = Path(__file__).resolve().parents[1]
RECORD_DIRS = ("benchmarks/results", "docs/robustness")
# A path under a record folder, unless it follows a colon (`git show HASH:path`: a file in history).
CITED = re.compile(r"(?<![:/.\w])(?:\.\./)?((?:" + "|".join(map(re.escape, RECORD_DIRS)) + r")/[\w.\-/]*\w)")


def test_a_written_result_records_its_commit_and_machine(tmp_path):
    out = tmp_path / "result.json"
    written = provenance.write_result(out, {"medians": {"kvflow": 1.0}})
    saved = json.loads(out.read_text())
    assert saved == written and saved["medians"] == {"kvflow": 1.0}
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    assert saved["commit"] == head.stdout.strip() and re.fullmatch(r"[0-9a-f]{40}", saved["commit"])
    assert isinstance(saved["dirty"], bool)
    assert "CPUs" in saved["machine"] and "Python" in saved["machine"]


def test_without_a_git_checkout_the_commit_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(provenance.COMMIT_ENV, raising=False)
    assert provenance.checkout(tmp_path) == {"commit": "unknown", "dirty": None}
    monkeypatch.setenv(provenance.COMMIT_ENV, "0123abc")
    assert provenance.checkout(tmp_path) == {
        "commit": "0123abc",
        "dirty": None,
        "commit_source": provenance.COMMIT_ENV,
    }


@pytest.mark.parametrize(
    "path", sorted(p for d in RECORD_DIRS for p in (REPO / d).glob("*.json")), ids=lambda p: p.name
)
def test_every_kept_result_records_its_commit_and_machine(path):
    result = json.loads(path.read_text())
    assert re.fullmatch(r"[0-9a-f]{40}", result["commit"]), path.name
    assert result["machine"], path.name


def test_every_result_file_the_docs_cite_exists():
    cited = {
        (doc.relative_to(REPO), path)
        for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
        for path in CITED.findall(doc.read_text())
    }
    assert cited, "the docs cite no result file"
    missing = sorted(f"{doc}: {path}" for doc, path in cited if not (REPO / path).exists())
    assert not missing
