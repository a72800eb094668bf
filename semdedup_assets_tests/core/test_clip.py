"""Tests for the open_clip image/text encoders, on a tiny randomly initialised model built offline.

The weights are random, so these tests check plumbing (loading, order, batching, norms,
rejections, safety) and that the embedding is a stable function of the pixels: a re-encoded
copy of an image lands closer to it than any other image does. They say nothing about
semantic quality.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image, ImageDraw

from semdedup_assets.core.embed.encoders import Encoder, available_modalities, create_encoder
from semdedup_assets.core.embed.encoders.clip import (
    DEFAULT_IMAGE_MODEL,
    ImageEncodeResult,
    OpenClipImageEncoder,
    OpenClipTextEncoder,
    UnsafeCheckpointError,
    check_checkpoint_weights_only,
)
from semdedup_assets.core.embed.images import ImageDecodeError
from semdedup_assets_tests.fixtures import TINY_ARCH, save_tiny_clip


def synthetic_image(seed: int, size: int = 96) -> Image.Image:
    """A distinct picture per seed: a colour gradient, a few filled shapes and pixel noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    slope = rng.uniform(-1, 1, 2)
    ramp = np.clip(0.5 + slope[0] * (xx - 0.5) + slope[1] * (yy - 0.5), 0, 1)
    img = Image.fromarray((ramp[..., None] * rng.integers(0, 256, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = (int(v) for v in rng.integers(0, size * 3 // 4, 2))
        w, h = (int(v) for v in rng.integers(size // 8, size // 2, 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x0, y0, x0 + w, y0 + h], fill=colour)
    noisy = np.asarray(img).astype(np.int16) + rng.integers(-20, 21, (size, size, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def to_bytes(img: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    """Encode a PIL image."""
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


IMAGES = [synthetic_image(seed) for seed in range(10)]
ORIGINALS = [to_bytes(img) for img in IMAGES]
CORRUPT = ORIGINALS[3][: len(ORIGINALS[3]) // 3]  # a PNG cut short


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The tiny model saved as a checkpoint file and as a local-dir folder."""
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"), seed=0)


@pytest.fixture(scope="module")
def enc_file(tiny: dict[str, str]) -> OpenClipImageEncoder:
    """The image encoder loaded through arch name + pretrained=<checkpoint file>."""
    return OpenClipImageEncoder(tiny["arch"], pretrained=tiny["checkpoint"], num_workers=0, device="cpu")


@pytest.fixture(scope="module")
def enc_dir(tiny: dict[str, str]) -> OpenClipImageEncoder:
    """The image encoder loaded through local-dir:, via the registry."""
    enc = create_encoder("image", tiny["local_dir"], num_workers=0, device="cpu", batch_size=4)
    assert isinstance(enc, OpenClipImageEncoder)
    return enc


def test_save_tiny_clip_layout(tiny: dict[str, str]) -> None:
    assert tiny["arch"] == TINY_ARCH and TINY_ARCH in open_clip.list_models()
    assert Path(tiny["checkpoint"]).is_file()
    folder = Path(tiny["local_dir"].removeprefix("local-dir:"))
    config = json.loads((folder / "open_clip_config.json").read_text())
    assert set(config) == {"model_cfg", "preprocess_cfg"} and config["preprocess_cfg"]["size"] in (32, [32, 32])
    assert (folder / "open_clip_model.safetensors").is_file()


def test_same_seed_same_weights(tmp_path: Path, tiny: dict[str, str]) -> None:
    again = save_tiny_clip(tmp_path, seed=0)
    a = torch.load(tiny["checkpoint"], weights_only=True)
    b = torch.load(again["checkpoint"], weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_registry_and_protocol(enc_file: OpenClipImageEncoder) -> None:
    assert {"image", "clip_text"} <= set(available_modalities())
    assert isinstance(enc_file, Encoder)
    assert enc_file.modality == "image" and enc_file.dim == 32
    assert enc_file.name.startswith(f"{TINY_ARCH}@") and enc_file.name.endswith("tiny.pt")


def test_checkpoint_file_and_local_dir_give_identical_embeddings(
    enc_file: OpenClipImageEncoder, enc_dir: OpenClipImageEncoder
) -> None:
    # The same batches on both: a row's bits may depend on the batch it shares a GEMM with.
    a = enc_file.encode(ORIGINALS)
    previous, enc_dir.batch_size = enc_dir.batch_size, enc_file.batch_size
    try:
        b = enc_dir.encode(ORIGINALS)
    finally:
        enc_dir.batch_size = previous
    assert a.dtype == np.float32 and a.shape == (10, 32)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("batch_size", [256, 4])
def test_the_bits_do_not_depend_on_torchs_thread_count(tiny: dict[str, str], batch_size: int) -> None:
    """A 1-CPU Ray actor and a 2-core process embed alike (batches run single-threaded, map_batches):
    before, this tiny ViT's rows 8 and 9 differed in their last bits between 1 and 2 torch threads."""
    enc = OpenClipImageEncoder(
        tiny["arch"], pretrained=tiny["checkpoint"], num_workers=0, device="cpu", batch_size=batch_size
    )
    previous = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            runs.append(enc.encode(ORIGINALS).tobytes())
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(previous)
    assert runs[0] == runs[1] == runs[2]


def test_order_is_preserved(enc_file: OpenClipImageEncoder) -> None:
    forward = enc_file.encode(ORIGINALS)
    backward = enc_file.encode(ORIGINALS[::-1])
    np.testing.assert_allclose(backward, forward[::-1], atol=1e-6)
    # And each row is that item encoded on its own.
    np.testing.assert_allclose(enc_file.encode([ORIGINALS[4]])[0], forward[4], atol=1e-5)


def test_batch_size_and_workers_do_not_change_results(tiny: dict[str, str], enc_file: OpenClipImageEncoder) -> None:
    reference = enc_file.encode(ORIGINALS)
    small = OpenClipImageEncoder(tiny["arch"], pretrained=tiny["checkpoint"], batch_size=3, num_workers=0, device="cpu")
    np.testing.assert_allclose(small.encode(ORIGINALS), reference, atol=1e-5)
    small.num_workers = 2
    np.testing.assert_allclose(small.encode(ORIGINALS), reference, atol=1e-5)


def test_encode_preprocessed_matches_bytes_path(enc_file: OpenClipImageEncoder) -> None:
    pixels = torch.stack([enc_file.preprocess(img) for img in IMAGES])
    np.testing.assert_allclose(enc_file.encode_preprocessed(pixels), enc_file.encode(ORIGINALS), atol=1e-6)


def test_encode_images_rejects_corrupt_and_keeps_the_rest(enc_dir: OpenClipImageEncoder) -> None:
    items: list[bytes | None] = [*ORIGINALS[:3], CORRUPT, *ORIGINALS[3:6], None, ORIGINALS[6]]
    result = enc_dir.encode_images(items)
    assert isinstance(result, ImageEncodeResult)
    assert result.ok_index.dtype == np.int64
    assert result.ok_index.tolist() == [0, 1, 2, 4, 5, 6, 8]
    assert [i for i, _ in result.rejected] == [3, 7]
    assert "truncated" in result.rejected[0][1] or "corrupt" in result.rejected[0][1]
    assert "missing" in result.rejected[1][1]
    good = [ORIGINALS[i] for i in (0, 1, 2, 3, 4, 5, 6)]
    np.testing.assert_allclose(result.vectors, enc_dir.encode(good), atol=1e-5)


def test_encode_images_all_bad_and_empty(enc_dir: OpenClipImageEncoder) -> None:
    result = enc_dir.encode_images([b"", None])
    assert result.vectors.shape == (0, 32) and result.ok_index.shape == (0,)
    assert [i for i, _ in result.rejected] == [0, 1]
    assert enc_dir.encode([]).shape == (0, 32)
    with pytest.raises(TypeError):
        enc_dir.encode(ORIGINALS[0])  # a single bytes object, not a sequence of images


def test_strict_encode_names_the_first_bad_index(enc_dir: OpenClipImageEncoder) -> None:
    items = [*ORIGINALS[:6], CORRUPT, ORIGINALS[6], b""]
    with pytest.raises(ImageDecodeError, match=r"^image 6: ") as info:
        enc_dir.encode(items)
    assert info.value.index == 6


def test_reencoded_copies_are_nearer_than_any_distinct_pair(
    enc_file: OpenClipImageEncoder, capsys: pytest.CaptureFixture[str]
) -> None:
    originals = enc_file.encode(ORIGINALS)
    jpeg60 = enc_file.encode([to_bytes(img.convert("RGB"), "JPEG", quality=60) for img in IMAGES])
    resized = enc_file.encode([to_bytes(img.resize((72, 72), Image.BICUBIC)) for img in IMAGES])
    sim_jpeg = np.sum(originals * jpeg60, axis=1)
    sim_resized = np.sum(originals * resized, axis=1)
    gram = originals @ originals.T
    distinct = gram[~np.eye(len(gram), dtype=bool)]
    with capsys.disabled():
        print(
            f"\n[tiny random CLIP] re-encoded copies: JPEG q60 min {sim_jpeg.min():.5f} "
            f"(mean {sim_jpeg.mean():.5f}), resized 0.75x min {sim_resized.min():.6f} "
            f"(mean {sim_resized.mean():.5f}); distinct pairs max {distinct.max():.5f} "
            f"(mean {distinct.mean():.5f})"
        )
    assert min(sim_jpeg.min(), sim_resized.min()) > distinct.max()


def test_weights_only_refuses_pickled_objects(tmp_path: Path, tiny: dict[str, str]) -> None:
    marker = tmp_path / "code-ran"

    class Payload:
        """Unpickling this would create `marker` (a stand-in for arbitrary code)."""

        def __reduce__(self) -> tuple[object, tuple[object, ...]]:
            return (Path.touch, (marker,))

    state = torch.load(tiny["checkpoint"], weights_only=True)
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": state, "extra": Payload()}, evil)

    with pytest.raises(UnsafeCheckpointError, match="weights_only=True"):
        OpenClipImageEncoder(tiny["arch"], pretrained=str(evil), num_workers=0, device="cpu")
    with pytest.raises(UnsafeCheckpointError):
        check_checkpoint_weights_only(evil)
    # open_clip's own loader (create_model(weights_only=True)) refuses it too.
    with pytest.raises(Exception, match=r"[Ww]eights only load failed"):
        open_clip.create_model(tiny["arch"], pretrained=str(evil), weights_only=True)
    # Also through a local-dir folder whose weights file is the same pickle.
    folder = tmp_path / "evil-dir"
    shutil.copytree(tiny["local_dir"].removeprefix("local-dir:"), folder)
    (folder / "open_clip_model.safetensors").unlink()
    shutil.copy(evil, folder / "open_clip_pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError):
        create_encoder("image", f"local-dir:{folder}", num_workers=0, device="cpu")
    assert not marker.exists()
    # A plain state_dict (and safetensors) passes the check.
    check_checkpoint_weights_only(tiny["checkpoint"])


def test_default_model_without_weights_is_refused() -> None:
    with pytest.raises(ValueError, match=r"no weights given for open_clip model 'ViT-B-32'.*pretrained="):
        create_encoder("image")
    with pytest.raises(ValueError, match="no weights given"):
        OpenClipImageEncoder(DEFAULT_IMAGE_MODEL, device="cpu")


def test_bad_model_arguments(tmp_path: Path, tiny: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        OpenClipImageEncoder("no-such-arch", pretrained=tiny["checkpoint"], device="cpu")
    with pytest.raises(ValueError, match="neither an existing checkpoint file nor an open_clip tag"):
        OpenClipImageEncoder(TINY_ARCH, pretrained=str(tmp_path / "missing.pt"), device="cpu")
    with pytest.raises(ValueError, match="cannot be combined"):
        OpenClipImageEncoder(tiny["local_dir"], pretrained=tiny["checkpoint"], device="cpu")
    empty = tmp_path / "no-weights"
    empty.mkdir()
    shutil.copy(Path(tiny["local_dir"].removeprefix("local-dir:")) / "open_clip_config.json", empty)
    with pytest.raises(FileNotFoundError, match="no weights file"):
        OpenClipImageEncoder(f"local-dir:{empty}", device="cpu")
    with pytest.raises(FileNotFoundError, match=r"open_clip_config.json"):
        OpenClipImageEncoder(f"local-dir:{tmp_path}", device="cpu")
    with pytest.raises(ValueError, match="precision"):
        OpenClipImageEncoder(tiny["local_dir"], device="cpu", precision="fp16")
    with pytest.raises(ValueError, match="batch_size"):
        OpenClipImageEncoder(tiny["local_dir"], device="cpu", batch_size=0)


def test_random_weights_only_when_asked_and_bare_folder(tiny: dict[str, str]) -> None:
    enc = OpenClipImageEncoder(TINY_ARCH, pretrained="random", num_workers=0, device="cpu")
    assert enc.name == f"{TINY_ARCH}@random" and enc.encode(ORIGINALS[:2]).shape == (2, 32)
    # A folder in open_clip's format also works without the local-dir: prefix.
    bare = OpenClipImageEncoder(tiny["local_dir"].removeprefix("local-dir:"), num_workers=0, device="cpu")
    assert bare.name == tiny["local_dir"]


def test_cpu_bf16_autocast_is_close_to_fp32(tiny: dict[str, str], enc_file: OpenClipImageEncoder) -> None:
    bf16 = OpenClipImageEncoder(tiny["local_dir"], num_workers=0, device="cpu", precision="bf16")
    cos = np.sum(bf16.encode(ORIGINALS) * enc_file.encode(ORIGINALS), axis=1)
    assert bf16.encode(ORIGINALS).dtype == np.float32 and cos.min() > 0.99


def test_clip_text_encoder(tiny: dict[str, str]) -> None:
    enc = create_encoder("clip_text", tiny["local_dir"], device="cpu", batch_size=2)
    assert isinstance(enc, OpenClipTextEncoder) and isinstance(enc, Encoder)
    assert enc.dim == 32 and enc.modality == "text"
    texts = ["a red square", "two cats on a sofa", "", "a red square", "x " * 100]
    vectors = enc.encode(texts)
    assert vectors.dtype == np.float32 and vectors.shape == (5, 32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vectors[0], vectors[3], atol=1e-6)
    np.testing.assert_allclose(enc.encode(texts[::-1]), vectors[::-1], atol=1e-5)
    # Same as open_clip's own encode_text on the same tokens.
    with torch.inference_mode():
        direct = enc.model.encode_text(enc.tokenizer(texts), normalize=True).numpy()
    np.testing.assert_allclose(vectors, direct, atol=1e-5)
    # Both load paths agree for text too.
    by_file = OpenClipTextEncoder(tiny["arch"], pretrained=tiny["checkpoint"], device="cpu")
    np.testing.assert_allclose(by_file.encode(texts), vectors, atol=1e-6)
    with pytest.raises(TypeError):
        enc.encode("not a list")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_matches_cpu(tiny: dict[str, str], enc_file: OpenClipImageEncoder) -> None:
    gpu = OpenClipImageEncoder(tiny["local_dir"], num_workers=2, device="cuda")
    assert gpu.clip.autocast_dtype in (torch.bfloat16, torch.float16)
    vectors = gpu.encode(ORIGINALS)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert np.sum(vectors * enc_file.encode(ORIGINALS), axis=1).min() > 0.99
    result = gpu.encode_images([ORIGINALS[0], CORRUPT, ORIGINALS[1]])
    assert result.ok_index.tolist() == [0, 2] and [i for i, _ in result.rejected] == [1]
