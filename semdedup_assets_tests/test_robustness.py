"""Robustness (RQ3): `semdedup sweep` over k, `semdedup compare`, and the `robustness` asset."""

from __future__ import annotations

import base64
import io
import json
import os
import re
from pathlib import Path

import dagster as dg
import matplotlib.image
import pytest

from semdedup_assets.cli import main
from semdedup_assets.core.config import Settings
from semdedup_assets.core.io import storage as st
from semdedup_assets.core.select.robustness import CompareError, compare_storages, run_sweep, sub_storage
from semdedup_assets.core.settings_store import load_settings
from semdedup_assets.status import collect_status
from semdedup_assets_tests.core.test_units import run_units
from semdedup_assets_tests.fixtures import write_embedding_shards

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
KS = (3, 12)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One `semdedup sweep --clusters 3,12` on bring-your-own embeddings with planted duplicates; (root, stdout)."""
    tmp = tmp_path_factory.mktemp("sweep")
    write_embedding_shards(tmp / "input", n_shards=3, per_shard=100, d=8, dup_every=5)
    root = tmp / "S"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DAGSTER_HOME", "unset-below")  # recorded, so that teardown restores the variable's absence
        mp.delenv("DAGSTER_HOME")
        out = io.StringIO()
        mp.setattr("sys.stdout", out)
        code = main(
            [
                "sweep",
                "--input",
                str(tmp / "input"),
                "--storage",
                str(root),
                "--modality",
                "embedding",
                "--clusters",
                ",".join(map(str, KS)),
                "--eps",
                "0.01,0.1",
                "--buckets",
                "2",
            ]
        )
    assert code == 0, out.getvalue()
    return root, out.getvalue()


def test_sweep_makes_normal_storages_that_share_the_embeddings(sweep: tuple[Path, str]) -> None:
    root, _ = sweep
    subs = [root / f"k={k}" for k in KS]
    assert json.loads((root / "sweep.json").read_text())["configurations"] == [
        {"storage": str(s), "clusters": k, "model": None, "seed": None} for s, k in zip(subs, KS)
    ]
    for sub, k in zip(subs, KS):
        # A normal storage: its own settings, instance and catalog; `status` says it is complete.
        status = collect_status(load_settings(str(sub)), str(sub / "dagster_home"))
        assert status["state"] == "complete" and status["centroids"]["k"] == k, status
        assert json.loads((sub / "semdedup.json").read_text())["compare_with"] == ",".join(map(str, subs))
        assert main(["verify", "--storage", str(sub)]) == 0  # hard links and robustness/ files are no problem
    # One embedding pass: the second k's embeddings are the first's files (hard links), not copies.
    for shard in ("part-00", "part-01", "part-02"):
        a, b = (os.stat(s / "embeddings" / f"{shard}.parquet") for s in subs)
        assert a.st_ino == b.st_ino and a.st_nlink == 2


def test_sweep_prints_the_comparison_and_a_real_png(sweep: tuple[Path, str]) -> None:
    root, out = sweep
    assert "eps  | a   | b    | removed_a | removed_b | both | jaccard" in out
    [plot] = re.findall(r"^plot: (.+)$", out, flags=re.M)
    assert plot == str(root / "compare.png")
    assert Path(plot).read_bytes()[:8] == PNG_MAGIC
    assert matplotlib.image.imread(plot).shape[2] in (3, 4)  # decodes as an image
    # Across k the removed sets differ (the hard order depends on the centroids) ...
    r = compare_storages([str(root / f"k={k}") for k in KS])
    assert [p["jaccard"] < 1.0 for p in r.pairs] == [True, True]
    assert {p["a"] for p in r.pairs} == {"k=3"} and r.items == 300
    # ... and a storage compared with itself removes exactly the same items, at every eps.
    same = compare_storages([str(root / "k=3")] * 2, eps=[0.001, 0.05, 0.3])
    assert [(p["jaccard"], p["a_also_in_b"], p["a"], p["b"]) for p in same.pairs] == [
        (1.0, 1.0 if p["removed_a"] else None, "k=3", "k=3 (2)") for p in same.pairs
    ]


def test_compare_cli_and_the_robustness_asset(sweep: tuple[Path, str], tmp_path: Path, capsys) -> None:
    root, _ = sweep
    plot = tmp_path / "c.png"
    assert main(["compare", str(root), "--eps", "0.05", "--plot", str(plot)]) == 0  # a sweep root: its sub-storages
    out = capsys.readouterr().out
    assert "0.05 | k=3           |" in out and f"plot: {plot}" in out and plot.read_bytes()[:8] == PNG_MAGIC
    # The sweep materialized `robustness` in its first sub-storage: the PNG is in the metadata the UI shows.
    instance = dg.DagsterInstance.from_config(str(root / "k=3" / "dagster_home"))
    event = instance.get_latest_materialization_event(dg.AssetKey("robustness"))
    meta = event.asset_materialization.metadata
    png = base64.b64decode(re.search(r"base64,([A-Za-z0-9+/=]+)\)", meta["eps_curves"].value).group(1))
    assert png[:8] == PNG_MAGIC and Path(meta["plot"].value).read_bytes() == png
    assert [r.data["configuration"] for r in meta["removed"].records] == ["k=3", "k=12"] * 2
    assert {r.data["a"] for r in meta["pairs"].records} == {"k=3"}


def test_compare_refuses_storages_of_other_items(sweep: tuple[Path, str], tmp_path: Path, capsys) -> None:
    root, _ = sweep
    write_embedding_shards(tmp_path / "input", n_shards=2, per_shard=100, d=8, dup_every=5)
    other = Settings(
        storage=str(tmp_path / "other"),
        input=str(tmp_path / "input"),
        modality="embedding",
        clusters=3,
        buckets=2,
        eps=(0.01, 0.1),
    )
    run_units(other)
    with pytest.raises(
        CompareError,
        match=r"k=3 and .*other hold different items.*100 id\(s\) only in .*k=3 \(e.g. "
        r"s2-00000, s2-00001, s2-00002, s2-00003, s2-00004\)",
    ):
        compare_storages([other.storage, str(root / "k=3")])
    assert main(["compare", other.storage, str(root / "k=12")]) == 1
    assert "hold different items" in capsys.readouterr().err
    with pytest.raises(CompareError, match="no semantic_duplicates results"):
        compare_storages([str(tmp_path / "input")])


def test_sweep_plan_over_encoders_shares_embeddings_within_one_encoder(tmp_path: Path) -> None:
    ran: list[Settings] = []

    def fake_run(settings: Settings) -> None:  # stands for the whole graph: embeds only when not shared
        ran.append(settings)
        emb = settings.storage_root().shard_file(st.EMBEDDINGS, "part-00")
        if not emb.exists():
            emb.parent.mkdir(parents=True, exist_ok=True)
            emb.write_bytes(settings.model.encode())

    base = Settings(storage=str(tmp_path / "S"), input=str(tmp_path), modality="text", clusters=7)
    r = run_sweep(base, base.storage, [5, None], ["org/enc-a", "enc:b"], fake_run, log=lambda m: None)
    assert r.storages == [sub_storage(base.storage, k, m) for m in ("org/enc-a", "enc:b") for k in (5, None)]
    assert r.storages[0].endswith("S/model=org_enc-a/k=5") and r.storages[3].endswith("S/model=enc_b/k=auto")
    assert [(s.model, s.clusters) for s in ran] == [
        ("org/enc-a", 5),
        ("org/enc-a", None),
        ("enc:b", 5),
        ("enc:b", None),
    ]
    assert r.shared == {r.storages[1]: 1, r.storages[3]: 1}
    for i, model in ((1, b"org/enc-a"), (3, b"enc:b")):  # each k got its own encoder's file, never the other's
        assert (Path(r.storages[i]) / "embeddings" / "part-00.parquet").read_bytes() == model
    with pytest.raises(ValueError, match="repeats a configuration"):
        run_sweep(base, base.storage, [5, 5], [None], fake_run)
    ran.clear()  # seeds: one level more, and every seed of the one encoder shares its embeddings
    r = run_sweep(
        base.replace(storage=str(tmp_path / "T"), model="m"),
        str(tmp_path / "T"),
        [5],
        [None],
        fake_run,
        log=lambda m: None,
        seeds=[0, 1],
    )
    assert [s[-len("k=5/seed=0") :] for s in r.storages] == ["k=5/seed=0", "k=5/seed=1"]
    assert [(s.seed, s.clusters, s.model) for s in ran] == [(0, 5, "m"), (1, 5, "m")] and r.shared == {r.storages[1]: 1}
