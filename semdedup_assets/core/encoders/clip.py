"""open_clip encoders: the image tower for the "image" modality and the text tower as "clip_text"."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .base import l2_normalize, resolve_device
from .registry import register_encoder

if TYPE_CHECKING:  # torch/open_clip are imported on first use, not at package import
    import torch

__all__ = [
    "DEFAULT_IMAGE_MODEL",
    "PRECISIONS",
    "RANDOM_WEIGHTS",
    "TINY_ARCH",
    "ImageEncodeResult",
    "LoadedClip",
    "OpenClipImageEncoder",
    "OpenClipTextEncoder",
    "UnsafeCheckpointError",
    "check_checkpoint_weights_only",
    "load_open_clip",
    "save_tiny_clip",
]

DEFAULT_IMAGE_MODEL = "ViT-B-32"
# Spelled out on purpose: random weights only make sense for speed tests.
RANDOM_WEIGHTS = "random"
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")
LOCAL_DIR_PREFIX = "local-dir:"
HF_HUB_PREFIX = "hf-hub:"
OPEN_CLIP_CONFIG = "open_clip_config.json"
# Formats whose loaders cannot execute code (safetensors; numpy with allow_pickle=False).
_NON_PICKLE_SUFFIXES = frozenset({".safetensors", ".npz", ".npy"})

TINY_ARCH = "tiny-test-vit"
# A few-hundred-kB ViT for offline tests and smoke runs; the vocabulary size must match
# open_clip's bundled BPE tokenizer, which dominates the parameter count.
_TINY_CFG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


class UnsafeCheckpointError(ValueError):
    """A checkpoint that holds pickled objects other than tensors, refused under weights_only=True."""


@dataclass
class ImageEncodeResult:
    """Lenient image encoding: vectors for the decodable items and reasons for the rest."""

    vectors: np.ndarray  # (n_ok, dim) float32, unit rows, in input order
    ok_index: np.ndarray  # (n_ok,) int64 positions into the input items
    rejected: list[tuple[int, str]] = field(default_factory=list)  # (position, reason)


@dataclass
class LoadedClip:
    """An open_clip model in eval mode plus everything needed to feed it."""

    model: Any  # open_clip CLIP / CustomTextCLIP
    preprocess: Callable[[Any], Any]  # PIL image -> (3, H, W) float tensor (the eval transform)
    model_name: str  # what open_clip.get_tokenizer() understands for this model
    name: str  # stable description for logs and provenance
    device: torch.device
    autocast_dtype: torch.dtype | None  # None means plain fp32


def check_checkpoint_weights_only(path: str | os.PathLike[str]) -> None:
    """Raise UnsafeCheckpointError unless `path` unpickles with torch.load(weights_only=True)."""
    import torch

    p = Path(path)
    if p.suffix.lower() in _NON_PICKLE_SUFFIXES:
        return
    # open_clip itself loads with weights_only=True, but falls back to a bare torch.load on
    # TypeError (old torch versions default that to full unpickling). Checking here first
    # means an arbitrary pickled object can never reach a permissive load.
    try:
        try:
            # mmap parses the pickle without reading tensor data (zip-format checkpoints).
            torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc).lower():
                raise
            torch.load(p, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"refusing to load checkpoint {str(p)!r}: torch.load(weights_only=True) rejects it, "
            "so it is either not a torch checkpoint or it holds pickled Python objects other than "
            "tensors and plain containers (loading those could run arbitrary code). Re-save it as "
            "a plain state_dict (torch.save(model.state_dict(), ...)) or as .safetensors. "
            f"Details: {_unpickler_detail(exc)}"
        ) from None


def _unpickler_detail(exc: BaseException) -> str:
    """The informative line of torch's (long, multi-paragraph) weights_only error."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        rest = text.split(marker, 1)[1].strip()
        return marker + " " + (rest.split("\n\n", 1)[0].strip() or rest[:200])
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _local_dir_checkpoint(folder: Path) -> Path | None:
    """The weights file open_clip would pick in a `local-dir:` folder, or None."""
    from open_clip import factory

    finder = getattr(factory, "_find_checkpoint_in_dir", None)
    if finder is not None:
        found = finder(folder)
        return Path(found) if found else None
    # Same candidate set as open_clip 3.x, should the private helper move.
    candidates = sorted([*folder.glob("*.safetensors"), *folder.glob("*.bin"), *folder.glob("*.pth")])
    return candidates[0] if candidates else None


def _wants_random(pretrained: str | None) -> bool:
    """True if the caller explicitly asked for random weights."""
    return pretrained is not None and pretrained.strip().lower() == RANDOM_WEIGHTS


