"""A user's audit of this round's commands (issue 34's closing point): the library, --files-per-shard, errors.

Each test fails on the code before its fix; the data is tiny (tens of rows).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from semdedup_assets import SemDeDup
from semdedup_assets_tests.fixtures import make_planted

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-layer random BERT written locally (nothing downloaded): a quick text model."""
    from semdedup_assets_tests.tinybert import write_tiny_bert

    return write_tiny_bert(tmp_path_factory.mktemp("bert") / "bert")


def test_library_masks_line_up_with_texts_when_ingest_rejects_rows(tiny_bert: Path) -> None:
    """An empty text is rejected by ingest; keep_mask/select must still be one entry per input row.

    Before: keep_mask had one entry per *item*, so select() zipped it against the wrong texts
    (here it returned [''] - the rejected row - instead of the kept text)."""
    texts = ["", "the cat sat on the mat", "   ", "stocks fell sharply today"]
    with SemDeDup(model=str(tiny_bert), clusters=1, eps=[0.01], buckets=1, progress=False).run(texts) as result:
        mask = result.keep_mask(0.01)
        assert mask.tolist() == [False, True, False, True]
        assert result.select(eps=0.01) == ["the cat sat on the mat", "stocks fell sharply today"]
        assert result.selection_mask(keep_fraction=1.0).tolist() == [False, True, False, True]
        assert result.kept_ids(0.01) == ["1", "3"]
        with pytest.raises(KeyError, match="id '0' was rejected at ingest \\(empty text\\)"):
            result.explain("0")


def test_library_storage_that_is_a_file_is_a_value_error(tmp_path: Path) -> None:
    """Before: NotADirectoryError: [Errno 20] Not a directory: '<file>/library_input'."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        SemDeDup(clusters=2, eps=0.01, progress=False).run(make_planted(20, 4, 5, 0), storage=afile)
    with pytest.raises(ValueError, match="cannot be a folder"):
        SemDeDup(clusters=2, eps=0.01, progress=False).run(make_planted(20, 4, 5, 0), storage=afile / "sub")


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"eps": "0.1"}, "eps must be numbers, got '0.1'"),
        ({"eps": [0.01, "x"]}, "eps must be numbers"),
        ({"clusters": "ten"}, 'clusters must be a whole number \\(or "auto"\\)'),
        ({"clusters": 2.5}, "clusters must be a whole number"),
        ({"block_size": None}, "block_size must be a whole number"),
    ],
)
def test_library_bad_knob_types_are_value_errors_naming_the_knob(knobs: dict, message: str) -> None:
    """Before: TypeError "'<' not supported between instances of 'float' and 'str'" (docs: a bad value is a
    ValueError at construction)."""
    with pytest.raises(ValueError, match=message):
        SemDeDup(**knobs)


def test_library_eps_as_numpy_values() -> None:
    """np.float32(0.05) and np.linspace(...) are eps values (before: "'numpy.float32' object is not iterable")."""
    assert SemDeDup(eps=np.float32(0.05)).knobs["eps"] == (np.float32(0.05),)
    assert SemDeDup(eps=np.linspace(0.01, 0.05, 3)).knobs["eps"] == (0.01, 0.03, 0.05)


def test_library_none_id_names_the_ids_row() -> None:
    """Before: "shard 'part-00000', row 3: id column 'id' is null" - a shard the user never wrote."""
    with pytest.raises(ValueError, match="ids row 3 is None"):
        SemDeDup(clusters=2, eps=0.01, progress=False).run(
            make_planted(6, 4, 5, 0), ids=["a", "b", "c", None, "e", "f"]
        )


def test_library_missing_model_folder_is_named(tmp_path: Path) -> None:
    """Before: huggingface's "Repo id must be in the form 'repo_name' ..." for a path typo."""
    with pytest.raises(ValueError, match=r"model .*nomodel does not exist"):
        SemDeDup(model=str(tmp_path / "nomodel"), clusters=1, eps=0.01, progress=False).run(["a", "b"])


