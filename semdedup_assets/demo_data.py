"""Offline, licence-clean demo corpus: prose from the running Python's own standard library.

The texts are read from the stdlib *source files* with :mod:`ast` (nothing is imported from
them): docstrings of modules, classes, functions and methods, plus the reference-manual
topics of :mod:`pydoc_data.topics`; full-line comment blocks only top the corpus up to
``max_items`` (docstrings alone give ~16k paragraphs). The stdlib is full of natural
near-duplicates (overridden methods, pure-Python twins of C modules, docs repeated in the
pydoc topics), which makes it a good small playground for semantic deduplication.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import io
import json
import os
import pathlib
import platform
import re
import sys
import sysconfig
import tempfile
import tokenize
import warnings
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "DEFAULT_MAX_ITEMS",
    "DEFAULT_N_SHARDS",
    "DEMO_DESCRIPTION",
    "MANIFEST_NAME",
    "collect_demo_texts",
    "demo_manifest",
    "write_demo_shards",
]

DEMO_DESCRIPTION: str = (
    "The demo dataset is real English prose read from the Python standard library source "
    "files installed with the interpreter that runs the demo (nothing is downloaded): "
    "paragraphs of the docstrings of modules, classes, functions and methods, the "
    "reference-manual topics shipped in pydoc_data.topics, and, to reach the item count, "
    "full-line comment blocks of the same sources. The texts are part of CPython, "
    "Copyright Python Software Foundation, and are used under the Python Software Foundation "
    "License (PSF-2.0), which permits copying, modification and redistribution with the PSF "
    "copyright notice retained. They contain natural near-duplicates (overridden or "
    "inherited methods with near-identical docstrings, pure-Python twins of C modules, docs "
    "repeated in the pydoc topics); each exact text is capped at three copies and no "
    "duplicates are synthesised."
)

DEFAULT_MAX_ITEMS = 24_000
DEFAULT_N_SHARDS = 8
MANIFEST_NAME = "_demo_manifest.json"

# Bump when the extraction or the file layout changes, so stale shards get rewritten.
_FORMAT_VERSION = 1
_MIN_CHARS = 40
_MAX_CHARS = 1000
_MIN_WORDS = 6
_MAX_EXACT_COPIES = 3
# Folders that are never read (third-party code, caches).
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
# Folders whose files hold test suites (lower priority, see the tiers below).
_TEST_DIRS = frozenset({"test", "tests", "idle_test"})
# Priority tiers: docstrings and pydoc topics first; comment blocks only fill up to max_items.
_TIER_DOC, _TIER_TEST_DOC, _TIER_COMMENT, _TIER_TEST_COMMENT = 0, 1, 2, 3
_PRAGMA = re.compile(r"^#(!|\s*-\*-|\s*(noqa|type:|pragma|fmt:|pylint:|flake8|XXX\s*$|TODO\s*$))")
_RULER = re.compile(r"^[-=#*~_+.]*$")
_PARA_SPLIT = re.compile(r"\n[ \t]*\n")
_TABLE_LINE = re.compile(r"^\s*(\+[-=+]+\+|[=\-]{3,}(\s+[=\-]{3,})*|.*\s\|\s.*\|.*)\s*$")
_CODE_LINE = re.compile(
    r"^\s*(>>>|\.\.\.\s|\.\.\.$|\$ |#|def |class |import |from \S+ import |return\b|[\w.\[\]]+\s*=[^=])"
)
_EXAMPLE_LINE = re.compile(r"^\s*(>>>|Traceback \(most recent call last\))")
_WORD = re.compile(r"[A-Za-z]+(?:'[a-z]+)?")


def _stdlib_root() -> pathlib.Path:
    """Return the folder of the running interpreter's standard-library sources."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def _iter_stdlib_files(root: pathlib.Path) -> Iterator[tuple[pathlib.Path, bool]]:
    """Yield (path, is_test) for the stdlib ``.py`` files in sorted path order, skipping site-packages."""
    for dirpath, dirnames, filenames in os.walk(root):
        # Sorting in place makes os.walk descend in a stable order.
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        rel_parts = pathlib.Path(dirpath).relative_to(root).parts
        is_test = any(part in _TEST_DIRS for part in rel_parts)
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield pathlib.Path(dirpath) / name, is_test


