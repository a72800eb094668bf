"""Tests for the offline stdlib-docstring demo corpus (semdedup_assets.demo_data)."""

from __future__ import annotations

import collections
import json
import pathlib
import re

import pyarrow.parquet as pq
import pytest

from semdedup_assets import demo_data
from semdedup_assets.demo_data import (
    DEMO_DESCRIPTION,
    MANIFEST_NAME,
    collect_demo_texts,
    write_demo_shards,
)


def _tokens(text: str) -> frozenset[str]:
    """Return the normalised (lower-case alphanumeric) token set of a text."""
    return frozenset(re.findall(r"[a-z0-9]+", text.lower()))


def _jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    """Return the Jaccard similarity of two token sets."""
    return len(a & b) / len(a | b) if a or b else 1.0


def _near_duplicate_pairs(rows: list[dict], threshold: float = 0.8) -> list[tuple[dict, dict]]:
    """Return pairs of rows with different source and text but token Jaccard >= threshold.

    Candidates are rows sharing their first four tokens (cheap blocking, enough for a test).
    """
    groups: dict[tuple[str, ...], list[dict]] = collections.defaultdict(list)
    for row in rows:
        toks = re.findall(r"[a-z0-9]+", row["text"].lower())
        groups[tuple(toks[:4])].append(row)
    pairs = []
    for group in groups.values():
        if len(group) > 200:  # boilerplate prefixes; skip to stay fast
            continue
        for i, a in enumerate(group):
            ta = _tokens(a["text"])
            for b in group[i + 1 :]:
                if (
                    a["source"] != b["source"]
                    and a["text"] != b["text"]
                    and _jaccard(ta, _tokens(b["text"])) >= threshold
                ):
                    pairs.append((a, b))
    return pairs


def _read_rows(paths: list[pathlib.Path]) -> list[dict]:
    """Read all shards into a list of row dicts."""
    rows: list[dict] = []
    for path in paths:
        rows.extend(pq.read_table(path).to_pylist())
    return rows


