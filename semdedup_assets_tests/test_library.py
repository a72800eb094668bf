"""`from semdedup_assets import SemDeDup`: the method as a library, on every input type, without Dagster."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from semdedup_assets import SemDeDup, SemDeDupResult
from semdedup_assets.core.config import Settings
from semdedup_assets.core.io import storage as st
from semdedup_assets.core.io.catalog import query
from semdedup_assets_tests.fixtures import BASE_SENTENCES, NEAR_COPIES, make_planted

REPO = Path(__file__).resolve().parents[1]
KNOBS = {"clusters": 5, "buckets": 3, "eps": [0.001, 0.01, 0.1], "block_size": 32, "progress": False}


@pytest.fixture(scope="module")
def planted() -> np.ndarray:
    """240 unit vectors in 8 dimensions; every 6th a near-copy of the row before."""
    return make_planted(240, 8, dup_every=6, seed=1)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-layer random BERT written locally (nothing downloaded): a quick text model."""
    from semdedup_assets_tests.tinybert import write_tiny_bert

    return write_tiny_bert(tmp_path_factory.mktemp("bert") / "bert")


def test_array_contract(planted: np.ndarray, tmp_path: Path) -> None:
    storage = tmp_path / "s"
    with SemDeDup(**KNOBS).run(planted, storage=storage) as result:
        curve = result.eps_curve
        assert curve.column_names == ["eps", "kept", "removed", "kept_fraction"]
        assert curve.column("eps").to_pylist() == [0.001, 0.01, 0.1]
        for row in curve.to_pylist():
            mask = result.keep_mask(row["eps"])
            assert mask.dtype == np.bool_ and mask.shape == (240,)
            assert int(mask.sum()) == row["kept"]
            assert len(result.duplicates(row["eps"])) == row["removed"]
        # Input order, ids the row numbers as strings: of each planted pair (rows 0 and 1, 6 and 7, ...) one goes.
        mask = result.keep_mask(0.01)
        assert (mask[0::6] ^ mask[1::6]).all()
        assert result.kept_ids(0.01) == [str(i) for i in np.flatnonzero(mask)]
        dups = result.duplicates(0.01)
        assert dups.column_names == ["id", "duplicate_of", "max_sim", "cluster"]
        pairs = dict(zip(dups.column("id").to_pylist(), dups.column("duplicate_of").to_pylist()))
        removed = "7" if "7" in pairs else "6"
        assert pairs[removed] == {"6": "7", "7": "6"}[removed]
        why = result.explain(int(removed))
        assert why["duplicate_of"] == pairs[removed] and why["max_sim"] > 0.99 and 0.01 in why["removed_at_eps"]
        with pytest.raises(KeyError, match="no item with id 'nope'"):
            result.explain("nope")
        assert np.array_equal(result.select(eps=0.01), planted[mask])
        assert len(result.select(keep_fraction=0.5)) == 120
        assert result.sql("SELECT count(*) AS n FROM items").to_pylist() == [{"n": 240}]
        out = result.export(eps=0.01)
        assert out.is_dir() and str(out).startswith(str(storage))
        with pytest.raises(ValueError, match="not configured"):
            result.export(eps=0.02)
        with pytest.raises(ValueError, match="eps must lie in"):
            result.keep_mask(1.5)
    # Nothing outside the storage; a kept storage stays after close().
    assert [p.name for p in tmp_path.iterdir()] == ["s"]
    assert (storage / "keep_lists").is_dir()


def test_temporary_storage_goes_with_the_result(planted: np.ndarray) -> None:
    result = SemDeDup(**KNOBS).run(planted[:60])
    root = Path(result.settings.storage)
    assert root.is_dir()
    result.close()
    assert not root.exists()
    result = SemDeDup(**KNOBS).run(planted[:60])
    root = Path(result.settings.storage)
    del result  # collected: removed too
    import gc

    gc.collect()
    assert not root.exists()


def test_kept_storage_reuses_its_embeddings(planted: np.ndarray, tmp_path: Path) -> None:
    storage = tmp_path / "s"
    first = SemDeDup(**KNOBS).run(planted, storage=storage)
    embeddings = sorted((storage / "embeddings").glob("*.parquet"))
    before = [p.stat().st_mtime_ns for p in embeddings]
    again = SemDeDup(**KNOBS).run(planted, storage=storage)
    assert [p.stat().st_mtime_ns for p in embeddings] == before
    assert np.array_equal(first.keep_mask(0.01), again.keep_mask(0.01))
    # Shorter data in the same storage: the extra shard and its results go, not a refusal.
    short = SemDeDup(**KNOBS, shard_rows=100).run(planted, storage=tmp_path / "t")
    assert len(short.storage.stage_files(st.RAW)) == 3
    shorter = SemDeDup(**KNOBS, shard_rows=100).run(planted[:150], storage=tmp_path / "t")
    assert len(shorter.storage.stage_files(st.RAW)) == 2 and len(shorter.keep_mask(0.01)) == 150