def _module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    """Return the dotted module name of a stdlib file (``json/decoder.py`` -> ``json.decoder``)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts and parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts) or path.stem


def _walk_defs(body: list[ast.stmt], prefix: str = "") -> Iterator[tuple[ast.AST, str]]:
    """Yield (node, qualified name) for classes and functions in source order, nested ones included."""
    for node in body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            qual = f"{prefix}{node.name}"
            yield node, qual
            yield from _walk_defs(node.body, qual + ".")
        else:
            # Definitions under if/try/with/for ("if sys.platform ...", "try: import ...") count too.
            for field in ("body", "orelse", "finalbody"):
                block = getattr(node, field, None)
                if isinstance(block, list):
                    yield from _walk_defs(block, prefix)
            for handler in getattr(node, "handlers", None) or []:
                yield from _walk_defs(handler.body, prefix)
            for case in getattr(node, "cases", None) or []:
                yield from _walk_defs(case.body, prefix)


def _is_prose(par: str) -> bool:
    """Return True if a raw (multi-line) paragraph looks like English prose, not code or a table."""
    lines = [ln for ln in par.splitlines() if ln.strip()]
    if not lines:
        return False
    # Any doctest prompt or traceback marks an example paragraph (its output lines look like prose).
    if any(_EXAMPLE_LINE.match(ln) for ln in lines):
        return False
    # Shell sessions, code snippets, headings and ASCII tables are dropped.
    codeish = sum(1 for ln in lines if _CODE_LINE.match(ln) or _TABLE_LINE.match(ln))
    if codeish * 3 > len(lines):
        return False
    flat = " ".join(par.split())
    words = _WORD.findall(flat)
    if len(words) < _MIN_WORDS:
        return False
    # Mostly letters and spaces; many symbols means signatures, regexes or formulas.
    letters = flat.count(" ") + sum(map(str.isalpha, flat))
    if letters < 0.8 * len(flat):
        return False
    # Enough characters inside real words (rejects "x < y" style formulas).
    return sum(len(w) for w in words) >= 0.6 * len(flat)


def _paragraphs(text: str) -> Iterator[str]:
    """Split a text into blank-line separated paragraphs, keep prose ones, normalise whitespace."""
    for par in _PARA_SPLIT.split(text.expandtabs(8)):
        if not _is_prose(par):
            continue
        flat = " ".join(par.split())
        if _MIN_CHARS <= len(flat) <= _MAX_CHARS:
            yield flat


def _mark_statement_interiors(body: list[ast.stmt], mask: bytearray) -> None:
    """Mark the lines after the first line of every simple (non-compound) statement."""
    for node in body:
        blocks = [getattr(node, f, None) for f in ("body", "orelse", "finalbody")]
        blocks += [h.body for h in getattr(node, "handlers", None) or []]
        blocks += [c.body for c in getattr(node, "cases", None) or []]
        blocks = [b for b in blocks if isinstance(b, list)]
        if blocks:  # compound statement: only its nested statements are marked
            for block in blocks:
                _mark_statement_interiors(block, mask)
        elif node.end_lineno and node.end_lineno > node.lineno:
            mask[node.lineno + 1 : node.end_lineno + 1] = b"\x01" * (node.end_lineno - node.lineno)


def _comment_blocks(source: str, tree: ast.Module) -> Iterator[tuple[int, str]]:
    """Yield (first line, text) of each run of full-line ``#`` comments standing between statements."""
    lines = source.splitlines()
    # Lines inside a multi-line statement (docstrings, embedded scripts, bracketed
    # expressions) are skipped: a "#" there may be string content. Walking statements
    # only is ~5x cheaper than visiting every expression node.
    inside = bytearray(len(lines) + 2)
    _mark_statement_interiors(tree.body, inside)
    block: list[str] = []
    start = 0
    for lineno, line in enumerate(lines, 1):
        stripped = line.strip()
        is_comment = stripped.startswith("#") and not inside[lineno]
        if is_comment and not _PRAGMA.match(stripped):
            if not block:
                start = lineno
            body = stripped.lstrip("#").strip()
            # Rulers such as "# -----" separate paragraphs like a blank "#" line does.
            block.append("" if _RULER.match(body) else body)
        elif block:
            yield start, "\n".join(block)
            block = []
    if block:
        yield start, "\n".join(block)


