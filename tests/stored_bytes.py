"""Everything a file on disk says, for tests that search the platform's files for values that must not
be there (tests/integration/test_privacy_proof.py). A raw byte search alone would miss a value that a
store compressed, so each file also yields its decompressed forms:

- Kafka log segments (`<20 digits>.log`): every record batch, decompressed (zstd, lz4, gzip);
- ClickHouse column files (`*.bin`, `*.cmrk*` excluded): every compressed block (LZ4, ZSTD, none);
- zstd and gzip files (backups): decompressed;
- RocksDB databases: every value, read through RocksDB (its blocks may be compressed).

Index files without data (Kafka's offset and time indexes, ClickHouse marks) are skipped."""

from __future__ import annotations

import gzip
import re
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import lz4.block
import lz4.frame
import zstandard

KAFKA_SEGMENT = re.compile(r"^\d{20}\.log(\.deleted|\.cleaned|\.swap)?$")
SKIPPED_SUFFIXES = (".index", ".timeindex", ".mrk", ".mrk2", ".mrk3", ".cmrk", ".cmrk2", ".cmrk3", ".snapshot")
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC = b"\x1f\x8b"
MAX_EXPANDED = 512 * 1024 * 1024


@dataclass(frozen=True)
class Finding:
    path: Path
    form: str  # raw, kafka batch, clickhouse block, zstd, gzip, rocksdb
    needle: bytes


def search(root: Path, needles: Iterable[bytes]) -> list[Finding]:
    """Every place under `root` where one of `needles` occurs, in any readable form of any file."""
    wanted = sorted({n for n in needles if n}, key=len, reverse=True)
    if not wanted:
        return []
    pattern = re.compile(b"|".join(re.escape(n) for n in wanted))
    findings: list[Finding] = []
    for path in sorted(root.rglob("*")):
        if path.is_dir() and (path / "CURRENT").exists() and any(path.glob("*.sst")):
            findings += [Finding(path, "rocksdb", m) for m in _matches(pattern, _rocksdb_values(path))]
        if not path.is_file() or path.is_symlink() or path.name.endswith(SKIPPED_SUFFIXES):
            continue
        for form, blob in forms(path):
            findings += [Finding(path, form, m) for m in _matches(pattern, blob)]
    return findings


def forms(path: Path) -> Iterator[tuple[str, bytes]]:
    try:
        data = path.read_bytes()
    except OSError:  # removed while we walked (a segment the broker deleted)
        return
    yield "raw", data
    if KAFKA_SEGMENT.match(path.name):
        yield from (("kafka batch", blob) for blob in kafka_batches(data))
    elif path.suffix == ".bin":
        yield "clickhouse blocks", b"".join(clickhouse_blocks(data))
    elif data.startswith(ZSTD_MAGIC):
        yield "zstd", _zstd(data)
    elif data.startswith(GZIP_MAGIC):
        try:
            yield "gzip", gzip.decompress(data)
        except (OSError, EOFError, zlib.error):
            pass


def kafka_batches(data: bytes) -> Iterator[bytes]:
    """The records section of every v2 record batch in a segment, decompressed."""
    position = 0
    while position + 61 <= len(data):
        batch_length = struct.unpack_from(">i", data, position + 8)[0]
        if batch_length <= 0:
            break
        end = position + 12 + batch_length
        attributes = struct.unpack_from(">h", data, position + 21)[0]
        records = data[position + 61:end]
        codec = attributes & 0x7
        try:
            if codec == 4:
                yield _zstd(records)
            elif codec == 3:
                yield lz4.frame.decompress(records)
            elif codec == 1:
                yield gzip.decompress(records)
            elif codec == 0:
                yield records
        except Exception:  # noqa: BLE001 - a torn tail batch: the raw form was searched already
            pass
        position = end


def clickhouse_blocks(data: bytes) -> Iterator[bytes]:
    """ClickHouse's compressed file format: blocks of a 16-byte checksum, a method byte, the
    compressed size (header included) and the decompressed size, then the data."""
    position = 0
    while position + 25 <= len(data):
        method = data[position + 16]
        compressed, decompressed = struct.unpack_from("<II", data, position + 17)
        body = data[position + 25:position + 16 + compressed]
        if compressed < 9 or position + 16 + compressed > len(data):
            return
        try:
            if method == 0x82:
                yield lz4.block.decompress(body, uncompressed_size=decompressed)
            elif method == 0x90:
                yield zstandard.ZstdDecompressor().decompress(body, max_output_size=decompressed)
            elif method == 0x02:
                yield body
            else:
                return  # a codec this reader does not know; the raw form was searched
        except Exception:  # noqa: BLE001 - not a compressed file after all
            return
        position += 16 + compressed


def _zstd(data: bytes) -> bytes:
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True)
        return reader.read(MAX_EXPANDED)
    except zstandard.ZstdError:
        return b""


def _rocksdb_values(path: Path) -> bytes:
    from rocksdict import AccessType, Options, Rdict

    try:
        db = Rdict(str(path), options=Options(raw_mode=True), access_type=AccessType.read_only())
    except Exception:  # noqa: BLE001 - not a database this reader can open; its raw files are searched
        return b""
    try:
        return b"\n".join(key + b"=" + value for key, value in db.items())
    finally:
        db.close()


def _matches(pattern: re.Pattern[bytes], blob: bytes) -> set[bytes]:
    return {match.group(0) for match in pattern.finditer(blob)}
