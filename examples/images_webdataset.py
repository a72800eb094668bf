"""Deduplicate images in WebDataset `.tar` shards (`<key>.jpg` + `<key>.txt` caption), as LAION ships them.

    python examples/images_webdataset.py [--workdir DIR] [--model ARCH --pretrained FILE]

Writes two small WebDataset shards of generated pictures, some of them re-encoded or resized copies
of others, runs the whole graph with an open_clip image encoder and prints what was removed. There
is no default image model: pass a real checkpoint (`--model ViT-B-32 --pretrained
/models/open_clip_vit_b32.bin`, or `--model local-dir:/path`). Without one the example uses
ViT-B-32 with random weights (`--pretrained random`), which shows the plumbing and finds only
near-exact copies: random weights say nothing about semantic similarity.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from helpers import example_parser, semdedup, workdir
from PIL import Image


def picture(seed: int) -> Image.Image:
    """A 64 x 64 picture of a few coloured rectangles, different for every seed."""
    rng = np.random.default_rng(seed)
    pixels = np.full((64, 64, 3), rng.integers(0, 256, 3), dtype=np.uint8)
    for _ in range(4):
        x, y = rng.integers(0, 48, 2)
        w, h = rng.integers(8, 24, 2)
        pixels[y : y + h, x : x + w] = rng.integers(0, 256, 3)
    return Image.fromarray(pixels)


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, n: int = 12) -> None:
    """Two shards of n pictures each half; the second shard also holds copies of three from the first."""
    folder.mkdir(parents=True, exist_ok=True)
    originals = [picture(seed) for seed in range(n)]
    samples: list[list[tuple[str, bytes, str]]] = [[], []]
    for i, image in enumerate(originals):
        samples[i % 2].append((f"{i:06d}", jpeg(image), f"picture {i}"))
    for i in (0, 2, 4):  # a re-encoded copy and a resized copy: what a crawl repeats
        samples[1].append((f"{i:06d}-q60", jpeg(originals[i], quality=60), f"picture {i}, re-encoded"))
        samples[1].append((f"{i:06d}-big", jpeg(originals[i].resize((96, 96))), f"picture {i}, resized"))
    for k, rows in enumerate(samples):
        with tarfile.open(folder / f"{k:05d}.tar", "w") as tar:
            for key, data, caption in rows:
                add(tar, f"{key}.jpg", data)
                add(tar, f"{key}.txt", caption.encode())


def main() -> None:
    parser = example_parser(__doc__)
    parser.add_argument("--model", default="ViT-B-32", help="open_clip ARCH, local-dir:PATH or hf-hub:ORG/REPO")
    parser.add_argument("--pretrained", default=None, help="checkpoint file or open_clip tag (default: random weights)")
    args = parser.parse_args()
    work = workdir(args, "images")
    write_shards(work / "input")
    storage = str(work / "storage")
    pretrained = args.pretrained or ("random" if not args.model.startswith("local-dir:") else None)
    semdedup(
        "run",
        "--input",
        str(work / "input"),
        "--storage",
        storage,
        "--modality",
        "image",
        "--model",
        args.model,
        *(["--pretrained", pretrained] if pretrained else []),
        "--clusters",
        "2",
        "--buckets",
        "2",
        "--eps",
        "0.01,0.05",
        "--workers",
        "0",
        "--batch-size",
        "16",
    )
    semdedup(
        "sql",
        "SELECT i.id, r.caption, round(i.max_sim, 4) AS max_sim, i.duplicate_of FROM items i "
        "JOIN raw_items r USING (id) WHERE i.max_sim > 1 - 0.05 ORDER BY i.id",
        "--storage",
        storage,
    )


if __name__ == "__main__":
    main()
