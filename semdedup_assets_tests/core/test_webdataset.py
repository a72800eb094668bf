"""Tests for reading WebDataset tar shards into an Arrow table."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from semdedup_assets.core.io.webdataset import WEBDATASET_SCHEMA, read_webdataset, split_member_name


def image_bytes(fmt: str, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    """A small solid-colour image encoded as `fmt`."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), color).save(buf, fmt)
    return buf.getvalue()


def make_tar(members: list[tuple[str, bytes]], mode: str = "w") -> bytes:
    """An in-memory tar with the given (name, payload) file members, plus a directory entry."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        dir_info = tarfile.TarInfo("000")
        dir_info.type = tarfile.DIRTYPE
        tar.addfile(dir_info)
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


class ForwardOnly(io.RawIOBase):
    """A non-seekable byte stream, like an fsspec HTTP/S3 file opened for streaming."""

    def __init__(self, data: bytes) -> None:
        self._buf = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readinto(self, b: bytearray) -> int:  # type: ignore[override]
        chunk = self._buf.read(min(len(b), 1000))  # short reads, as networks do
        b[: len(chunk)] = chunk
        return len(chunk)


JPG, PNG, WEBP = image_bytes("JPEG"), image_bytes("PNG"), image_bytes("WEBP")


def test_split_member_name() -> None:
    assert split_member_name("000/abc.jpg") == ("000/abc", "jpg")
    assert split_member_name("a/b/c.seg.PNG") == ("a/b/c", "seg.png")
    assert split_member_name("abc") == ("abc", "")
    assert split_member_name("dir/._abc.jpg") is None


def test_reads_images_captions_nested_keys_in_order() -> None:
    data = make_tar(
        [
            ("000/b.jpg", JPG),
            ("000/b.txt", b" a red square \n"),
            ("000/a.png", PNG),
            ("000/a.json", json.dumps({"caption": "from json caption", "text": "ignored"}).encode()),
            ("001/c.webp", WEBP),
            ("001/c.json", json.dumps({"text": "from json text"}).encode()),
            ("001/d.txt", b"caption only, no image"),
            ("001/e.jpeg", JPG),
            ("001/e.cls", b"7"),  # not a payload we read
        ]
    )
    table = read_webdataset(io.BytesIO(data))
    assert table.schema.equals(WEBDATASET_SCHEMA)
    assert table.column("id").to_pylist() == ["000/b", "000/a", "001/c", "001/d", "001/e"]
    assert table.column("image_ext").to_pylist() == ["jpg", "png", "webp", None, "jpeg"]
    assert table.column("caption").to_pylist() == [
        "a red square",
        "from json caption",
        "from json text",
        "caption only, no image",
        None,
    ]
    images = table.column("image").to_pylist()
    assert images[0] == JPG and images[1] == PNG and images[2] == WEBP and images[4] == JPG
    assert images[3] is None
    # The payloads really are the images that were written.
    assert Image.open(io.BytesIO(images[2])).format == "WEBP"


def test_non_adjacent_members_of_one_key_are_merged() -> None:
    data = make_tar([("a.txt", b"cap a"), ("b.jpg", JPG), ("a.jpg", JPG), ("b.txt", b"cap b")])
    table = read_webdataset(io.BytesIO(data))
    assert table.to_pylist() == [
        {"id": "a", "image": JPG, "image_ext": "jpg", "caption": "cap a"},
        {"id": "b", "image": JPG, "image_ext": "jpg", "caption": "cap b"},
    ]


def test_extension_priority_between_different_image_members() -> None:
    data = make_tar([("k.png", PNG), ("k.jpg", JPG), ("m.webp", WEBP), ("m.png", PNG)])
    table = read_webdataset(io.BytesIO(data))
    assert table.column("image_ext").to_pylist() == ["jpg", "png"]
    assert table.column("image").to_pylist() == [JPG, PNG]


def test_same_image_member_twice_is_an_error_naming_the_key() -> None:
    data = make_tar([("000/k.jpg", JPG), ("000/x.jpg", JPG), ("000/k.jpg", JPG)])
    with pytest.raises(ValueError, match=r"'000/k'.*two image members"):
        read_webdataset(io.BytesIO(data))


def test_json_without_caption_fields_or_broken_json_gives_null_caption() -> None:
    data = make_tar(
        [
            ("a.jpg", JPG),
            ("a.json", json.dumps({"width": 8}).encode()),
            ("b.jpg", JPG),
            ("b.json", b"{not json"),
            ("c.jpg", JPG),
            ("c.json", json.dumps(["caption"]).encode()),
            ("d.jpg", JPG),
            ("d.txt", b"bad \xff byte"),
        ]
    )
    captions = read_webdataset(io.BytesIO(data)).column("caption").to_pylist()
    assert captions == [None, None, None, "bad \ufffd byte"]


def test_hidden_files_and_unknown_extensions_are_skipped() -> None:
    data = make_tar([("._a.jpg", b"resource fork"), ("a.jpg", JPG), ("README", b"hi"), ("b.cls", b"1")])
    table = read_webdataset(io.BytesIO(data))
    assert table.column("id").to_pylist() == ["a"]


def member_offsets(data: bytes) -> dict[str, tuple[int, int, int]]:
    """(header offset, data offset, size) of every member of an uncompressed tar."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: (m.offset, m.offset_data, m.size) for m in tar.getmembers()}