def test_items_equal_semdedup_run_byte_for_byte(planted: np.ndarray, tmp_path: Path) -> None:
    """The library's run and `semdedup run` (Dagster) on the same shards write the same files."""
    from semdedup_assets import cli

    ids = [f"item-{i:04d}" for i in range(len(planted))]
    library = SemDeDup(**KNOBS, shard_rows=100).run(planted, ids=ids, storage=tmp_path / "library")
    graph = tmp_path / "graph"
    assert (
        cli.main(
            [
                "run",
                "--input",
                library.settings.input,
                "--storage",
                str(graph),
                "--modality",
                "embedding",
                "--clusters",
                "5",
                "--buckets",
                "3",
                "--eps",
                "0.001,0.01,0.1",
                "--block-size",
                "32",
            ]
        )
        == 0
    )
    theirs = Settings(storage=str(graph)).storage_root()
    for stage in (st.RAW, st.EMBEDDINGS, st.CENTROIDS, st.CLUSTER_ASSIGNMENTS, st.SEMANTIC_DUPLICATES, st.KEEP_LISTS):
        ours = {p.name: p.read_bytes() for p in library.storage.stage_files(stage)}
        assert ours and ours == {p.name: p.read_bytes() for p in theirs.stage_files(stage)}, stage
    items = "SELECT * FROM items ORDER BY id"
    assert query(library.storage, items) == query(theirs, items)
    assert library.items.column("id").to_pylist() == ids  # the input's order


@pytest.mark.servers
def test_engine_ray_passes_through(planted: np.ndarray, tmp_path: Path) -> None:
    """engine="ray" (a local Ray instance) runs the units on Ray and writes the local engine's bytes."""
    pytest.importorskip("ray")
    knobs = {**KNOBS, "shard_rows": 120}
    local = SemDeDup(**knobs).run(planted, storage=tmp_path / "local")
    ray = SemDeDup(**knobs, engine="ray", ray_actors=1).run(planted, storage=tmp_path / "ray")
    assert ray.settings.engine == "ray"
    for stage in (st.CLUSTER_ASSIGNMENTS, st.SEMANTIC_DUPLICATES, st.KEEP_LISTS):  # embeddings: their cache key
        ours = {p.name: p.read_bytes() for p in ray.storage.stage_files(stage)}
        assert ours and ours == {p.name: p.read_bytes() for p in local.storage.stage_files(stage)}, stage
    assert np.array_equal(ray.keep_mask(0.01), local.keep_mask(0.01))


NO_DAGSTER = """
import sys
import numpy as np
from semdedup_assets import SemDeDup
x = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
with SemDeDup(clusters=2, buckets=2, progress=False).run(x) as r:
    r.keep_mask(0.01), r.duplicates(0.01), r.eps_curve
print(sorted(m for m in sys.modules if m.split('.')[0].startswith('dagster')))
"""


