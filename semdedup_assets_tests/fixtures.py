"""Test fixtures shared by the tests and the benchmarks' smoke runs (not part of the package)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from semdedup_assets.core.encoders.clip_pretrained import LOCAL_DIR_PREFIX, OPEN_CLIP_CONFIG

TINY_ARCH = "tiny-test-vit"
# A few-hundred-kB ViT for offline tests and smoke runs; the vocabulary size must match
# open_clip's bundled BPE tokenizer, which dominates the parameter count.
_TINY_CFG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


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
