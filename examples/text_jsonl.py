"""Deduplicate text in C4-style JSON Lines shards (`text`, `url`, `timestamp`; no id column).

    python examples/text_jsonl.py [--workdir DIR] [--model MODEL]

Writes two small `.jsonl.gz` shards with a few near-copies under DIR/input, runs the whole graph
with the offline all-MiniLM-L6-v2 (or `--model static`, a model2vec model distilled from it once
per machine), prints the eps table and the pairs removed at eps 0.05, and exports the shards again
without them. Point `--input` at your own C4 folder for the real thing (`--clusters` about
N / 5,000 or more).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from helpers import example_parser, semdedup, workdir

PARAGRAPHS = [
    "The city council approved a new budget for road repairs and public parks on Tuesday.",
    "Preheat the oven to 180 degrees and grease a round cake tin with butter.",
    "Our hotel offers free parking, a rooftop pool and breakfast served until eleven.",
    "The new smartphone has a larger battery and a brighter display than last year's model.",
    "Regular stretching improves flexibility and can reduce the risk of injury.",
    "The museum's summer exhibition brings together paintings from five European collections.",
    "Volunteers planted two hundred trees along the river bank over the weekend.",
    "This article explains how to file your tax return online in a few simple steps.",
]
# Near-copies, as a web crawl has them: boilerplate edits, punctuation, one word changed.
COPIES = {
    0: "The city council approved a new budget for road repairs and public parks on Tuesday!",
    2: "Our hotel offers free parking, a rooftop pool and breakfast served until 11.",
    3: "The new smartphone has a larger battery and a brighter display than last year's model. Read more.",
    7: "This article explains how to file your tax return online in a few easy steps.",
}


def write_shards(folder: Path) -> None:
    """Two gzipped JSON Lines shards; the copies land in the other shard than their originals."""
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[list[dict[str, str]]] = [[], []]
    for i, text in enumerate(PARAGRAPHS):
        shards[i % 2].append({"text": text, "url": f"https://example.org/{i}", "timestamp": "2019-04-25T12:57:54Z"})
    for i, text in COPIES.items():
        shards[(i + 1) % 2].append(
            {"text": text, "url": f"https://mirror.example.net/{i}", "timestamp": "2019-04-26T08:12:03Z"}
        )
    for k, rows in enumerate(shards):
        with gzip.open(folder / f"c4-train.{k:05d}-of-00002.jsonl.gz", "wt") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)


def main() -> None:
    parser = example_parser(__doc__)
    parser.add_argument("--model", default=None, help="text encoder (default: the offline all-MiniLM-L6-v2)")
    args = parser.parse_args()
    work = workdir(args, "text")
    write_shards(work / "input")
    storage = str(work / "storage")
    model = ["--model", args.model] if args.model else []
    semdedup(
        "run",
        "--input",
        str(work / "input"),
        "--storage",
        storage,
        "--modality",
        "text",
        "--column",
        "text",
        "--clusters",
        "2",
        "--buckets",
        "2",
        "--eps",
        "0.01,0.05,0.1",
        *model,
    )
    # No id column in C4: ids are <shard>:<row>. The removed items next to the earlier member they duplicate.
    semdedup(
        "sql",
        "SELECT i.id, round(i.max_sim, 3) AS max_sim, i.duplicate_of FROM items i "
        "WHERE i.max_sim > 1 - 0.05 ORDER BY i.id",
        "--storage",
        storage,
    )
    semdedup("export", "--select", "eps=0.05", "--storage", storage)


if __name__ == "__main__":
    main()