@pytest.mark.subprocess
def test_library_loads_no_dagster() -> None:
    out = subprocess.run([sys.executable, "-c", NO_DAGSTER], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_tables_and_tensors_give_their_own_type_back(planted: np.ndarray, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    pd = pytest.importorskip("pandas")
    tensor = torch.from_numpy(planted)
    ids = [f"r{i}" for i in range(len(planted))]
    table = pa.table(
        {"key": ids, "score": np.arange(len(planted)), "embedding": pa.array(list(planted), pa.list_(pa.float32()))}
    )
    frame = table.to_pandas()
    masks = []
    for data in (tensor, table, frame):
        with SemDeDup(**KNOBS, id_column="key").run(data, storage=tmp_path / type(data).__name__) as r:
            masks.append(r.keep_mask(0.01))
            kept = r.select(eps=0.01)
            assert type(kept) is type(data) and len(kept) == int(masks[-1].sum())
            if data is not tensor:
                assert r.kept_ids(0.01)[:3] == list(np.asarray(ids)[masks[-1]][:3])
    assert all(np.array_equal(masks[0], m) for m in masks)
    assert list(kept.columns) == ["key", "score", "embedding"] and isinstance(kept, pd.DataFrame)


def test_hf_dataset(planted: np.ndarray, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"embedding": [list(map(float, v)) for v in planted]})
    with SemDeDup(**KNOBS).run(ds, storage=tmp_path / "s") as r:
        kept = r.select(eps=0.01)
        assert isinstance(kept, datasets.Dataset) and len(kept) == int(r.keep_mask(0.01).sum())


def test_texts(tiny_bert: Path, tmp_path: Path) -> None:
    texts = [*BASE_SENTENCES, *NEAR_COPIES.values(), BASE_SENTENCES[0]]  # the last: an exact copy of row 0
    sd = SemDeDup(model=str(tiny_bert), clusters=2, buckets=2, eps=[0.001, 0.01], max_length=64, progress=False)
    with sd.run(texts, storage=tmp_path / "s") as r:
        assert not r.keep_mask(0.001)[-1]
        why = r.explain(len(texts) - 1)  # the exact copy: its pair's text beside its own
        assert why["duplicate_of"] == "0" and why["max_sim"] > 0.9999
        assert why["text"] == why["duplicate_text"] == BASE_SENTENCES[0]
        kept = r.select(eps=0.001)
        assert kept == [t for t, keep in zip(texts, r.keep_mask(0.001)) if keep]


def test_a_path_of_shards(planted: np.ndarray, tmp_path: Path) -> None:
    folder = tmp_path / "input"
    folder.mkdir()
    for k in range(2):
        pq.write_table(
            pa.table(
                {
                    "id": [f"p{k}-{i}" for i in range(120)],
                    "embedding": pa.array(list(planted[k * 120 : (k + 1) * 120]), pa.list_(pa.float32())),
                }
            ),
            folder / f"part-{k}.parquet",
        )
    with SemDeDup(**KNOBS, modality="embedding").run(str(folder), storage=tmp_path / "s") as r:
        assert r.items.column("id").to_pylist()[118:122] == ["p0-118", "p0-119", "p1-0", "p1-1"]
        assert (r.select(eps=0.01) / "part-0.parquet").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input", "s"]


def test_bad_input_names_what_is_wrong(planted: np.ndarray, tmp_path: Path) -> None:
    sd = SemDeDup(**KNOBS)
    storage = tmp_path / "s"
    with pytest.raises(TypeError, match=r"unknown setting.*'clusterz'"):
        SemDeDup(clusterz=3)
    with pytest.raises(ValueError, match=r"reference= .decontamination. runs in the asset graph only"):
        SemDeDup(reference="ref/")
    with pytest.raises(ValueError, match="clusters must be >= 1"):
        SemDeDup(clusters=0)
    with pytest.raises(TypeError, match="progress must be True or False, got 'no'"):
        SemDeDup(progress="no")  # a non-empty string is true: it would show the bar it asks to hide
    with pytest.raises(TypeError, match=r"shard_rows must be an integer, got 1\.5"):
        SemDeDup(shard_rows=1.5)
    with pytest.raises(ValueError, match=re.escape("N x d array, got shape (8,)")):
        sd.run(planted[0], storage=storage)
    zero = planted.copy()
    zero[9] = 0.0
    with pytest.raises(ValueError, match=r"embeddings row 9 is a zero vector \(zero norm\)"):
        sd.run(zero, storage=storage)  # the caller's row, not the internal shard's file name
    bad = planted.copy()
    bad[17, 3] = np.nan
    with pytest.raises(ValueError, match="row 17"):
        sd.run(bad, storage=storage)
    with pytest.raises(TypeError, match="data row 1 is a int"):
        sd.run(["a", 3], storage=storage)
    with pytest.raises(ValueError, match="ids has 2 entries but data has 240 rows"):
        sd.run(planted, ids=["a", "b"], storage=storage)
    with pytest.raises(ValueError, match="id 'x' appears twice, at rows 7 and 201"):
        sd.run(planted, ids=[f"x{i}" if i not in (7, 201) else "x" for i in range(240)], storage=storage)
    with pytest.raises(ValueError, match="missing payload column 'body'"):
        SemDeDup(**KNOBS, column="body").run(pa.table({"text": ["x"]}), storage=storage)
    with pytest.raises(TypeError, match=r"got builtins.dict"):
        sd.run({"a": 1}, storage=storage)
    shards = tmp_path / "in"
    shards.mkdir()
    (shards / "part-7.jsonl").write_text('{"id": "a", "embedding": [1, 0]}\n{"id": "b", "embedding": "x"}\n')
    with pytest.raises(ValueError, match="part-7"):
        SemDeDup(**KNOBS, modality="embedding").run(str(shards), storage=storage)
    with pytest.raises(ValueError, match=r"input .*nowhere does not exist"):
        sd.run(tmp_path / "nowhere", storage=storage)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "s"]
    with pytest.raises(ValueError, match="give exactly one"):
        with SemDeDup(**KNOBS).run(planted[:60]) as r:
            r.select()


