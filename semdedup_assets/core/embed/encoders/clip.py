"""open_clip encoders: the image tower for the "image" modality and the text tower as "clip_text".

Where the weights come from is clip_pretrained.py; building the model is clip_factory.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .base import l2_normalize, map_batches
from .clip_factory import PRECISIONS, LoadedClip, autocast, load_open_clip
from .clip_pretrained import (
    DEFAULT_IMAGE_MODEL,
    RANDOM_WEIGHTS,
    UnsafeCheckpointError,
    check_checkpoint_weights_only,
)
from .registry import register_encoder

if TYPE_CHECKING:  # torch/open_clip are imported on first use, not at package import
    import torch

__all__ = [
    "DEFAULT_IMAGE_MODEL",
    "PRECISIONS",
    "RANDOM_WEIGHTS",
    "ImageEncodeResult",
    "LoadedClip",
    "OpenClipImageEncoder",
    "OpenClipTextEncoder",
    "UnsafeCheckpointError",
    "check_checkpoint_weights_only",
    "load_open_clip",
]


@dataclass
class ImageEncodeResult:
    """Lenient image encoding: vectors for the decodable items and reasons for the rest."""

    vectors: np.ndarray  # (n_ok, dim) float32, unit rows, in input order
    ok_index: np.ndarray  # (n_ok,) int64 positions into the input items
    rejected: list[tuple[int, str]] = field(default_factory=list)  # (position, reason)


def _check_batch_size(batch_size: int) -> None:
    """Reject non-positive or non-int batch sizes early with a plain message."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def _normalized(vectors: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """L2-normalise rows, reporting a bad row by its position in the caller's input."""
    try:
        return l2_normalize(vectors)
    except ValueError:
        bad = ~np.isfinite(vectors).all(axis=1) | ~np.any(vectors != 0, axis=1)
        where = int(positions[int(np.flatnonzero(bad)[0])]) if bad.any() else -1
        raise ValueError(f"item {where} produced a non-finite or zero embedding; cannot L2-normalise") from None


@register_encoder("image")
class OpenClipImageEncoder:
    """Embeds encoded images (bytes) with an open_clip image tower; unit float32 rows in input order."""

    modality: str = "image"
    name: str
    dim: int

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        *,
        pretrained: str | None = None,
        batch_size: int = 256,
        num_workers: int = 2,
        device: str = "auto",
        precision: str = "auto",
    ) -> None:
        """Load the model; `model` is an arch name (+ `pretrained` tag or file), local-dir:PATH or hf-hub:ID."""
        _check_batch_size(batch_size)
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be a non-negative int, got {num_workers!r}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.clip = load_open_clip(model, pretrained=pretrained, device=device, precision=precision)
        self.model = self.clip.model
        self.preprocess = self.clip.preprocess
        self.device = self.clip.device
        self.name = self.clip.name
        self.dim = self._output_dim()

    def __repr__(self) -> str:
        """Short description for logs."""
        return (
            f"OpenClipImageEncoder(name={self.name!r}, dim={self.dim}, batch_size={self.batch_size}, "
            f"num_workers={self.num_workers}, device='{self.device}', autocast={self.clip.autocast_dtype})"
        )

    def _output_dim(self) -> int:
        """Embedding width, from the vision tower or, failing that, one probe forward pass."""
        out = getattr(self.model.visual, "output_dim", None)
        if isinstance(out, int) and out > 0:
            return out
        import torch

        size = getattr(self.model.visual, "image_size", 224)
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        with torch.inference_mode():
            return int(self._forward(torch.zeros(1, 3, h, w)).shape[1])

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """One batch of preprocessed pixels -> raw (unnormalised) float32 CPU features."""
        import torch

        pixels = pixels.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        with autocast(self.clip):
            feats = self.model.encode_image(pixels)
        return feats.float().cpu()

    def encode_preprocessed(self, pixels: torch.Tensor) -> np.ndarray:
        """Embed an already-preprocessed (n, 3, H, W) tensor, in chunks of batch_size."""
        import torch

        n = int(pixels.shape[0])
        if n == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        chunks = (pixels[start : start + self.batch_size] for start in range(0, n, self.batch_size))
        parts = list(map_batches(self._forward, chunks, self.device))  # single-threaded per batch on CPU
        return _normalized(torch.cat(parts).numpy(), np.arange(n, dtype=np.int64))

    def _iter_encoded(
        self, items: Sequence[bytes | None]
    ) -> Iterator[tuple[np.ndarray, torch.Tensor, list[tuple[int, str]]]]:
        """Yield (ok positions, raw features, rejected) per batch, in input order."""
        import torch

        from semdedup_assets.core.embed.images import iter_image_batches

        if isinstance(items, (bytes, bytearray, memoryview, str)):
            # A single bytes object is a Sequence too; iterating it would yield ints.
            raise TypeError("expected a sequence of encoded images (bytes), not a single bytes/str object")
        batches = iter_image_batches(
            items,
            self.preprocess,
            self.batch_size,
            self.num_workers,
            pin_memory=self.device.type == "cuda",
        )

        def forward(
            batch: tuple[np.ndarray, torch.Tensor, list[tuple[int, str]]],
        ) -> tuple[np.ndarray, torch.Tensor, list[tuple[int, str]]]:
            indices, pixels, rejected = batch
            feats = self._forward(pixels) if len(indices) else torch.zeros(0, self.dim)
            return indices, feats, rejected

        # Single-threaded per batch on the CPU, in order (map_batches); inference mode is scoped to
        # each call, so it does not leak into the caller between yields.
        yield from map_batches(forward, batches, self.device)

    def encode_images(self, items: Sequence[bytes | None]) -> ImageEncodeResult:
        """Embed what decodes; undecodable items go to `rejected` with a reason (lenient)."""
        import torch

        positions: list[np.ndarray] = []
        parts: list[torch.Tensor] = []
        rejected: list[tuple[int, str]] = []
        for indices, feats, bad in self._iter_encoded(items):
            positions.append(indices)
            parts.append(feats)
            rejected.extend(bad)
        if not positions or sum(len(p) for p in positions) == 0:
            return ImageEncodeResult(np.zeros((0, self.dim), np.float32), np.zeros(0, np.int64), rejected)
        ok_index = np.concatenate(positions).astype(np.int64, copy=False)
        vectors = _normalized(torch.cat(parts).numpy(), ok_index)
        return ImageEncodeResult(vectors, ok_index, rejected)

    def encode(self, items: Sequence[bytes | None]) -> np.ndarray:
        """Embed every item (strict): raise ImageDecodeError naming the first undecodable one."""
        import torch

        from semdedup_assets.core.embed.images import ImageDecodeError

        parts: list[torch.Tensor] = []
        for _, feats, bad in self._iter_encoded(items):
            if bad:
                # Batches arrive in order, so the first rejection seen is the lowest index.
                index, reason = bad[0]
                raise ImageDecodeError(reason, index=index)
            parts.append(feats)
        if not parts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = torch.cat(parts).numpy()
        return _normalized(vectors, np.arange(len(vectors), dtype=np.int64))


