"""Exact copies embedded once (issue 36 point 1): digests at ingest, one encoding per payload, `exact_of`.

The acceptance test: keep-lists byte-identical with and without collapsing, at every eps,
on a planted corpus with copies within and across shards and on the demo corpus.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("model2vec")
pytest.importorskip("skeletoken")

from semdedup_assets import cli
from semdedup_assets.core.config import Settings
from semdedup_assets.core.embed import shard as embed_module
from semdedup_assets.core.embed.encoders import batch_invariant, create_encoder
from semdedup_assets.core.io import catalog
from semdedup_assets.core.io import storage as st
from semdedup_assets.core.io.catalog import exact_copy_count
from semdedup_assets.core.io.shards import PAYLOAD_HASH
from semdedup_assets_tests.fixtures import BASE_SENTENCES, NEAR_COPIES
from semdedup_assets_tests.tinybert import write_tiny_bert

EPS = "0.0001,0.01,0.1"


@pytest.fixture(scope="module")
def static_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A static model distilled from a tiny random BERT (never downloaded)."""
    root = tmp_path_factory.mktemp("exact-static")
    bert = write_tiny_bert(root / "bert")
    static = root / "static"
    assert cli.main(["distill", "--from", str(bert), "--dims", "16", "--out", str(static)]) == 0
    return static


def planted_corpus(folder: Path, n_shards: int = 3, per_shard: int = 60, seed: int = 0) -> dict[str, str]:
    """Text shards whose items repeat earlier texts, in the same shard and across shards; returns id -> text."""
    rng = random.Random(seed)
    pool = [*BASE_SENTENCES, *NEAR_COPIES.values()]
    texts: dict[str, str] = {}
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        rows = []
        for i in range(per_shard):
            if texts and rng.random() < 0.4:  # an exact copy of any earlier item, this shard's or another's
                text = rng.choice(list(texts.values()))
            else:
                text = f"{rng.choice(pool)} {rng.choice(pool).split()[0]} {i} {s}"
            item = f"s{s}-{rng.randrange(10**6):06d}-{i}"
            rows.append({"id": item, "text": text})
            texts[item] = text
        pq.write_table(pa.Table.from_pylist(rows), folder / f"part-{s:02d}.parquet")
    return texts


def run(input_dir: Path, storage: Path, model: Path, *extra: str) -> None:
    """`semdedup run` with collapsing on (it is off by default), unless `extra` turns it off."""
    if "--no-exact-copies" not in extra:
        extra = ("--exact-copies", *extra)
    args = ["run", "--input", str(input_dir), "--storage", str(storage), "--model", f"model2vec:{model}"]
    assert cli.main([*args, "--clusters", "4", "--buckets", "2", "--eps", EPS, *extra]) == 0


def keep_list_digest(storage: Path) -> str:
    h = hashlib.sha256()
    files = sorted((storage / "keep_lists").rglob("*.parquet"))
    assert files
    for p in files:
        h.update(str(p.relative_to(storage)).encode() + p.read_bytes())
    return h.hexdigest()


def embeddings_of(storage: Path) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for p in sorted((storage / "embeddings").rglob("*.parquet")):
        t = pq.read_table(p)
        for i, v in zip(
            t.column("id").to_pylist(),
            t.column("embedding").combine_chunks().flatten().to_numpy().reshape(t.num_rows, -1),
        ):
            out[i] = v.tobytes()
    return out


class CountingEncoder:
    """Wraps an encoder and counts the items it is asked to embed."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.items = inner, 0
        self.modality, self.name, self.dim = inner.modality, inner.name, inner.dim
        self.batch_invariant = batch_invariant(inner)

    def encode(self, items: list[str]) -> np.ndarray:
        self.items += len(items)
        return self.inner.encode(items)


def test_static_vectors_do_not_depend_on_the_batch(static_model: Path) -> None:
    """What collapsing rests on: an item's bits are the same alone, in any batch, in any position."""
    enc = create_encoder("model2vec", f"model2vec:{static_model}", max_length=64)
    assert batch_invariant(enc)
    texts = [*BASE_SENTENCES, *NEAR_COPIES.values(), "a much longer text " * 40]
    together = enc.encode(texts)
    shuffled = list(range(len(texts)))
    random.Random(1).shuffle(shuffled)
    again = enc.encode([texts[i] for i in shuffled])
    for pos, i in enumerate(shuffled):
        assert together[i].tobytes() == again[pos].tobytes()
        assert enc.encode([texts[i]])[0].tobytes() == together[i].tobytes()