@pytest.mark.parametrize("where", ["inside data", "inside header", "at a header", "no end marker"])
def test_truncated_tar_raises_value_error(where: str) -> None:
    data = make_tar([("a.jpg", JPG), ("b.png", PNG), ("c.webp", WEBP)])
    header, payload, size = member_offsets(data)["b.png"]
    cut = {
        "inside data": payload + size // 2,
        "inside header": header + 100,
        "at a header": header,  # a cut on a block boundary: only the missing end marker tells
        "no end marker": member_offsets(data)["c.webp"][1] + 512,
    }[where]
    with pytest.raises(ValueError, match="truncated tar"):
        read_webdataset(io.BytesIO(data[:cut]))


def test_corrupt_member_header_raises_value_error() -> None:
    data = bytearray(make_tar([("a.jpg", JPG), ("b.png", PNG), ("c.webp", WEBP)]))
    header = member_offsets(bytes(data))["b.png"][0]
    data[header + 148 : header + 156] = b"garbage!"  # the header checksum field
    with pytest.raises(ValueError, match="corrupt tar"):
        read_webdataset(io.BytesIO(bytes(data)))


def test_single_end_of_archive_block_is_accepted() -> None:
    data = make_tar([("a.jpg", JPG)])
    _, payload, size = member_offsets(data)["a.jpg"]
    one_block = data[: payload + -(-size // 512) * 512 + 512]  # padded payload, then one zero block
    assert read_webdataset(io.BytesIO(one_block)).column("id").to_pylist() == ["a"]


def test_truncated_gzip_tar_and_garbage_raise_value_error() -> None:
    data = make_tar([("a.jpg", JPG), ("b.png", PNG)], mode="w:gz")
    assert read_webdataset(io.BytesIO(data)).num_rows == 2  # compressed shards work
    with pytest.raises(ValueError, match="tar"):
        read_webdataset(io.BytesIO(data[: len(data) // 2]))
    with pytest.raises(ValueError, match="tar"):
        read_webdataset(io.BytesIO(b"this is not a tar file at all" * 40))
    with pytest.raises(ValueError, match="tar"):
        read_webdataset(io.BytesIO(b""))


def test_reads_from_a_path_and_from_a_non_seekable_stream(tmp_path: Path) -> None:
    data = make_tar([("x/1.jpg", JPG), ("x/1.txt", b"one"), ("x/2.png", PNG)])
    path = tmp_path / "shard-000.tar"
    path.write_bytes(data)
    from_path = read_webdataset(path)
    from_str = read_webdataset(str(path))
    stream = io.BufferedReader(ForwardOnly(data))
    assert not stream.seekable()
    from_stream = read_webdataset(stream)
    assert from_path.equals(from_str) and from_path.equals(from_stream)
    assert from_path.num_rows == 2


def test_empty_archive_gives_empty_table_with_schema() -> None:
    table = read_webdataset(io.BytesIO(make_tar([])))
    assert table.num_rows == 0
    assert table.schema.equals(WEBDATASET_SCHEMA)
    assert table.column("image").type == pa.binary()


def test_long_member_names_use_extended_headers() -> None:
    key = "/".join(["very-long-directory-name"] * 6) + "/sample"  # > 100 chars: a PAX header
    data = make_tar([(f"{key}.jpg", JPG), (f"{key}.txt", b"long")])
    table = read_webdataset(io.BytesIO(data))
    assert table.to_pylist() == [{"id": key, "image": JPG, "image_ext": "jpg", "caption": "long"}]
