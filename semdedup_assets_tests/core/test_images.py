"""Tests for image decoding, rejection reasons and DataLoader batching."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from semdedup_assets.core.embed.images import (
    ImageBytesDataset,
    ImageDecodeError,
    collate_decoded,
    decode_image,
    iter_image_batches,
)


def encoded(fmt: str, size: tuple[int, int] = (40, 30), mode: str = "RGB", seed: int = 0, **kw: object) -> bytes:
    """A noisy image (so that lossy codecs have real work) encoded as `fmt`."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    img = Image.fromarray(arr.squeeze(-1) if channels == 1 else arr, mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


PREPROCESS = transforms.Compose([transforms.Resize((16, 16)), transforms.ToTensor()])


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_decodes_common_formats_to_rgb(fmt: str) -> None:
    img = decode_image(encoded(fmt, (40, 30)))
    assert img.mode == "RGB" and img.size == (40, 30)


@pytest.mark.parametrize("mode", ["RGBA", "L"])
def test_other_modes_are_converted_to_rgb(mode: str) -> None:
    assert decode_image(encoded("PNG", mode=mode)).mode == "RGB"


def test_png_pixels_survive_decoding_exactly() -> None:
    data = encoded("PNG", (12, 9), seed=3)
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert np.array_equal(np.asarray(decode_image(data)), expected)


def test_exif_orientation_is_applied() -> None:
    img = Image.new("RGB", (40, 20), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes())
    assert decode_image(buf.getvalue()).size == (20, 40)


JPEG = encoded("JPEG", (64, 48), quality=90)
BAD_ITEMS: dict[str, tuple[bytes | None, str]] = {
    "corrupt": (b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20, "corrupt"),
    "not an image": (b"hello, world" * 10, "not a recognised image format"),
    "truncated jpeg": (JPEG[: len(JPEG) // 2], "truncated"),
    "empty": (b"", "empty"),
    "none": (None, "missing"),
}


@pytest.mark.parametrize("case", sorted(BAD_ITEMS))
def test_bad_items_raise_with_a_reason(case: str) -> None:
    data, word = BAD_ITEMS[case]
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data)
    assert word in info.value.reason
    assert info.value.index is None


def test_decompression_bomb_and_extreme_aspect_ratio_are_rejected() -> None:
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(encoded("PNG", (100, 100)), max_pixels=5_000)
    assert decode_image(encoded("PNG", (100, 100)), max_pixels=10_000).size == (100, 100)
    with pytest.raises(ImageDecodeError, match="aspect ratio"):
        decode_image(encoded("PNG", (1, 300)))
    assert decode_image(encoded("PNG", (1, 300)), max_aspect_ratio=None).size == (1, 300)


def test_pillow_bomb_error_is_mapped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow raises above 2x this
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(encoded("PNG", (100, 100)), max_pixels=None)


def test_unexpected_decoder_exceptions_become_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    def leaky_open(*_: object, **__: object) -> Image.Image:
        raise IndexError("list index out of range")  # what some fuzzed files trigger in plugins

    monkeypatch.setattr(Image, "open", leaky_open)
    with pytest.raises(ImageDecodeError, match=r"corrupt image .IndexError"):
        decode_image(b"\xff\xd8 whatever")


def test_error_message_names_the_index() -> None:
    err = ImageDecodeError("empty image data", index=7)
    assert str(err) == "image 7: empty image data" and err.index == 7
    assert isinstance(err, ValueError)


def test_dataset_items_and_collate() -> None:
    items = [encoded("PNG", seed=1), None, encoded("JPEG", seed=2), b"junk"]
    ds = ImageBytesDataset(items, PREPROCESS)
    assert isinstance(ds, torch.utils.data.Dataset) and len(ds) == 4
    idx, tensor, reason = ds[0]
    assert idx == 0 and tensor is not None and tensor.shape == (3, 16, 16) and reason is None
    idx, tensor, reason = ds[1]
    assert idx == 1 and tensor is None and "missing" in str(reason)

    indices, batch, rejected = collate_decoded([ds[i] for i in range(4)])
    assert indices.dtype == np.int64 and indices.tolist() == [0, 2]
    assert batch.shape == (2, 3, 16, 16)
    assert [i for i, _ in rejected] == [1, 3]

    indices, batch, rejected = collate_decoded([ds[1], ds[3]])
    assert len(indices) == 0 and batch.numel() == 0 and len(rejected) == 2


def test_preprocess_failure_becomes_a_rejection() -> None:
    def broken(_: Image.Image) -> torch.Tensor:
        raise ValueError("cannot resize")

    _, tensor, reason = ImageBytesDataset([encoded("PNG")], broken)[0]
    assert tensor is None and "preprocessing failed" in str(reason) and "cannot resize" in str(reason)


def mixed_items() -> list[bytes | None]:
    """Thirteen items: good images in three formats with bad ones scattered between them."""
    items: list[bytes | None] = []
    for i in range(13):
        if i in (2, 7):
            items.append(BAD_ITEMS["truncated jpeg"][0] if i == 2 else None)
        elif i == 11:
            items.append(b"")
        else:
            items.append(encoded(["PNG", "JPEG", "WEBP"][i % 3], (20 + i, 30), seed=i))
    return items


def collect(
    items: list[bytes | None], workers: int, batch_size: int = 4
) -> tuple[np.ndarray, torch.Tensor, list[tuple[int, str]], list[int]]:
    """Run iter_image_batches and gather indices, tensors, rejections and batch lengths."""
    idx, tensors, rejected, sizes = [], [], [], []
    for indices, batch, bad in iter_image_batches(items, PREPROCESS, batch_size, workers):
        idx.append(indices)
        if len(indices):
            tensors.append(batch)
        rejected.extend(bad)
        sizes.append(len(indices) + len(bad))
    return np.concatenate(idx), torch.cat(tensors), rejected, sizes


def test_batches_are_identical_with_and_without_workers() -> None:
    items = mixed_items()
    idx0, t0, rej0, sizes0 = collect(items, workers=0)
    idx2, t2, rej2, sizes2 = collect(items, workers=2)
    assert idx0.tolist() == [i for i in range(13) if i not in (2, 7, 11)]
    assert sizes0 == [4, 4, 4, 1]  # fixed-size batches in input order
    assert np.array_equal(idx0, idx2) and sizes0 == sizes2
    assert torch.equal(t0, t2)
    assert rej0 == rej2
    assert [i for i, _ in rej0] == [2, 7, 11]
    # Each tensor is the preprocessing of the item at that index.
    for row, i in enumerate(idx0.tolist()):
        assert torch.equal(t0[row], PREPROCESS(decode_image(items[i])))


def test_iter_image_batches_edge_cases() -> None:
    assert list(iter_image_batches([], PREPROCESS, 4, 2)) == []
    with pytest.raises(ValueError, match="batch_size"):
        list(iter_image_batches([b""], PREPROCESS, 0, 0))
    with pytest.raises(ValueError, match="num_workers"):
        list(iter_image_batches([b""], PREPROCESS, 1, -1))