def test_transformers_do_not_claim_batch_invariance(tmp_path: Path) -> None:
    enc = create_encoder("text", str(write_tiny_bert(tmp_path / "bert")), max_length=32)
    assert not batch_invariant(enc)  # padded, length-sorted batches: collapsing stays off for them


def test_keep_lists_equal_with_and_without_collapsing(
    static_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    texts = planted_corpus(tmp_path / "input")
    run(tmp_path / "input", tmp_path / "on", static_model)
    run(tmp_path / "input", tmp_path / "off", static_model, "--no-exact-copies")
    assert keep_list_digest(tmp_path / "on") == keep_list_digest(tmp_path / "off")
    on, off = embeddings_of(tmp_path / "on"), embeddings_of(tmp_path / "off")
    assert on == off  # every vector, not only the keep-lists
    by_text: dict[str, list[str]] = {}
    for item, text in texts.items():
        by_text.setdefault(text, []).append(item)
    copies = sum(len(v) - 1 for v in by_text.values())
    assert copies > 20 and any(len({i.split("-")[0] for i in v}) > 1 for v in by_text.values())  # across shards too
    assert exact_copy_count(Settings(storage=str(tmp_path / "on")).storage_root()) == copies
    capsys.readouterr()
    assert cli.main(["status", "--storage", str(tmp_path / "on"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["shards"]["exact_copies"] == copies
    assert cli.main(["status", "--storage", str(tmp_path / "on")]) == 0
    assert f"{copies} item(s) are exact copies" in capsys.readouterr().out


def test_demo_keep_lists_equal_with_and_without_collapsing(static_model: Path, tmp_path: Path) -> None:
    from semdedup_assets.demo_data import write_demo_shards

    write_demo_shards(tmp_path / "demo", n_shards=3, max_items=3000)
    for name, extra in (("on", ("--exact-copies",)), ("off", ("--no-exact-copies",))):
        args = ["run", "--input", str(tmp_path / "demo"), "--storage", str(tmp_path / name)]
        args += ["--model", f"model2vec:{static_model}", "--clusters", "20", "--buckets", "2", *extra]
        assert cli.main(args) == 0  # the default eps, every one of them
    assert keep_list_digest(tmp_path / "on") == keep_list_digest(tmp_path / "off")
    assert exact_copy_count(Settings(storage=str(tmp_path / "on")).storage_root()) > 0


def test_exact_of_names_the_first_copy_in_the_rule_order(static_model: Path, tmp_path: Path) -> None:
    texts = planted_corpus(tmp_path / "input", seed=3)
    run(tmp_path / "input", tmp_path / "s", static_model)
    storage = Settings(storage=str(tmp_path / "s")).storage_root()
    _, rows = catalog.query(storage, "SELECT id, exact_of, cluster FROM items")
    got = {i: e for i, e, _ in rows}
    assert set(got) == set(texts)
    by_text: dict[str, list[str]] = {}
    for item, text in texts.items():
        by_text.setdefault(text, []).append(item)
    for group in by_text.values():
        # Copies share their bits, so their cluster and similarity: the hard order breaks the tie by id.
        first = min(group)
        assert got[first] is None
        assert all(got[i] == first for i in group if i != first)
    # The first copy is the one the keep-lists keep at every eps (the rule's own order).
    for eps_dir in sorted((tmp_path / "s" / "keep_lists").glob("eps=*")):
        kept = set(pq.read_table(eps_dir).column("id").to_pylist())
        assert not any(got[i] is not None for i in kept), eps_dir


def test_a_later_shard_of_copies_encodes_nothing(
    static_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Incremental: a second run adding a shard whose items copy earlier ones embeds none of them again."""
    texts = planted_corpus(tmp_path / "input", n_shards=2)
    counter = CountingEncoder(create_encoder("model2vec", f"model2vec:{static_model}", max_length=256))
    monkeypatch.setattr(embed_module, "encoder_for", lambda settings: counter)
    run(tmp_path / "input", tmp_path / "s", static_model)
    first = counter.items
    assert first == len(set(texts.values()))  # one encoding per distinct payload across both shards
    copies = [{"id": f"late-{n:04d}", "text": t} for n, t in enumerate(sorted(set(texts.values())))]
    pq.write_table(pa.Table.from_pylist(copies), tmp_path / "input" / "part-09.parquet")
    run(tmp_path / "input", tmp_path / "s", static_model)
    assert counter.items == first  # the new shard's vectors all came from the stored ones
    vectors = embeddings_of(tmp_path / "s")
    first_of = {t: i for i, t in sorted(texts.items(), reverse=True)}
    assert all(vectors[c["id"]] == vectors[first_of[c["text"]]] for c in copies)
    # And the stored run equals a fresh one over the same four shards, with collapsing off.
    run(tmp_path / "input", tmp_path / "fresh", static_model, "--no-exact-copies")
    assert keep_list_digest(tmp_path / "s") == keep_list_digest(tmp_path / "fresh")


def test_the_raw_index_records_payload_digests(tmp_path: Path) -> None:
    from semdedup_assets.core.io.shards import ShardFile, read_shard

    pq.write_table(pa.table({"id": ["a", "b", "c"], "text": ["x", "y", "x"]}), tmp_path / "p.parquet")
    index = read_shard(ShardFile("p", st.to_upath(tmp_path / "p.parquet")), "text", "text").table
    h = index.column(PAYLOAD_HASH).to_pylist()
    assert h[0] == h[2] != h[1] and h[0] == hashlib.blake2b(b"x", digest_size=16).digest()


def test_bring_your_own_copies_are_counted_and_named(tmp_path: Path) -> None:
    """Equal vector bytes are exact copies: `exact_of` and the count, with nothing to encode."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 8)).astype(np.float32)
    x[10], x[25], x[33] = x[3], x[3], x[7]  # copies of rows 3 and 7, one in the other shard
    (tmp_path / "in").mkdir()
    for s, rows in enumerate((range(0, 20), range(20, 40))):
        ids = [f"v{i:02d}" for i in rows]
        emb = pa.array([x[i] for i in rows], type=pa.list_(pa.float32()))
        pq.write_table(pa.table({"id": ids, "embedding": emb}), tmp_path / "in" / f"part-{s}.parquet")
    args = ["run", "--input", str(tmp_path / "in"), "--storage", str(tmp_path / "s"), "--modality", "embedding"]
    assert cli.main([*args, "--clusters", "3", "--buckets", "1", "--eps", EPS]) == 0
    storage = Settings(storage=str(tmp_path / "s")).storage_root()
    assert exact_copy_count(storage) == 3
    _, rows = catalog.query(storage, "SELECT id, exact_of FROM items WHERE exact_of IS NOT NULL ORDER BY id")
    assert rows == [("v10", "v03"), ("v25", "v03"), ("v33", "v07")]


def test_float16_storage_gives_copies_the_same_bits_as_embedding_every_copy(static_model: Path, tmp_path: Path) -> None:
    """Fresh vectors are rounded to float16 as the file stores them, so a copy read back has the very bits."""
    planted_corpus(tmp_path / "input", n_shards=2, seed=5)
    run(tmp_path / "input", tmp_path / "on", static_model, "--embedding-dtype", "float16")
    run(tmp_path / "input", tmp_path / "off", static_model, "--embedding-dtype", "float16", "--no-exact-copies")
    assert embeddings_of(tmp_path / "on") == embeddings_of(tmp_path / "off")
    assert keep_list_digest(tmp_path / "on") == keep_list_digest(tmp_path / "off")
