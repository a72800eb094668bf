"""Benchmark: texts/s of HFTextEncoder against a bare `model(**batch)` loop and sentence-transformers.

Usage:
    .venv/bin/python bench/text_embedding.py [--n 5000] [--batch-size 64] [--max-length 128]
                                             [--repeats 2] [--out bench/results/text_embedding.md]
    .venv/bin/python bench/text_embedding.py --smoke     # n=32, max_length 64, one repeat; prints only

The same real texts (the demo's Python docstrings, `collect_demo_texts`), the offline
all-MiniLM-L6-v2, the same batch size and max length, on CPU:
  (a) `HFTextEncoder.encode` (tokenise once, sort by length, pad per batch, mean pool, normalise);
  (b) bare loop, input order: `tokenizer(batch, padding, truncation)` + `model(**batch)` + mean pool;
  (c) bare loop over the same length-sorted batches as (a): pure forward-pass cost, no orchestration;
  (d) `SentenceTransformer(path).encode(batch_size, normalize_embeddings=True)`, max_seq_length set;
  (e) `StaticTextEncoder.encode`: the static (model2vec) model distilled from the same MiniLM
      (`--static PATH`, default this machine's `--model static`), same texts and max length.
Then, static only, on `--static-n` texts (a static model is too fast for a few thousand texts to time):
  (e) against (f) model2vec's own `StaticModel.encode` (its defaults: batches of 1,024, worker processes
      above 10,000 texts), same model, texts and max length; agreement of the two outputs.
Configurations run interleaved `--repeats` times and the best run counts. With --smoke and no
--static, (e) uses a static model distilled from a tiny random BERT (seconds, not minutes).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_output_options, command_line, emit, machine_lines, output_path, verdict

from semdedup_assets.core.embed.encoders.static import StaticTextEncoder, default_static_model, distill_static_model
from semdedup_assets.core.embed.encoders.text import HFTextEncoder, resolve_text_model
from semdedup_assets.demo_data import collect_demo_texts

DEFAULT_OUT = "bench/results/text_embedding.md"


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """Masked mean over tokens, L2-normalised (the minimum a bare loop needs for the same output)."""
    w = mask.unsqueeze(-1).to(hidden.dtype)
    v = (hidden * w).sum(1) / w.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(v, dim=1).numpy()


def bare_loop(tokenizer, model, texts: list[str], batch: int, max_length: int, order: np.ndarray) -> np.ndarray:
    """Tokenise + forward + pool, batch by batch in the given order."""
    out = np.empty((len(texts), model.config.hidden_size), dtype=np.float32)
    with torch.inference_mode():
        for s in range(0, len(texts), batch):
            idx = order[s : s + batch]
            enc = tokenizer(
                [texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
            hidden = model(**enc).last_hidden_state
            out[idx] = mean_pool(hidden, enc["attention_mask"])
    return out


def smoke_static_model() -> str:
    """A static model distilled from a tiny random BERT in a temporary folder (for --smoke only)."""
    import tempfile

    from semdedup_assets_tests.tinybert import write_tiny_bert

    root = Path(tempfile.mkdtemp(prefix="semdedup-smoke-static-"))
    return str(distill_static_model(str(write_tiny_bert(root / "bert")), root / "static", dims=16))


def bench_static_model(static: str | None, smoke: bool) -> str:
    """The static model a bench encodes with: --static PATH, the tiny smoke model, or this machine's default."""
    if static:
        return static
    if smoke:
        return smoke_static_model()
    return str(default_static_model())


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the markdown report and write it where asked."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "--static",
        default=None,
        metavar="PATH",
        help="static model folder for (e) (default: the cached `--model static`, distilled if missing)",
    )
    ap.add_argument("--static-n", type=int, default=24_000, help="texts of the static-only comparison (e) vs (f)")
    add_output_options(ap, DEFAULT_OUT, "n=32, max_length 64, one repeat: checks the script works")
    args = ap.parse_args(argv)
    if args.smoke:
        args.n, args.repeats, args.max_length, args.static_n = 32, 1, 64, 2000
    out = output_path(args, DEFAULT_OUT)

    import sentence_transformers
    import transformers
    from sentence_transformers import SentenceTransformer

    texts = [t for t, _ in collect_demo_texts(args.n)]  # the parse is cached: the second call below reads it
    path = resolve_text_model(None)
    ours = HFTextEncoder(None, max_length=args.max_length, batch_size=args.batch_size, device="cpu")
    tok, model = ours.tokenizer, ours.model  # the same weights for the bare loops
    static_path = bench_static_model(args.static, args.smoke)
    static = StaticTextEncoder(f"model2vec:{static_path}", max_length=args.max_length, device="cpu")
    st = SentenceTransformer(path, device="cpu")
    st.max_seq_length = args.max_length
    lengths = np.array([len(ids) for ids in tok(texts, truncation=True, max_length=args.max_length)["input_ids"]])
    sorted_order = np.argsort(-lengths, kind="stable")
    input_order = np.arange(len(texts))

    runs = {
        "(a) HFTextEncoder.encode": lambda: ours.encode(texts),
        "(b) bare model(**batch) loop, input order": lambda: bare_loop(
            tok, model, texts, args.batch_size, args.max_length, input_order
        ),
        "(c) bare model(**batch) loop, same length-sorted batches": lambda: bare_loop(
            tok, model, texts, args.batch_size, args.max_length, sorted_order
        ),
        "(d) SentenceTransformer.encode": lambda: st.encode(
            texts, batch_size=args.batch_size, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False
        ),
        "(e) StaticTextEncoder.encode (model2vec, distilled from the same model)": lambda: static.encode(texts),
    }
    ours.encode(texts[:64])  # warm-up: thread pools, first-call allocations
    static.encode(texts[:64])
    st.encode(texts[:64], batch_size=args.batch_size)
    best = {k: float("inf") for k in runs}
    outputs: dict[str, np.ndarray] = {}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            outputs[name] = np.asarray(fn())
            best[name] = min(best[name], time.perf_counter() - start)
            print(f"{name}: {time.perf_counter() - start:.2f} s", flush=True)

    from model2vec import StaticModel

    static_texts = [t for t, _ in collect_demo_texts(args.static_n)]
    reference = StaticModel.from_pretrained(static_path, force_download=False)
    static_runs = {
        "(e) StaticTextEncoder.encode": lambda: static.encode(static_texts),
        "(f) model2vec StaticModel.encode": lambda: reference.encode(static_texts, max_length=args.max_length),
    }
    static_best = {k: float("inf") for k in static_runs}
    for _ in range(args.repeats):
        for name, fn in static_runs.items():
            start = time.perf_counter()
            outputs[name] = np.asarray(fn(), dtype=np.float32)
            static_best[name] = min(static_best[name], time.perf_counter() - start)
            print(f"{name}: {time.perf_counter() - start:.2f} s", flush=True)
    se, sf = list(static_runs)
    f_unit = outputs[sf] / np.maximum(np.linalg.norm(outputs[sf], axis=1, keepdims=True), 1e-12)
    diff_m2v = float(np.abs(outputs[se] - f_unit).max())
    static_rate = {k: len(static_texts) / v for k, v in static_best.items()}

    a, b, c, d, e = list(runs)
    rate = {k: len(texts) / s for k, s in best.items()}
    diff_st = float(np.abs(outputs[a] - outputs[d]).max())
    diff_bare = float(np.abs(outputs[a] - outputs[b]).max())
    n_tok = int(lengths.sum())
    lines = [
        "# Text embedding throughput: HFTextEncoder vs a bare loop vs sentence-transformers",
        "",
        f"Command: `{command_line('bench/text_embedding.py', argv)}`",
        "",
        *machine_lines(
            [f"- transformers {transformers.__version__}, sentence-transformers {sentence_transformers.__version__}"]
        ),
        "## Input",
        "",
        f"- {len(texts):,} real texts (`collect_demo_texts`: Python docstrings, pydoc topics, comments);"
        f" {n_tok:,} tokens after truncation to {args.max_length} (mean {lengths.mean():.1f},"
        f" {int((lengths >= args.max_length).sum()):,} truncated)",
        f"- model: offline all-MiniLM-L6-v2 ({path}), fp32, CPU; batch size {args.batch_size};"
        f" best of {args.repeats} interleaved runs",
        f"- (e): static model {static_path} ({static.dim}-d; batches of {static.batch_size} texts)",
        "",
        "## Results",
        "",
        "| implementation | time | texts/s | ratio (a) / this |",
        "|---|---|---|---|",
    ]
    for name in runs:
        lines.append(f"| {name} | {best[name]:.2f} s | {rate[name]:,.1f} | {rate[a] / rate[name]:.2f}x |")
    lines += [
        "",
        f"Agreement: max |(a) - (d)| = {diff_st:.1e}, max |(a) - (b)| = {diff_bare:.1e} per coordinate (unit vectors).",
        "",
        f"## Static only: {len(static_texts):,} texts, max length {args.max_length}, best of {args.repeats}",
        "",
        "| implementation | time | texts/s | ratio (e) / this |",
        "|---|---|---|---|",
    ]
    for name in static_runs:
        lines.append(
            f"| {name} | {static_best[name]:.2f} s | {static_rate[name]:,.0f} |"
            f" {static_rate[se] / static_rate[name]:.2f}x |"
        )
    lines += [
        "",
        f"Agreement: max |(e) - (f) normalised| = {diff_m2v:.1e} per coordinate.",
        "",
        "## Goals",
        "",
        f"- (a) >= 0.95x the bare loop (same length-sorted batches, c): **{verdict(rate[a] >= 0.95 * rate[c])}**"
        f" ({rate[a] / rate[c]:.2f}x)",
        f"- (a) >= 0.95x the bare loop (input order, b): **{verdict(rate[a] >= 0.95 * rate[b])}**"
        f" ({rate[a] / rate[b]:.2f}x; sorting by length saves padding)",
        f"- (a) >= 1.0x sentence-transformers (d): **{verdict(rate[a] >= rate[d])}** ({rate[a] / rate[d]:.2f}x)",
        f"- static (e) against MiniLM (a), same run: **{rate[e] / rate[a]:,.0f}x** the texts/s"
        f" ({rate[e]:,.0f} against {rate[a]:,.1f})",
        f"- static (e) >= 1.0x model2vec's own encode (f), {len(static_texts):,} texts:"
        f" **{verdict(static_rate[se] >= static_rate[sf])}** ({static_rate[se] / static_rate[sf]:.2f}x)",
        "",
    ]
    emit(lines, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
