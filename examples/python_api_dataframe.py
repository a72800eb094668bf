"""SemDeDup on a pandas DataFrame of embeddings, from Python (no Dagster): try eps values, keep the rows.

Run: `.venv/bin/python examples/python_api_dataframe.py`. A few seconds on tiny made-up data;
results go to a temporary folder that is removed at the end.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from semdedup_assets import SemDeDup


def make_frame(n: int = 600, d: int = 32, seed: int = 0) -> pd.DataFrame:
    """n documents with an embedding each; every third one a near-copy of the document before it."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    x[1::3] = x[0::3][: len(x[1::3])] + 0.002 * rng.normal(size=(len(x[1::3]), d)).astype(np.float32)
    return pd.DataFrame(
        {
            "doc": [f"doc-{i:04d}" for i in range(n)],
            "source": [("web", "books", "code")[i % 3] for i in range(n)],
            "embedding": list(x),
        }
    )


def main() -> None:
    """Deduplicate the frame at a few eps values and print what each keeps."""
    frame = make_frame()
    sd = SemDeDup(clusters=8, eps=[0.001, 0.01, 0.05], id_column="doc", progress=False)
    with sd.run(frame) as result:
        print(result.eps_curve.to_pandas().to_string(index=False))
        pairs = result.duplicates(0.01).to_pandas()
        print(f"\n{len(pairs)} near-duplicates at eps=0.01, e.g.:")
        print(pairs.head(3).to_string(index=False))
        kept = result.select(eps=0.01)  # a DataFrame: every column, kept rows only
        print(f"\nkept {len(kept)} of {len(frame)} rows; by source:")
        print(kept.groupby("source").size().to_string())
        print("\nwhy", pairs.iloc[0]["id"], "goes:", result.explain(pairs.iloc[0]["id"]))


if __name__ == "__main__":
    main()