@pytest.mark.subprocess
def test_cli_missing_model_folder_refused_before_anything_is_written(tmp_path: Path) -> None:
    """Before: the run made the storage, ingested, then failed in the embed stage with a hub repo-id error."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text('{"id": "a", "text": "hello"}\n')
    storage = tmp_path / "st"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "semdedup_assets.cli",
            "run",
            "--input",
            str(tmp_path / "in"),
            "--storage",
            str(storage),
            "--model",
            str(tmp_path / "nomodel"),
            "--clusters",
            "1",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert done.returncode != 0
    assert f"semdedup: error: --model {tmp_path / 'nomodel'} does not exist" in done.stderr
    assert "Traceback" not in done.stderr and not storage.exists()


def test_library_refused_on_another_runs_storage_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A library run into the storage of `semdedup run` on other shards is refused (StrayShardsError) and leaves
    that storage as it was. Before: the refusal came after `library_input/` was written and the storage's
    settings were overwritten (status then showed `input: <storage>/library_input` and every shard as gone)."""
    from semdedup_assets.cli import main
    from semdedup_assets.core.run.loop import StrayShardsError
    from semdedup_assets_tests.fixtures import write_embedding_shards

    write_embedding_shards(tmp_path / "in", n_shards=2, per_shard=20, d=4)
    storage = tmp_path / "st"
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    assert (
        main(
            [
                "run",
                "--input",
                str(tmp_path / "in"),
                "--storage",
                str(storage),
                "--modality",
                "embedding",
                "--clusters",
                "2",
                "--eps",
                "0.01",
                "--files-per-shard",
                "2",
            ]
        )
        == 0
    )
    recorded = (storage / "semdedup.json").read_bytes()
    with pytest.raises(StrayShardsError, match="use another storage"):
        SemDeDup(clusters=2, eps=0.01, progress=False).run(make_planted(20, 4, 5, 0), storage=storage)
    assert (storage / "semdedup.json").read_bytes() == recorded
    assert not (storage / "library_input").exists()


def test_library_files_per_shard_on_a_kept_storage(tmp_path: Path) -> None:
    """files_per_shard= with in-memory data: a kept storage runs again (also on fewer rows) and masks line up."""
    x = make_planted(60, 4, 5, 0)
    sd = SemDeDup(clusters=2, eps=[0.01], files_per_shard=2, shard_rows=20, progress=False)
    first = sd.run(x, storage=tmp_path / "st")
    assert first.keep_mask(0.01).shape == (60,)
    again = sd.run(x, storage=tmp_path / "st")
    assert again.eps_curve == first.eps_curve
    fewer = sd.run(x[:30], storage=tmp_path / "st")
    assert fewer.keep_mask(0.01).shape == (30,) and fewer.items.num_rows == 30


def test_an_in_process_command_leaves_dagster_home_as_it_found_it(tmp_path: Path, monkeypatch) -> None:
    """main() points DAGSTER_HOME at its storage's run history while it runs. Before: it stayed set, so a later
    in-process command on another storage shared that history and refused its own shards as strays."""
    from semdedup_assets.cli import main
    from semdedup_assets_tests.fixtures import write_embedding_shards

    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    write_embedding_shards(tmp_path / "in-a", n_shards=2, per_shard=20, d=4)
    write_embedding_shards(tmp_path / "in-b", n_shards=2, per_shard=20, d=4, seed=1)
    common = ["--modality", "embedding", "--clusters", "2", "--buckets", "2", "--eps", "0.01"]
    for name in ("a", "b"):  # same shard keys, other inputs, other storages
        run = ["run", "--input", str(tmp_path / f"in-{name}"), "--storage", str(tmp_path / f"st-{name}"), *common]
        assert main(run) == 0
        assert "DAGSTER_HOME" not in os.environ
    assert (tmp_path / "st-b" / "dagster_home").is_dir()
