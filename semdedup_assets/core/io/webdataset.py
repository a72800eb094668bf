"""Read a WebDataset tar shard (image + caption samples grouped by key) into an Arrow table."""

from __future__ import annotations

import json
import os
import posixpath
import tarfile
import zlib
from typing import IO, Any

import pyarrow as pa

__all__ = ["CAPTION_EXTENSIONS", "IMAGE_EXTENSIONS", "WEBDATASET_SCHEMA", "read_webdataset", "split_member_name"]

# Image members by priority: when one key has several, the first in this order wins.
IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSIONS: tuple[str, ...] = ("txt", "json")
# JSON fields tried, in order, for the caption of a sample without a .txt member.
_JSON_CAPTION_FIELDS: tuple[str, ...] = ("caption", "text")

WEBDATASET_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("image", pa.binary()),
        pa.field("image_ext", pa.string()),
        pa.field("caption", pa.string()),
    ]
)


def split_member_name(name: str) -> tuple[str, str] | None:
    """Split a tar member path into (key, extension) by WebDataset rules; None for hidden files."""
    dirname, basename = posixpath.split(name)
    # macOS "._foo" resource forks and other dotfiles are not samples.
    if not basename or basename.startswith("."):
        return None
    stem, dot, ext = basename.partition(".")
    key = posixpath.join(dirname, stem) if dirname else stem
    return key, (ext.lower() if dot else "")


def _caption_from_json(data: bytes) -> str | None:
    """The `caption` (else `text`) string field of a JSON sample, or None."""
    try:
        meta: Any = json.loads(data)
    except ValueError:  # json.JSONDecodeError and UnicodeDecodeError are both ValueErrors
        # Metadata is auxiliary: a broken .json must not cost the whole shard its images.
        return None
    if not isinstance(meta, dict):
        return None
    for field in _JSON_CAPTION_FIELDS:
        value = meta.get(field)
        if isinstance(value, str):
            return value
    return None


def _check_utf8_name(name: str) -> None:
    """Reject member names tarfile could only decode with surrogate escapes (Arrow needs UTF-8)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"tar member name {name!r} is not valid UTF-8") from None


class _EndTrackingTarInfo(tarfile.TarInfo):
    """TarInfo that records why header parsing stopped, so a cut-off archive is not read as complete."""

    @classmethod
    def fromtarfile(cls, archive: tarfile.TarFile) -> tarfile.TarInfo:
        """Parse the next header, remembering the error that ends iteration."""
        try:
            return super().fromtarfile(archive)
        except tarfile.HeaderError as exc:
            # TarFile.next() swallows these after the first member and simply stops.
            archive.semdedup_stop = exc  # type: ignore[attr-defined]
            raise


def _check_clean_end(tar: tarfile.TarFile) -> None:
    """Raise ValueError unless iteration stopped at a proper end-of-archive (zero) block."""
    stop = getattr(tar, "semdedup_stop", None)
    if stop is None or isinstance(stop, tarfile.EOFHeaderError):
        return
    if isinstance(stop, (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError)):
        raise ValueError(f"truncated tar: the data ends at byte {tar.offset} without an end-of-archive marker")
    raise ValueError(f"corrupt tar: invalid member header at byte {tar.offset} ({stop})")


def _read_members(tar: tarfile.TarFile) -> dict[str, dict[str, bytes]]:
    """Collect the image and caption members of a streamed tar, grouped by key in first-seen order."""
    samples: dict[str, dict[str, bytes]] = {}
    wanted = frozenset(IMAGE_EXTENSIONS) | frozenset(CAPTION_EXTENSIONS)
    for member in tar:
        if not member.isfile():
            continue  # directories, links, devices carry no sample data
        split = split_member_name(member.name)
        if split is None:
            continue
        key, ext = split
        if ext not in wanted:
            continue  # other members (e.g. .cls, .seg.png) are skipped without being read
        _check_utf8_name(member.name)
        sample = samples.setdefault(key, {})
        if ext in sample:
            # Same key and extension twice: a tar append or a writer bug, and no way to pick.
            kind = "image" if ext in IMAGE_EXTENSIONS else "caption"
            raise ValueError(f"sample {key!r} has two {kind} members {key}.{ext}")
        fh = tar.extractfile(member)
        if fh is None:
            continue
        sample[ext] = fh.read()
    return samples


def read_webdataset(fileobj_or_path: str | os.PathLike[str] | IO[bytes]) -> pa.Table:
    """Read a (possibly compressed) WebDataset tar into a table: id, image, image_ext, caption."""
    if isinstance(fileobj_or_path, (str, os.PathLike)):
        with open(fileobj_or_path, "rb") as fh:
            return read_webdataset(fh)
    try:
        # Stream mode ("r|*") reads strictly forward, so non-seekable fsspec streams work.
        with tarfile.open(fileobj=fileobj_or_path, mode="r|*", tarinfo=_EndTrackingTarInfo) as tar:
            samples = _read_members(tar)
            _check_clean_end(tar)
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise ValueError(f"corrupt or truncated tar: {exc}") from exc
    except OSError as exc:
        # gzip.BadGzipFile and the like; plain I/O errors read the same to the caller.
        raise ValueError(f"corrupt or unreadable tar: {exc}") from exc

    ids: list[str] = []
    images: list[bytes | None] = []
    exts: list[str | None] = []
    captions: list[str | None] = []
    for key, members in samples.items():
        ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
        caption: str | None = None
        if "txt" in members:
            # A stray invalid byte in a caption should not fail the whole shard.
            caption = members["txt"].decode("utf-8", errors="replace").strip()
        elif "json" in members:
            caption = _caption_from_json(members["json"])
        ids.append(key)
        images.append(members[ext] if ext is not None else None)
        exts.append(ext)
        captions.append(caption)
    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "image": pa.array(images, pa.binary()),
            "image_ext": pa.array(exts, pa.string()),
            "caption": pa.array(captions, pa.string()),
        },
        schema=WEBDATASET_SCHEMA,
    )
