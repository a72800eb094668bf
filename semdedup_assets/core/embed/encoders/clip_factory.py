"""Building an open_clip model for inference: device, precision and eval transform (cf. open_clip's factory.py)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .base import resolve_device
from .clip_pretrained import check_checkpoint_weights_only, resolve_source, wants_random

if TYPE_CHECKING:  # torch/open_clip are imported on first use, not at package import
    import torch

__all__ = ["PRECISIONS", "LoadedClip", "autocast", "load_open_clip"]

PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")


@dataclass
class LoadedClip:
    """An open_clip model in eval mode plus everything needed to feed it."""

    model: Any  # open_clip CLIP / CustomTextCLIP
    preprocess: Callable[[Any], Any]  # PIL image -> (3, H, W) float tensor (the eval transform)
    model_name: str  # what open_clip.get_tokenizer() understands for this model
    name: str  # stable description for logs and provenance
    device: torch.device
    autocast_dtype: torch.dtype | None  # None means plain fp32


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

    model_name, oc_pretrained, to_vet, name = resolve_source(model, pretrained)
    dev = resolve_device(device)
    autocast_dtype = _autocast_dtype(dev, precision)
    if to_vet is not None:
        check_checkpoint_weights_only(to_vet)
    random_ok = wants_random(pretrained)
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


def autocast(clip: LoadedClip) -> contextlib.AbstractContextManager[Any]:
    """Autocast for the loaded model's device and dtype, or a no-op for fp32."""
    import torch

    if clip.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=clip.device.type, dtype=clip.autocast_dtype)