def test_result_type_is_exported() -> None:
    assert SemDeDupResult.__name__ == "SemDeDupResult"


def doc_blocks(path: Path) -> list[str]:
    """The ```python blocks of a Markdown file, but those under a `<!-- not run ... -->` line."""
    blocks = re.findall(r"(<!-- not run[^\n]*-->\n)?```python\n(.*?)```", path.read_text(), flags=re.S)
    return [code for marker, code in blocks if not marker]


def test_python_api_doc_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/python-api.md's examples, run in order in one namespace (so they stay true)."""
    blocks = doc_blocks(REPO / "docs" / "python-api.md")
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for code in blocks:
        exec(compile(code, "docs/python-api.md", "exec"), namespace)
    assert list(tmp_path.iterdir()) == []  # temporary storages only, all removed


@pytest.mark.subprocess
def test_dataframe_example_script_runs(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(REPO / "examples" / "python_api_dataframe.py")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert "kept 400 of 600 rows" in out.stdout and "duplicate_of" in out.stdout
    assert list(tmp_path.iterdir()) == []


def test_readme_python_section_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's Python example, on a planted embeddings.npy, as a user would paste it."""
    section = (REPO / "README.md").read_text().split("## Python\n", 1)[1].split("\n## ", 1)[0]
    [code] = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    rng = np.random.default_rng(0)
    base = rng.standard_normal((300, 16)).astype(np.float32)
    np.save(tmp_path / "embeddings.npy", np.concatenate([base, base[:60] + 1e-4]))  # 60 near-copies
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["keep"].shape == (360,) and int((~namespace["keep"]).sum()) >= 60
    assert sorted(p.name for p in tmp_path.iterdir()) == ["embeddings.npy"]  # the temporary storage is gone


def test_rows_are_checked_chunk_by_chunk_and_named_by_the_callers_index() -> None:
    from semdedup_assets.library import check_embedding_rows

    x = np.ones((10, 3), dtype=np.float32)
    check_embedding_rows(x, chunk=4)
    x[6] = 0.0
    with pytest.raises(ValueError, match="embeddings row 6 is a zero vector"):
        check_embedding_rows(x, chunk=4)  # row 2 of the second chunk
    x[6] = 1e-30  # norm 1.7e-30: normal in float32, accepted as ingest accepts it
    check_embedding_rows(x, chunk=4)
    x[6] = 1e-40  # subnormal: ingest refuses it, so the library does first
    with pytest.raises(ValueError, match="embeddings row 6 is subnormal"):
        check_embedding_rows(x, chunk=4)
    x[6] = 1.0
    x[9, 1] = np.inf
    with pytest.raises(ValueError, match="embeddings row 9 has a non-finite value"):
        check_embedding_rows(x, chunk=4)


def test_status_of_a_library_storage_does_not_read_as_a_fault(
    planted: np.ndarray, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: `semdedup status` on a library run's storage said "0 registered, 1 ingested" (no Dagster
    instance registers partitions there) and "0 runs recorded", which read as a broken storage."""
    from semdedup_assets import cli

    SemDeDup(**KNOBS).run(planted[:200], storage=tmp_path / "s").close()
    capsys.readouterr()
    assert cli.main(["status", "--storage", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "registered" not in out, out
    assert "shards:     1 ingested, 1 embedded, 1 assigned" in out, out
    assert "runs:       none recorded (no Dagster instance" in out, out


@pytest.mark.pure
def test_an_array_is_written_as_np_save_writes_it_and_left_alone_when_unchanged(tmp_path: Path) -> None:
    """The library writes an in-memory array's .npy from its buffer: the bytes np.save gives (float32, C order,
    from a float64 or strided array too), and an unchanged file is not rewritten (a kept storage re-uses it)."""
    import io
    import os

    from semdedup_assets.library import write_npy_if_changed

    path = st.to_upath(str(tmp_path)) / "part-00000.npy"
    for x in (np.random.default_rng(0).random((300, 7)), np.arange(60, dtype=np.float32).reshape(6, 10)[:, ::3]):
        expected = io.BytesIO()
        np.save(expected, np.asarray(x, dtype=np.float32), allow_pickle=False)
        write_npy_if_changed(x, path)
        assert path.read_bytes() == expected.getvalue()
        stamp = os.stat(str(path)).st_ino
        write_npy_if_changed(x, path)
        assert os.stat(str(path)).st_ino == stamp  # not replaced
