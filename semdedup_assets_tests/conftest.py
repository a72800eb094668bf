"""pytest fixtures: a test Dagster instance. The data helpers live in fixtures.py (tests and bench import them)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import dagster as dg
import pytest

# Names the tests imported from here before the helpers moved to fixtures.py.
from semdedup_assets_tests.fixtures import (BASE_SENTENCES, NEAR_COPIES, make_planted,  # noqa: F401
                                            text_rows, write_embedding_shards, write_text_shards)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def write_embeddings_and_reference(root: Path, per_shard: int, d: int) -> dict[str, Path]:
    """Three bring-your-own shards under root/input and a --reference root/ref (a copy of part-00: all flagged)."""
    write_embedding_shards(root / "input", n_shards=3, per_shard=per_shard, d=d)
    (root / "ref").mkdir()
    shutil.copy(root / "input" / "part-00.parquet", root / "ref" / "eval.parquet")
    return {"root": root, "input": root / "input", "storage": root / "storage", "ref": root / "ref"}


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    """An ephemeral-directory Dagster instance (a temporary DAGSTER_HOME)."""
    with dg.instance_for_test() as inst:
        yield inst
