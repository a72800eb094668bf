"""Small PNG plots for asset metadata (markdown with an inline base64 image)."""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence

import numpy as np


def _png_bytes(fig, dpi: int = 80) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def png_markdown(png: bytes, alt: str) -> str:
    """PNG bytes as a markdown image (what Dagster's UI shows for MetadataValue.md)."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def _png_markdown(fig, alt: str) -> str:
    return png_markdown(_png_bytes(fig), alt)


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6, 3.2))


def eps_curve_markdown(eps: Sequence[float], kept_fraction: Sequence[float]) -> str:
    """The kept fraction against eps (log scale) as a markdown image."""
    fig, ax = _figure()
    ax.plot(list(eps), list(kept_fraction), marker="o")
    ax.set_xscale("log")
    ax.set_xlabel("eps (duplicate if max_sim > 1 - eps)")
    ax.set_ylabel("kept fraction")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    return _png_markdown(fig, "eps curve")


def histogram_markdown(
    values: Sequence[float] | np.ndarray,
    title: str,
    xlabel: str,
    bins: int = 40,
    log: bool = True,
    edges: Sequence[float] | np.ndarray | None = None,
) -> str:
    """A histogram as a markdown image: of raw values, or of precomputed counts when edges are given."""
    fig, ax = _figure()
    values = np.asarray(values)
    # A log axis needs a positive count: a tiny dataset (one item, no duplicate pair) may have none,
    # and matplotlib would warn ("cannot be log-scaled") onto the user's terminal.
    if edges is None:
        ax.hist(values, bins=bins, log=log and values.size > 0)
    else:
        ax.stairs(values, edges, fill=True)
        if log and bool((values > 0).any()):
            ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    return _png_markdown(fig, title)


def budget_markdown(budget: Sequence[dict], title: str) -> str:
    """A pruning selection's per-cluster budget: members and kept per cluster (largest first), and
    DBP's softmax target N * share where there is one, as a markdown image."""
    fig, ax = _figure()
    rows = sorted(budget, key=lambda b: (-b["members"], b["cluster"]))
    x = np.arange(len(rows))
    ax.plot(x, [b["members"] for b in rows], label="members")
    ax.plot(x, [b["kept"] for b in rows], label="kept", marker=".", linestyle="none")
    if rows and rows[0].get("target") is not None:
        ax.plot(x, [b["target"] for b in rows], label="N * softmax share", alpha=0.7)
    ax.set_yscale("symlog")
    ax.set_xlabel("cluster (largest first)")
    ax.set_ylabel("items")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)
    return _png_markdown(fig, title)


def eps_curves_png(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]]) -> bytes:
    """Every configuration's kept fraction against eps (log scale) in one PNG."""
    fig, ax = _figure()
    fig.set_size_inches(7, 4)
    for label, (eps, kept_fraction) in curves.items():
        ax.plot(list(eps), list(kept_fraction), label=label)
    ax.set_xscale("log")
    ax.set_xlabel("eps (duplicate if max_sim > 1 - eps)")
    ax.set_ylabel("kept fraction")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return _png_bytes(fig, dpi=100)