@register_encoder("clip_text")
class OpenClipTextEncoder:
    """Embeds strings with an open_clip text tower (e.g. captions); unit float32 rows in input order."""

    modality: str = "text"
    name: str
    dim: int

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        *,
        pretrained: str | None = None,
        batch_size: int = 256,
        device: str = "auto",
        precision: str = "auto",
    ) -> None:
        """Load the model and its tokenizer; same `model`/`pretrained` forms as OpenClipImageEncoder."""
        import open_clip

        _check_batch_size(batch_size)
        self.batch_size = batch_size
        self.clip = load_open_clip(model, pretrained=pretrained, device=device, precision=precision)
        self.model = self.clip.model
        self.device = self.clip.device
        self.name = self.clip.name
        self.tokenizer = open_clip.get_tokenizer(self.clip.model_name)
        self.dim = self._output_dim()

    def __repr__(self) -> str:
        """Short description for logs."""
        return (
            f"OpenClipTextEncoder(name={self.name!r}, dim={self.dim}, batch_size={self.batch_size}, "
            f"device='{self.device}', autocast={self.clip.autocast_dtype})"
        )

    def _output_dim(self) -> int:
        """Embedding width, from the text projection or, failing that, one probe forward pass."""
        import torch

        proj = getattr(self.model, "text_projection", None)
        if isinstance(proj, torch.nn.Linear):
            return int(proj.out_features)
        if isinstance(proj, torch.Tensor) and proj.ndim == 2:
            return int(proj.shape[1])
        out = getattr(getattr(self.model, "text", None), "output_dim", None)
        if isinstance(out, int) and out > 0:
            return out
        with torch.inference_mode():
            return int(self._forward([""]).shape[1])

    def _forward(self, texts: list[str]) -> torch.Tensor:
        """One batch of strings -> raw (unnormalised) float32 CPU features."""
        tokens = self.tokenizer(texts).to(self.device, non_blocking=True)
        with autocast(self.clip):
            feats = self.model.encode_text(tokens)
        return feats.float().cpu()

    def encode(self, items: Sequence[str]) -> np.ndarray:
        """Embed `items` into an (n, dim) float32 array of unit rows, in input order."""
        import torch

        from .text import as_texts

        texts = as_texts(items)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        chunks = (texts[start : start + self.batch_size] for start in range(0, len(texts), self.batch_size))
        parts = list(map_batches(self._forward, chunks, self.device))  # single-threaded per batch on CPU
        return _normalized(torch.cat(parts).numpy(), np.arange(len(texts), dtype=np.int64))