def _scope_of_lines(defs: list[tuple[ast.AST, str]], n_lines: int) -> list[str]:
    """Return, for each line number, the qualified name of the innermost enclosing def/class ('' at top)."""
    scope = [""] * (n_lines + 2)
    # Outer definitions come first in source order, so inner ones overwrite them.
    for node, qual in defs:
        lo, hi = node.lineno, node.end_lineno or node.lineno
        scope[lo : hi + 1] = [qual] * (hi - lo + 1)
    return scope


def _iter_file_items(path: pathlib.Path, module: str) -> Iterator[tuple[str, str, bool]]:
    """Yield (paragraph, source, is_comment) for the docstrings and comments of one stdlib file."""
    try:
        raw = path.read_bytes()
        with warnings.catch_warnings():  # invalid escapes in old test files warn on parse
            warnings.simplefilter("ignore")
            tree = ast.parse(raw, filename=str(path))
        # Honour a "coding:" cookie, as the parser did.
        text = raw.decode(tokenize.detect_encoding(io.BytesIO(raw).readline)[0])
    except (SyntaxError, ValueError, UnicodeDecodeError, LookupError, OSError):
        return  # unparsable / undecodable / unreadable files are skipped
    defs = list(_walk_defs(tree.body))
    docs = [(ast.get_docstring(tree, clean=True), module)]
    docs += [(ast.get_docstring(node, clean=True), f"{module}:{qual}") for node, qual in defs]
    for doc, source in docs:
        for par in _paragraphs(doc or ""):
            yield par, source, False
    scope = _scope_of_lines(defs, len(text.splitlines()))
    for lineno, block in _comment_blocks(text, tree):
        where = scope[lineno] if lineno < len(scope) else ""
        source = f"{module}:{where}#comment" if where else f"{module}#comment"
        for par in _paragraphs(block):
            yield par, source, True


def _iter_topic_items() -> Iterator[tuple[str, str]]:
    """Yield (paragraph, source) from the reference-manual topics of pydoc_data.topics."""
    try:
        from pydoc_data.topics import topics  # a pure data module, safe to import
    except ImportError:  # some distro builds strip it
        return
    for name in sorted(topics):
        for par in _paragraphs(topics[name]):
            yield par, f"pydoc_data:{name}"


def _cache_dir() -> pathlib.Path:
    """This machine's cache folder, the one `--model static` uses (`config.model_cache_dir`)."""
    from semdedup_assets.core.config import model_cache_dir

    return pathlib.Path(model_cache_dir())


def _candidates_key(root: pathlib.Path, sources: list[tuple[pathlib.Path, bool]]) -> str:
    """A digest of what the candidates depend on: this module's code, the interpreter and every stdlib
    file read (`sources`: its path, size and modification time), the pydoc topics included."""
    h = hashlib.sha256()
    h.update(pathlib.Path(__file__).read_bytes())
    h.update(f"{sys.version}\0{root}\0".encode())
    files = [path for path, _ in sources]
    try:
        import pydoc_data.topics as topics

        files.append(pathlib.Path(topics.__file__))
    except ImportError:
        pass
    for path in files:
        st = path.stat()
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _collect_candidates() -> list[tuple[int, str, str]]:
    """Return every candidate as (tier, text, source) in reading order (files sorted, then topics).

    Parsing the standard library takes ~15-30 s; the result is cached on this machine (gzipped JSON
    in `_cache_dir()`, named by `_candidates_key`, written atomically), so a second demo, benchmark or
    test reads it in well under a second. A cache that is missing, unreadable or from other sources
    is recomputed; one that cannot be written is skipped.
    """
    root = _stdlib_root()
    sources = list(_iter_stdlib_files(root))  # walked once: for the key and, on a miss, the parse
    key = _candidates_key(root, sources)
    path = _cache_dir() / f"demo-candidates-{key[:32]}.json.gz"
    try:
        cached = json.loads(gzip.decompress(path.read_bytes()))
        if cached["key"] == key:
            return [(int(tier), str(text), str(source)) for tier, text, source in cached["candidates"]]
    except Exception:
        pass
    out = _parse_candidates(root, sources)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write_bytes(path, gzip.compress(json.dumps({"key": key, "candidates": out}).encode(), 6))
    except OSError:
        pass
    return out


