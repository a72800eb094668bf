"""examples/: every script runs on its tiny data and prints what it promises (issue 35, point 7).

Each example is run as a user runs it, `python examples/<name>.py`, in a subprocess (it calls the
`semdedup` command line, itself a subprocess); the Dagster project runs from a copy of examples/,
since it writes its data and storage inside the project folder.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from semdedup_assets_tests.fixtures import save_tiny_clip

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(script: Path, *args: str, cwd: Path | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME" and not k.startswith("SEMDEDUP_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, str(script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"{script.name}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def _removed(out: str, eps: str) -> int:
    """The `removed` column of one eps row of the eps table a run prints."""
    match = re.search(rf"^{re.escape(eps)}\s*\|\s*(\d+)\s*\|\s*(\d+)", out, re.MULTILINE)
    assert match, out
    return int(match.group(2))


@pytest.mark.timeout(600)
def test_laion_embeddings_example(tmp_path: Path) -> None:
    out = _run(EXAMPLES / "laion_embeddings.py", "--workdir", str(tmp_path))
    # Every 10th vector is a planted near-copy: 20 per 200-row shard, and the .npy stays aligned with its metadata.
    assert _removed(out, "0.01") == 40, out
    assert "shard 0 after deduplication: 180 vectors, 180 metadata rows" in out


@pytest.mark.timeout(600)
def test_text_jsonl_example(tmp_path: Path) -> None:
    out = _run(EXAMPLES / "text_jsonl.py", "--workdir", str(tmp_path))
    assert "items: 12" in out
    assert _removed(out, "0.05") == 4, out  # the four planted near-copies (or their originals)
    assert (tmp_path / "storage" / "deduplicated" / "eps=0.05" / "c4-train.00000-of-00002.jsonl.gz").exists()


@pytest.mark.timeout(600)
def test_images_webdataset_example(tmp_path: Path) -> None:
    clip = save_tiny_clip(tmp_path / "clip")  # a tiny random CLIP: no weights to download
    out = _run(EXAMPLES / "images_webdataset.py", "--workdir", str(tmp_path / "work"), "--model", clip["local_dir"])
    assert "items: 18" in out
    assert _removed(out, "0.01") >= 3, out  # at least the re-encoded and resized copies go
    assert "picture 0, resized" in out  # the captions of the .txt members, joined in raw_items


@pytest.mark.timeout(600)
def test_dagster_project_example(tmp_path: Path) -> None:
    copy = tmp_path / "examples"
    shutil.copytree(EXAMPLES, copy, ignore=shutil.ignore_patterns("__pycache__", "data", ".storage", ".dagster_home"))
    out = _run(copy / "dagster_project" / "run_in_process.py", "--dagster-home", str(tmp_path / "home"))
    # The component's pipeline job (one run, then one run per stage) and the user's asset downstream of it.
    assert "training_mix: 360 kept items" in out, out
    assert (copy / "dagster_project" / ".storage" / "dedup_laion" / "keep_lists" / "eps=0.01.parquet").exists()
