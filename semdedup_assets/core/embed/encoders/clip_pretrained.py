"""Where open_clip weights come from, and whether they are safe to load (cf. open_clip's pretrained.py).

`resolve_source` turns a (model, pretrained) pair into what open_clip's factory takes:
an architecture with a tag or a local checkpoint file, a `local-dir:` folder, or an
`hf-hub:` repo. Every local file is vetted with torch.load(weights_only=True) before
open_clip sees it.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

__all__ = [
    "DEFAULT_IMAGE_MODEL",
    "HF_HUB_PREFIX",
    "LOCAL_DIR_PREFIX",
    "OPEN_CLIP_CONFIG",
    "RANDOM_WEIGHTS",
    "UnsafeCheckpointError",
    "check_checkpoint_weights_only",
    "resolve_source",
    "wants_random",
]

DEFAULT_IMAGE_MODEL = "ViT-B-32"
# Spelled out on purpose: random weights only make sense for speed tests.
RANDOM_WEIGHTS = "random"
LOCAL_DIR_PREFIX = "local-dir:"
HF_HUB_PREFIX = "hf-hub:"
OPEN_CLIP_CONFIG = "open_clip_config.json"
# Formats whose loaders cannot execute code (safetensors; numpy with allow_pickle=False).
_NON_PICKLE_SUFFIXES = frozenset({".safetensors", ".npz", ".npy"})


class UnsafeCheckpointError(ValueError):
    """A checkpoint that holds pickled objects other than tensors, refused under weights_only=True."""


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


def wants_random(pretrained: str | None) -> bool:
    """True if the caller explicitly asked for random weights."""
    return pretrained is not None and pretrained.strip().lower() == RANDOM_WEIGHTS


def resolve_source(
    model: str | os.PathLike[str] | None, pretrained: str | None
) -> tuple[str, str | None, Path | None, str]:
    """Validate (model, pretrained); return open_clip's (model_name, pretrained), the file to vet, and a name."""
    import open_clip

    random_ok = wants_random(pretrained)
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
                f"pretrained={pretrained!r} cannot be combined with {raw!r}: a local-dir folder brings its own weights"
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
            raise ValueError(
                f"pretrained={pretrained!r} cannot be combined with {raw!r}: the hub repo brings its own weights"
            )
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
