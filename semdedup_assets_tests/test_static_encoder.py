"""Static text embeddings (model2vec): distilled in the test from a tiny random BERT, never downloaded."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("model2vec")
pytest.importorskip("skeletoken")

from semdedup_assets import cli
from semdedup_assets.core.config import Settings
from semdedup_assets.core.embed.encoders import create_encoder, encoder_for
from semdedup_assets.core.embed.encoders.static import (
    NotAStaticModelError,
    StaticTextEncoder,
    default_static_model,
    is_static_model_dir,
    wants_static,
)
from semdedup_assets_tests.fixtures import BASE_SENTENCES, NEAR_COPIES, write_text_shards
from semdedup_assets_tests.tinybert import write_tiny_bert

TEXTS = [*BASE_SENTENCES, *NEAR_COPIES.values(), "the method returns a value", "", "\U0001f642"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(tiny BERT folder, its static model distilled by `semdedup distill --from BERT --dims 16 --out DIR`)."""
    root = tmp_path_factory.mktemp("static")
    bert = write_tiny_bert(root / "bert")
    static = root / "static"
    assert cli.main(["distill", "--from", str(bert), "--dims", "16", "--out", str(static)]) == 0
    return bert, static


def test_distill_command_writes_a_static_model(models: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    bert, static = models
    assert is_static_model_dir(static) and not is_static_model_dir(bert)
    assert (static / "semdedup_distill.json").is_file()
    # A second call finds it and distils nothing.
    assert cli.main(["distill", "--from", str(bert), "--dims", "16", "--out", str(static)]) == 0
    assert "exists already" in capsys.readouterr().out


def test_encoder_round_trip_matches_model2vec(models: tuple[Path, Path]) -> None:
    from model2vec import StaticModel

    _, static = models
    enc = create_encoder("model2vec", f"model2vec:{static}", max_length=64)
    assert isinstance(enc, StaticTextEncoder) and enc.dim == 16
    vectors = enc.encode(TEXTS)
    assert vectors.dtype == np.float32 and vectors.shape == (len(TEXTS), 16)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    # The same vectors as model2vec's own encode (which leaves texts without known tokens at zero).
    theirs = StaticModel.from_pretrained(str(static)).encode(TEXTS[:-2], max_length=64, use_multiprocessing=False)
    np.testing.assert_allclose(vectors[:-2], theirs, atol=1e-5)
    # Texts with no known token share the unknown token's vector instead of failing the shard.
    assert np.array_equal(vectors[-1], vectors[-2])
    assert enc.encode([]).shape == (0, 16)


def test_encoding_is_deterministic_across_batches_threads_and_order(models: tuple[Path, Path]) -> None:
    import torch

    _, static = models
    many = [f"{TEXTS[i % len(TEXTS)]} {i % 7}" for i in range(2500)]  # more than one 1024-text batch
    enc = create_encoder("model2vec", f"model2vec:{static}", max_length=64)
    whole = enc.encode(many)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single_thread = enc.encode(many)
    finally:
        torch.set_num_threads(previous)
    assert whole.tobytes() == single_thread.tobytes()
    # One text's vector does not depend on its batch neighbours or position.
    assert all(enc.encode([many[i]]).tobytes() == whole[i].tobytes() for i in (0, 1023, 1024, 2499))
    reversed_rows = enc.encode(many[::-1])[::-1]
    assert reversed_rows.tobytes() == whole.tobytes()


def test_an_embedding_actor_holds_the_tokenizer_threads_to_its_share(models: tuple[Path, Path]) -> None:
    """CPU actors start with the Rust tokenizer pool sized to their CPU share; torch threads likewise."""
    import torch

    from semdedup_assets.core.run.ray_engine import RAYON_THREADS_ENV, ShardEmbedder, plan_actors

    _, static = models
    for actors, share in ((1, "2"), (2, "1")):
        plan = plan_actors(Settings(ray_actors=actors), n_units=4, node_cpus=[2.0], gpus=0)
        assert plan.options["runtime_env"]["env_vars"] == {RAYON_THREADS_ENV: share}, plan.options
    previous = torch.get_num_threads()
    try:
        actor = ShardEmbedder(Settings(model=f"model2vec:{static}"), threads=1)
        assert torch.get_num_threads() == 1
        assert isinstance(actor.encoder.loaded(), StaticTextEncoder)  # loaded at the first shard to encode
    finally:
        torch.set_num_threads(previous)


def test_a_static_folder_is_detected_and_a_transformer_folder_is_refused(models: tuple[Path, Path]) -> None:
    bert, static = models
    assert wants_static(str(static)) and wants_static("static") and not wants_static(str(bert))
    assert isinstance(encoder_for(Settings(model=str(static), max_length=64)), StaticTextEncoder)
    with pytest.raises(
        NotAStaticModelError, match=r"not a model2vec static model.*model_type 'bert'.*semdedup distill"
    ):
        create_encoder("model2vec", f"model2vec:{bert}")
    with pytest.raises(NotAStaticModelError, match="no such folder"):
        create_encoder("model2vec", f"model2vec:{bert}-missing/")


def test_run_refuses_a_transformer_folder_as_static_before_any_run(
    models: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bert, _ = models
    write_text_shards(tmp_path / "input")
    rc = cli.main(
        [
            "run",
            "--input",
            str(tmp_path / "input"),
            "--storage",
            str(tmp_path / "storage"),
            "--model",
            f"model2vec:{bert}",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1 and f"{bert} is not a model2vec static model" in err
    assert not (tmp_path / "storage" / "keep_lists").exists()


def test_static_default_is_distilled_once_and_says_so(models: tuple[Path, Path], tmp_path: Path) -> None:
    bert, _ = models
    said: list[str] = []
    first = default_static_model(tmp_path / "cache", dims=8, source=str(bert), log=said.append)
    assert is_static_model_dir(first) and any("distilling it once for this machine" in m for m in said)
    said.clear()
    assert default_static_model(tmp_path / "cache", dims=8, source=str(bert), log=said.append) == first
    assert said == []  # cached: nothing distilled, nothing said


def _keep_list_digest(storage: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in sorted((storage / "keep_lists").rglob("*.parquet")):
        h.update(str(p.relative_to(storage)).encode() + p.read_bytes())
    return h.hexdigest()


def test_two_runs_with_a_static_model_give_byte_identical_keep_lists(models: tuple[Path, Path], tmp_path: Path) -> None:
    _, static = models
    write_text_shards(tmp_path / "input", n_shards=3)
    digests = []
    for run in ("a", "b"):
        storage = tmp_path / run
        assert (
            cli.main(
                [
                    "run",
                    "--input",
                    str(tmp_path / "input"),
                    "--storage",
                    str(storage),
                    "--model",
                    f"model2vec:{static}",
                    "--clusters",
                    "3",
                    "--buckets",
                    "2",
                    "--eps",
                    "0.01,0.1",
                ]
            )
            == 0
        )
        digests.append(_keep_list_digest(storage))
    assert digests[0] == digests[1] and list((tmp_path / "a" / "keep_lists").rglob("*.parquet"))