def _resolve_source(
    model: str | os.PathLike[str] | None, pretrained: str | None
) -> tuple[str, str | None, Path | None, str]:
    """Validate (model, pretrained); return open_clip's (model_name, pretrained), the file to vet, and a name."""
    import open_clip

    random_ok = _wants_random(pretrained)
    raw = DEFAULT_IMAGE_MODEL if model is None else os.fspath(model).strip()
    if not raw:
        raise ValueError("model must be a non-empty string")
    expanded = os.path.expanduser(raw)
    # A bare folder in open_clip's own format is accepted as if prefixed with local-dir:.
    if not raw.startswith((LOCAL_DIR_PREFIX, HF_HUB_PREFIX)) and os.path.isfile(
        os.path.join(expanded, OPEN_CLIP_CONFIG)
    ):
        raw = LOCAL_DIR_PREFIX + expanded

    if raw.startswith(LOCAL_DIR_PREFIX):
        folder = Path(os.path.expanduser(raw[len(LOCAL_DIR_PREFIX) :])).resolve()
        if pretrained is not None and not random_ok:
            raise ValueError(
                f"pretrained={pretrained!r} cannot be combined with {raw!r}: a local-dir folder "
                "brings its own weights"
            )
        if not (folder / OPEN_CLIP_CONFIG).is_file():
            raise FileNotFoundError(
                f"{raw!r}: expected a folder with {OPEN_CLIP_CONFIG} and a weights file "
                f"(open_clip's format), but {folder / OPEN_CLIP_CONFIG} does not exist"
            )
        checkpoint = _local_dir_checkpoint(folder)
        if checkpoint is None and not random_ok:
            raise FileNotFoundError(
                f"{raw!r} has {OPEN_CLIP_CONFIG} but no weights file "
                "(open_clip_model.safetensors / open_clip_pytorch_model.bin / *.pth)"
            )
        return LOCAL_DIR_PREFIX + str(folder), None, checkpoint, LOCAL_DIR_PREFIX + str(folder)

    if raw.startswith(HF_HUB_PREFIX):
        if pretrained is not None:
            raise ValueError(f"pretrained={pretrained!r} cannot be combined with {raw!r}: the hub repo brings its own weights")
        return raw, None, None, raw

    arch = raw
    if arch not in open_clip.list_models():
        raise ValueError(
            f"unknown open_clip architecture {arch!r}; use one of open_clip.list_models() "
            f"(e.g. {DEFAULT_IMAGE_MODEL}), 'local-dir:/path/to/folder' or 'hf-hub:org/repo'"
        )
    if pretrained is None:
        raise ValueError(
            f"no weights given for open_clip model {arch!r}: without them it would embed with "
            "random weights. Pass pretrained=<open_clip tag, e.g. 'laion2b_s34b_b79k' "
            "(downloads)> or pretrained=<path to a local .pt/.bin/.safetensors checkpoint>, or "
            "use model='local-dir:/path/to/folder' (open_clip_config.json + weights). "
            f"pretrained={RANDOM_WEIGHTS!r} builds random weights on purpose (speed tests only)."
        )
    if random_ok:
        return arch, None, None, f"{arch}@{RANDOM_WEIGHTS}"
    path = os.path.expanduser(pretrained)
    if os.path.isfile(path):
        path = os.path.abspath(path)
        return arch, path, Path(path), f"{arch}@{path}"
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if pretrained not in tags:
        raise ValueError(
            f"pretrained={pretrained!r} is neither an existing checkpoint file nor an open_clip "
            f"tag for {arch!r} (tags: {', '.join(tags) or 'none'})"
        )
    return arch, pretrained, None, f"{arch}@{pretrained}"