@pytest.fixture(scope="module")
def demo_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[pathlib.Path], list[pathlib.Path]]:
    """Write the demo corpus twice, into two separate folders (the slow part, done once).

    Both under an empty candidates cache of their own: the first write parses the standard
    library and fills it, the second reads it, so `test_deterministic_bytes` compares the two paths.
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SEMDEDUP_CACHE", str(tmp_path_factory.mktemp("cache")))
        a = write_demo_shards(tmp_path_factory.mktemp("demo_a"))
        assert list(demo_data._cache_dir().glob("demo-candidates-*.json.gz")), "the parse was not cached"
        b = write_demo_shards(tmp_path_factory.mktemp("demo_b"))
    return a, b


@pytest.fixture(scope="module")
def rows(demo_dirs: tuple[list[pathlib.Path], list[pathlib.Path]]) -> list[dict]:
    """All rows of the first written corpus."""
    return _read_rows(demo_dirs[0])


def test_shards_layout_and_schema(demo_dirs: tuple[list[pathlib.Path], list[pathlib.Path]]) -> None:
    paths = demo_dirs[0]
    assert len(paths) >= 8
    assert [p.name for p in paths] == [f"part-{k:02d}.parquet" for k in range(8)]
    counts = []
    for p in paths:
        table = pq.read_table(p)
        assert table.column_names == ["id", "text", "source"]
        assert all(str(t) == "string" for t in table.schema.types)
        counts.append(table.num_rows)
    # Interleaved: shard sizes differ by at most one row.
    assert max(counts) - min(counts) <= 1


def test_items_count_ids_and_text(rows: list[dict]) -> None:
    assert 20_000 <= len(rows) <= 24_000
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"doc-\d{6}", i) for i in ids)
    for r in rows:
        assert isinstance(r["text"], str) and r["text"].strip()
        assert 40 <= len(r["text"]) <= 1000
        assert r["text"] == " ".join(r["text"].split())  # whitespace normalised
        assert isinstance(r["source"], str) and r["source"]
    # Mostly prose: doctest examples and tracebacks are gone.
    assert not any(r["text"].startswith((">>>", "Traceback (most recent call last)")) for r in rows)
    assert sum(">>> " in r["text"] for r in rows) < 20  # only prose that mentions the prompt
    # Both main sources are present.
    assert any(r["source"].startswith("pydoc_data:") for r in rows)
    assert any(r["source"] == "json.decoder:JSONDecoder.decode" for r in rows)


def test_exact_copies_capped_but_kept(rows: list[dict]) -> None:
    counts = collections.Counter(r["text"] for r in rows)
    assert max(counts.values()) <= 3
    # Natural exact duplicates are kept (not deduplicated away).
    assert sum(1 for c in counts.values() if c > 1) >= 100


def test_natural_near_duplicates(rows: list[dict]) -> None:
    pairs = _near_duplicate_pairs(rows)
    assert len(pairs) >= 100, f"only {len(pairs)} near-duplicate pairs"
    # Near-duplicates are spread over shards: ids are interleaved i % 8.
    shard = lambda r: int(r["id"][4:]) % 8  # noqa: E731
    assert sum(shard(a) != shard(b) for a, b in pairs) >= len(pairs) // 2


def test_near_duplicate_check_can_fail() -> None:
    text = "Return the value of the named attribute of the object, or the default if it is missing."
    rows = [
        {"text": text, "source": "a"},
        {"text": "Return the value of the environment variable with the given key.", "source": "b"},
        {"text": text, "source": "c"},
    ]
    # Different texts below the threshold; identical texts are not near-duplicates.
    assert _near_duplicate_pairs(rows) == []
    rows.append({"text": text.replace("the default", "a default"), "source": "d"})
    assert len(_near_duplicate_pairs(rows)) == 2


def test_deterministic_bytes(demo_dirs: tuple[list[pathlib.Path], list[pathlib.Path]]) -> None:
    a, b = demo_dirs
    assert [p.name for p in a] == [p.name for p in b]
    for pa_, pb_ in zip(a, b):
        assert pa_.read_bytes() == pb_.read_bytes(), pa_.name
    assert (a[0].parent / MANIFEST_NAME).read_bytes() == (b[0].parent / MANIFEST_NAME).read_bytes()


def test_manifest(demo_dirs: tuple[list[pathlib.Path], list[pathlib.Path]], rows: list[dict]) -> None:
    man = json.loads((demo_dirs[0][0].parent / MANIFEST_NAME).read_text())
    assert man["n_items"] == len(rows)
    assert man["n_shards"] == 8
    assert sum(s["rows"] for s in man["shards"]) == len(rows)
    assert re.fullmatch(r"[0-9a-f]{64}", man["content_hash"])
    assert man["python_version"]


def test_second_call_reuses_files(
    demo_dirs: tuple[list[pathlib.Path], list[pathlib.Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = demo_dirs[0]
    out = paths[0].parent
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("corpus was recollected")

    monkeypatch.setattr(demo_data, "collect_demo_texts", boom)
    again = write_demo_shards(out)
    assert again == paths
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_tampered_or_mismatched_shards_are_not_reused(
    demo_dirs: tuple[list[pathlib.Path], list[pathlib.Path]], tmp_path: pathlib.Path
) -> None:
    src = demo_dirs[0][0].parent
    for p in src.iterdir():
        (tmp_path / p.name).write_bytes(p.read_bytes())
    assert demo_data._reusable(tmp_path, 8, 24_000) is not None
    assert demo_data._reusable(tmp_path, 16, 24_000) is None  # other shard count
    assert demo_data._reusable(tmp_path, 8, 20_000) is None  # other size
    shard = tmp_path / "part-03.parquet"
    shard.write_bytes(shard.read_bytes()[:-10] + b"0" * 10)
    assert demo_data._reusable(tmp_path, 8, 24_000) is None  # content changed


def test_no_leftover_tmp(demo_dirs: tuple[list[pathlib.Path], list[pathlib.Path]]) -> None:
    for paths in demo_dirs:
        names = sorted(p.name for p in paths[0].parent.iterdir())
        assert not [n for n in names if n.endswith(".tmp")]
        assert names == sorted([MANIFEST_NAME] + [p.name for p in paths])


def test_failed_write_leaves_no_tmp_and_no_manifest(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small = [(f"Paragraph number {i} of a tiny fake corpus for this test.", f"m:f{i}") for i in range(40)]
    monkeypatch.setattr(demo_data, "collect_demo_texts", lambda max_items=0: small)
    real_write = pq.write_table
    calls = []

    def flaky(table, where, **kwargs):  # write a partial file, then fail on the 3rd shard
        calls.append(where)
        if len(calls) == 3:
            pathlib.Path(where).write_bytes(b"partial")
            raise OSError("disk full")
        return real_write(table, where, **kwargs)

    monkeypatch.setattr(demo_data.pq, "write_table", flaky)
    with pytest.raises(OSError, match="disk full"):
        write_demo_shards(tmp_path, n_shards=4, max_items=40)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["part-00.parquet", "part-01.parquet"]  # no .tmp, no part-02, no manifest
    assert all(str(c).endswith(".tmp") for c in calls)  # written under a temporary name

    # A retry completes and leaves a consistent folder.
    monkeypatch.setattr(demo_data.pq, "write_table", real_write)
    paths = write_demo_shards(tmp_path, n_shards=4, max_items=40)
    assert sum(pq.read_metadata(p).num_rows for p in paths) == 40
    assert (tmp_path / MANIFEST_NAME).exists()


def test_select_caps_copies_and_prefers_docstrings() -> None:
    cands = [(0, "same docstring text", "m:a")] * 5  # 5 exact copies -> 3
    cands += [(2, f"comment {i}", "m#comment") for i in range(10)]
    cands += [(0, f"doc {i}", f"m:f{i}") for i in range(4)]
    picked = demo_data._select(cands, 9)
    assert len(picked) == 9
    assert [t for t, _ in picked].count("same docstring text") == 3
    assert sum(t.startswith("doc ") for t, _ in picked) == 4  # all docstrings kept first
    assert sum(t.startswith("comment ") for t, _ in picked) == 2  # comments only fill up
    assert picked == demo_data._select(list(cands), 9)  # deterministic
    with pytest.raises(ValueError):
        collect_demo_texts(max_items=0)


def test_description_mentions_licence() -> None:
    assert "Python Software Foundation License" in DEMO_DESCRIPTION
    assert "\n" not in DEMO_DESCRIPTION


@pytest.fixture
def tiny_stdlib(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """A two-file stand-in for the standard library (no pydoc topics) and an empty cache folder."""
    root = tmp_path / "lib"
    root.mkdir()
    (root / "alpha.py").write_text('"""The alpha module reads the configuration files and returns their settings."""\n')
    (root / "beta.py").write_text('def f():\n    """Return the number of items that were written to the output."""\n')
    monkeypatch.setattr(demo_data, "_stdlib_root", lambda: root)
    monkeypatch.setattr(demo_data, "_iter_topic_items", lambda: iter(()))
    monkeypatch.setenv("SEMDEDUP_CACHE", str(tmp_path / "cache"))
    return root


def _no_parse(root: pathlib.Path, sources: list) -> list:
    raise AssertionError("the standard library was parsed again")


def test_candidates_are_cached_per_user_and_follow_the_sources(
    tiny_stdlib: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parse is cached; a second call reads it; a changed source file is parsed again."""
    first = demo_data._collect_candidates()
    assert [source for _, _, source in first] == ["alpha", "beta:f"]
    cached = list(demo_data._cache_dir().glob("demo-candidates-*.json.gz"))
    assert len(cached) == 1
    parse = demo_data._parse_candidates
    monkeypatch.setattr(demo_data, "_parse_candidates", _no_parse)
    assert demo_data._collect_candidates() == first
    (tiny_stdlib / "beta.py").write_text(
        'def g():\n    """Return the list of files that were found under the folder."""\n'
    )
    monkeypatch.setattr(demo_data, "_parse_candidates", parse)
    assert [source for _, _, source in demo_data._collect_candidates()] == ["alpha", "beta:g"]


@pytest.mark.parametrize("damage", ["truncated", "not gzip", "other key"])
def test_a_damaged_candidates_cache_is_parsed_again_and_rewritten(tiny_stdlib: pathlib.Path, damage: str) -> None:
    import gzip

    first = demo_data._collect_candidates()
    (path,) = demo_data._cache_dir().glob("demo-candidates-*.json.gz")
    data = path.read_bytes()
    path.write_bytes(
        {
            "truncated": data[: len(data) // 2],
            "not gzip": b"{}",
            "other key": gzip.compress(json.dumps({"key": "x", "candidates": [[0, "a", "b"]]}).encode()),
        }[damage]
    )
    assert demo_data._collect_candidates() == first
    assert path.read_bytes() != b"{}" and json.loads(gzip.decompress(path.read_bytes()))["candidates"]


def test_an_unwritable_cache_folder_still_gives_the_candidates(
    tiny_stdlib: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tiny_stdlib.parent / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("SEMDEDUP_CACHE", str(blocker / "cache"))  # a folder that cannot be made under a file
    assert [source for _, _, source in demo_data._collect_candidates()] == ["alpha", "beta:f"]