def _parse_candidates(root: pathlib.Path, sources: list[tuple[pathlib.Path, bool]]) -> list[tuple[int, str, str]]:
    """Every candidate, read from the stdlib `sources` (path, is_test) under `root` and the pydoc topics."""
    out: list[tuple[int, str, str]] = []
    for path, is_test in sources:
        module = _module_name(path, root)
        for text, source, is_comment in _iter_file_items(path, module):
            out.append((2 * is_comment + is_test, text, source))
    out.extend((_TIER_DOC, text, source) for text, source in _iter_topic_items())
    return out


def _select(cands: list[tuple[int, str, str]], max_items: int) -> list[tuple[str, str]]:
    """Cap exact copies, fill ``max_items`` tier by tier (hash-chosen within the last tier), keep reading order."""
    order = sorted(range(len(cands)), key=lambda i: (cands[i][0], i))
    # Keep at most _MAX_EXACT_COPIES of each text, preferring better tiers, then reading order.
    seen: dict[str, int] = {}
    kept_by_tier: dict[int, list[int]] = {}
    for i in order:
        tier, text, _ = cands[i]
        n = seen.get(text, 0)
        if n < _MAX_EXACT_COPIES:
            seen[text] = n + 1
            kept_by_tier.setdefault(tier, []).append(i)
    chosen: list[int] = []
    for tier in sorted(kept_by_tier):
        room = max_items - len(chosen)
        idx = kept_by_tier[tier]
        if len(idx) > room:
            # Stable hash-based choice; exact copies share a hash, so they stay together.
            idx = sorted(idx, key=lambda i: (hashlib.sha1(cands[i][1].encode("utf-8")).digest(), i))[:room]
        chosen.extend(idx)
        if len(chosen) >= max_items:
            break
    return [(cands[i][1], cands[i][2]) for i in sorted(chosen)]


def collect_demo_texts(max_items: int = DEFAULT_MAX_ITEMS) -> list[tuple[str, str]]:
    """Return up to ``max_items`` (text, source) pairs from stdlib docstrings, pydoc topics and comments, deterministically."""
    if max_items < 1:
        raise ValueError(f"max_items must be >= 1, got {max_items}")
    return _select(_collect_candidates(), max_items)


def _shard_name(k: int, n_shards: int) -> str:
    """Return the file name of shard ``k`` (two digits, more if there are over 100 shards)."""
    width = max(2, len(str(n_shards - 1)))
    return f"part-{k:0{width}d}.parquet"


def _content_hash(items: list[tuple[str, str]]) -> str:
    """Return a sha256 over all (text, source) pairs in order."""
    h = hashlib.sha256()
    for text, source in items:
        for field in (text, source):
            b = field.encode("utf-8")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
    return h.hexdigest()


