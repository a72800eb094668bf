"""Image decoding with clear rejection reasons, and deterministic batched preprocessing via DataLoader."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "DEFAULT_MAX_ASPECT_RATIO",
    "DEFAULT_MAX_PIXELS",
    "DecodedItem",
    "ImageBytesDataset",
    "ImageDecodeError",
    "collate_decoded",
    "decode_image",
    "iter_image_batches",
]

# Pillow's own default bomb threshold (about 89.5 megapixels, ~256 MiB as 24-bit RGB).
DEFAULT_MAX_PIXELS = 89_478_485
# A 1 x 100000 strip passes the pixel limit but a shortest-side resize to 224 would
# blow it up to billions of pixels; real photos and banners stay far below this.
DEFAULT_MAX_ASPECT_RATIO = 100.0
# Batches each worker keeps ready; 2 hides decode jitter without holding much memory.
_PREFETCH_FACTOR = 2

# (position in the input, preprocessed tensor or None, rejection reason or None)
DecodedItem = tuple[int, torch.Tensor | None, str | None]


class ImageDecodeError(ValueError):
    """An image that cannot be decoded; `reason` says why (and `index` where, if known)."""

    def __init__(self, reason: str, index: int | None = None) -> None:
        """Store the reason (and optional item index) and build the message from them."""
        self.reason = reason
        self.index = index
        super().__init__(reason if index is None else f"image {index}: {reason}")


def _apply_exif_orientation(img: Image.Image) -> Image.Image:
    """Rotate/flip as the EXIF orientation tag says; camera JPEGs are stored sideways."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:
        return img  # malformed EXIF: the pixels themselves are fine, keep them as stored


def decode_image(
    data: bytes | None,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO,
) -> Image.Image:
    """Decode encoded image bytes to an RGB PIL image, raising ImageDecodeError with a reason."""
    if data is None:
        raise ImageDecodeError("no image data (missing image)")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageDecodeError(f"expected encoded image bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageDecodeError("empty image data (0 bytes)")
    try:
        with warnings.catch_warnings():
            # We apply our own pixel limit below; Pillow's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        width, height = img.size
        if width <= 0 or height <= 0:
            raise ImageDecodeError(f"image has no pixels ({width}x{height})")
        # Checked on the header, before .load() allocates the full bitmap.
        if max_pixels is not None and width * height > max_pixels:
            raise ImageDecodeError(
                f"decompression bomb guard: {width}x{height} = {width * height} pixels "
                f"exceeds the limit of {max_pixels}"
            )
        if max_aspect_ratio is not None and max(width, height) > max_aspect_ratio * min(width, height):
            raise ImageDecodeError(
                f"extreme aspect ratio {width}x{height} (limit {max_aspect_ratio:g}:1); "
                "resizing it would need far too much memory"
            )
        img.load()  # decode now: Image.open is lazy and only parses the header
        img = _apply_exif_orientation(img)
        return img if img.mode == "RGB" else img.convert("RGB")
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"decompression bomb guard: {exc}") from exc
    except UnidentifiedImageError:
        raise ImageDecodeError(
            f"not a recognised image format ({len(data)} bytes, starts with {bytes(data[:8])!r})"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Pillow reports truncated/corrupt streams as OSError, SyntaxError or ValueError.
        raise ImageDecodeError(f"corrupt or truncated image: {exc}") from exc
    except Exception as exc:
        # Fuzzed files still make some Pillow plugins leak struct.error, IndexError and the
        # like; one hostile file must not abort a whole shard.
        raise ImageDecodeError(f"corrupt image ({type(exc).__name__}: {exc})") from exc


class ImageBytesDataset(Dataset[DecodedItem]):
    """A map-style torch Dataset: item i is (i, preprocess(decode(images[i])) or None, reason or None)."""

    def __init__(
        self,
        images: Sequence[bytes | None],
        preprocess: Callable[[Image.Image], Any],
        *,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO,
    ) -> None:
        """Wrap the encoded images and the preprocessing callable (run inside the worker)."""
        self.images = images
        self.preprocess = preprocess
        self.max_pixels = max_pixels
        self.max_aspect_ratio = max_aspect_ratio

    def __len__(self) -> int:
        """Number of items."""
        return len(self.images)

    def __getitem__(self, index: int) -> DecodedItem:
        """Decode and preprocess item `index`; failures become a reason, never an exception."""
        try:
            img = decode_image(self.images[index], max_pixels=self.max_pixels, max_aspect_ratio=self.max_aspect_ratio)
        except ImageDecodeError as exc:
            return index, None, exc.reason
        try:
            tensor = self.preprocess(img)
        except (OSError, ValueError, RuntimeError) as exc:
            # e.g. a lazily-decoded tail that turns out truncated inside a transform.
            return index, None, f"preprocessing failed: {type(exc).__name__}: {exc}"
        return index, tensor, None


def collate_decoded(
    batch: Sequence[DecodedItem],
) -> tuple[np.ndarray, torch.Tensor, list[tuple[int, str]]]:
    """Stack the good tensors; return (their indices as int64, the stack, [(index, reason)] rejected)."""
    good = [(i, t) for i, t, _ in batch if t is not None]
    rejected = [(int(i), str(reason)) for i, t, reason in batch if t is None]
    indices = np.fromiter((i for i, _ in good), dtype=np.int64, count=len(good))
    # An all-rejected batch yields an empty tensor; callers test len(indices).
    stacked = torch.stack([t for _, t in good]) if good else torch.empty(0)
    return indices, stacked, rejected


def iter_image_batches(
    images: Sequence[bytes | None],
    preprocess: Callable[[Image.Image], Any],
    batch_size: int,
    num_workers: int,
    *,
    pin_memory: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO,
) -> Iterator[tuple[np.ndarray, torch.Tensor, list[tuple[int, str]]]]:
    """Yield (indices, preprocessed batch, rejected) over `images` in input order, decoding in workers."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be a non-negative int, got {num_workers!r}")
    if len(images) == 0:
        return
    dataset = ImageBytesDataset(images, preprocess, max_pixels=max_pixels, max_aspect_ratio=max_aspect_ratio)
    # No point starting more workers than there are batches.
    workers = min(num_workers, -(-len(images) // batch_size))
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,  # sequential sampler: batches come back in input order, even with workers
        num_workers=workers,
        collate_fn=collate_decoded,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=_PREFETCH_FACTOR if workers > 0 else None,
    )
    yield from loader