def _autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device` (None: plain fp32)."""
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if device.type == "cuda":
        if precision == "fp16":
            return torch.float16
        if precision == "bf16" or torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16  # "auto" on pre-Ampere GPUs
    if precision == "fp16":
        raise ValueError(f"precision 'fp16' needs a CUDA device (got {device}); use 'fp32' or 'bf16'")
    # CPU: "auto" stays fp32 (exact and usually as fast); "bf16" asked for explicitly is honoured.
    return torch.bfloat16 if precision == "bf16" else None


def load_open_clip(
    model: str | os.PathLike[str] | None = None,
    *,
    pretrained: str | None = None,
    device: str = "auto",
    precision: str = "auto",
) -> LoadedClip:
    """Load an open_clip model (weights_only), its eval transform and autocast settings."""
    import open_clip
    import torch

    model_name, oc_pretrained, to_vet, name = _resolve_source(model, pretrained)
    dev = resolve_device(device)
    autocast_dtype = _autocast_dtype(dev, precision)
    if to_vet is not None:
        check_checkpoint_weights_only(to_vet)
    random_ok = _wants_random(pretrained)
    net, _, preprocess = open_clip.create_model_and_transforms(
        model_name,
        pretrained=oc_pretrained,
        precision="fp32",  # fp32 weights; speed on CUDA comes from autocast
        device=dev,
        weights_only=True,
        # hf-hub/local-dir fall back to random weights with only a log line; never silently.
        require_pretrained=not random_ok,
    )
    net.eval()
    if dev.type == "cuda":
        # NHWC speeds up the patch-embedding convolution under autocast on tensor cores.
        net = net.to(memory_format=torch.channels_last)
    return LoadedClip(net, preprocess, model_name, name, dev, autocast_dtype)


def _autocast(clip: LoadedClip) -> contextlib.AbstractContextManager[Any]:
    """Autocast for the loaded model's device and dtype, or a no-op for fp32."""
    import torch

    if clip.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=clip.device.type, dtype=clip.autocast_dtype)


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
        raise ValueError(
            f"item {where} produced a non-finite or zero embedding; cannot L2-normalise"
        ) from None


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
        with _autocast(self.clip):
            feats = self.model.encode_image(pixels)
        return feats.float().cpu()

    def encode_preprocessed(self, pixels: torch.Tensor) -> np.ndarray:
        """Embed an already-preprocessed (n, 3, H, W) tensor, in chunks of batch_size."""
        import torch

        n = int(pixels.shape[0])
        if n == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        parts: list[torch.Tensor] = []
        with torch.inference_mode():
            for start in range(0, n, self.batch_size):
                parts.append(self._forward(pixels[start : start + self.batch_size]))
        return _normalized(torch.cat(parts).numpy(), np.arange(n, dtype=np.int64))

    def _iter_encoded(
        self, items: Sequence[bytes | None]
    ) -> Iterator[tuple[np.ndarray, torch.Tensor, list[tuple[int, str]]]]:
        """Yield (ok positions, raw features, rejected) per batch, in input order."""
        import torch

        from semdedup_assets.core.images import iter_image_batches

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
        for indices, pixels, rejected in batches:
            if len(indices):
                # Scoped per batch: the mode must not leak into the caller between yields.
                with torch.inference_mode():
                    feats = self._forward(pixels)
            else:
                feats = torch.zeros(0, self.dim)
            yield indices, feats, rejected

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

        from semdedup_assets.core.images import ImageDecodeError

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
        with _autocast(self.clip):
            feats = self.model.encode_text(tokens)
        return feats.float().cpu()

    def encode(self, items: Sequence[str]) -> np.ndarray:
        """Embed `items` into an (n, dim) float32 array of unit rows, in input order."""
        import torch

        from .text import _as_texts

        texts = _as_texts(items)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        parts: list[torch.Tensor] = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                parts.append(self._forward(texts[start : start + self.batch_size]))
        return _normalized(torch.cat(parts).numpy(), np.arange(len(texts), dtype=np.int64))


def save_tiny_clip(folder: str | os.PathLike[str], seed: int = 0) -> dict[str, str]:
    """Build a tiny random open_clip model offline and save it as a checkpoint and a local-dir folder."""
    import open_clip
    import torch

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    # Registering the arch lets `OpenClipImageEncoder(TINY_ARCH, pretrained=<file>)` find it.
    config_path = root / f"{TINY_ARCH}.json"
    config_path.write_text(json.dumps(_TINY_CFG, indent=2))
    open_clip.add_model_config(config_path)

    # A private RNG stream: same weights for the same seed, caller's RNG state untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = open_clip.create_model(TINY_ARCH, pretrained=None, device="cpu")
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}

    checkpoint = root / "tiny.pt"
    torch.save(state, checkpoint)

    local = root / "local"
    local.mkdir(exist_ok=True)
    preprocess_cfg = dict(net.visual.preprocess_cfg)
    (local / OPEN_CLIP_CONFIG).write_text(
        json.dumps({"model_cfg": _TINY_CFG, "preprocess_cfg": preprocess_cfg}, indent=2)
    )
    try:
        from safetensors.torch import save_file
    except ImportError:  # safetensors is optional for open_clip; its .bin name works too
        torch.save(state, local / "open_clip_pytorch_model.bin")
    else:
        save_file(state, str(local / "open_clip_model.safetensors"))
    return {
        "arch": TINY_ARCH,
        "config": str(config_path),
        "checkpoint": str(checkpoint),
        "local_dir": LOCAL_DIR_PREFIX + str(local),
    }