def _file_sha256(path: pathlib.Path) -> str:
    """Return the sha256 hex digest of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write_bytes(path: pathlib.Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a ``.tmp`` file in the same folder and ``os.replace``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_write_table(path: pathlib.Path, table: pa.Table) -> None:
    """Write a Parquet file atomically with fixed, timestamp-free writer options."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(
            table,
            tmp,
            compression="zstd",
            compression_level=3,
            use_dictionary=False,
            write_statistics=True,
            row_group_size=1 << 20,
            data_page_size=1 << 20,
            version="2.6",
            data_page_version="1.0",
            store_schema=True,
            write_page_index=False,
            write_page_checksum=False,
        )
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def demo_manifest(out_dir: str | os.PathLike) -> dict | None:
    """Return the parsed ``_demo_manifest.json`` of a demo folder, or None if absent or unreadable."""
    try:
        return json.loads((pathlib.Path(out_dir) / MANIFEST_NAME).read_text("utf-8"))
    except (OSError, ValueError):
        return None


def _reusable(out: pathlib.Path, n_shards: int, max_items: int) -> list[pathlib.Path] | None:
    """Return the existing shard paths if the manifest matches the request and the files, else None."""
    man = demo_manifest(out)
    if not isinstance(man, dict):
        return None
    expected = {
        "format_version": _FORMAT_VERSION,
        "python_version": platform.python_version(),
        "n_shards": n_shards,
        "max_items": max_items,
    }
    if any(man.get(k) != v for k, v in expected.items()):
        return None
    shards = man.get("shards")
    if not isinstance(shards, list) or len(shards) != n_shards:
        return None
    paths: list[pathlib.Path] = []
    for k, entry in enumerate(shards):
        path = out / _shard_name(k, n_shards)
        # Hashing a few MB is far cheaper than re-reading the stdlib.
        if (
            not isinstance(entry, dict)
            or entry.get("file") != path.name
            or not path.is_file()
            or _file_sha256(path) != entry.get("sha256")
        ):
            return None
        paths.append(path)
    return paths


def write_demo_shards(
    out_dir: str | os.PathLike, n_shards: int = DEFAULT_N_SHARDS, max_items: int = DEFAULT_MAX_ITEMS
) -> list[pathlib.Path]:
    """Write the demo corpus as ``part-NN.parquet`` shards (id, text, source) and return their paths."""
    if n_shards < 1:
        raise ValueError(f"n_shards must be >= 1, got {n_shards}")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reused = _reusable(out, n_shards, max_items)
    if reused is not None:
        return reused

    items = collect_demo_texts(max_items)
    if len(items) < n_shards:
        raise ValueError(f"only {len(items)} demo texts for {n_shards} shards")
    # Drop the manifest first: an interrupted rewrite must not look complete.
    (out / MANIFEST_NAME).unlink(missing_ok=True)

    ids = [f"doc-{i:06d}" for i in range(len(items))]
    schema = pa.schema([("id", pa.string()), ("text", pa.string()), ("source", pa.string())])
    paths: list[pathlib.Path] = []
    shard_entries: list[dict] = []
    for k in range(n_shards):
        # Interleave: item i goes to shard i % n_shards, so neighbours (often near-duplicates,
        # e.g. sibling methods of one class) usually land in different shards.
        idx = range(k, len(items), n_shards)
        table = pa.table(
            {"id": [ids[i] for i in idx], "text": [items[i][0] for i in idx], "source": [items[i][1] for i in idx]},
            schema=schema,
        )
        path = out / _shard_name(k, n_shards)
        _atomic_write_table(path, table)
        paths.append(path)
        shard_entries.append({"file": path.name, "rows": table.num_rows, "sha256": _file_sha256(path)})

    # Remove shards of an earlier run with more shards, so globbing part-*.parquet stays correct.
    keep = {p.name for p in paths}
    for stale in out.glob("part-*.parquet"):
        if stale.name not in keep:
            stale.unlink(missing_ok=True)

    manifest = {
        "format_version": _FORMAT_VERSION,
        "python_version": platform.python_version(),
        "n_items": len(items),
        "n_shards": n_shards,
        "max_items": max_items,
        "n_distinct_texts": len({t for t, _ in items}),
        "content_hash": _content_hash(items),
        "shards": shard_entries,
        "description": DEMO_DESCRIPTION,
    }
    _atomic_write_bytes(out / MANIFEST_NAME, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return paths
