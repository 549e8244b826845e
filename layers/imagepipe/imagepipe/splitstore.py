"""What a split keeps between the invocations that split one file (imagepipe.splitter): the duplicate-id index,
each segment's rows.jsonl part and counts, in S3 under the job's prefix - an invocation's memory and /tmp are
gone by the next one.

- IdIndex: which row first used each id, as an open-addressing hash table in two flat arrays (an 8-byte
  digest of the id, a 4-byte row number): ~12-24 bytes a row (the table is kept at most 60 % full), so 1 M
  ids take 24 MB and 10 M ids 192 MB, never the ids themselves. Two different ids share a digest with a
  chance of about n^2 / 2^65 (3e-8 at 1 M rows, 3e-6 at 10 M): the second would be rejected as a duplicate.
- SegmentStore: after segment k (the rows one invocation split), split/index-k.bin (the index so far),
  split/rows-k.jsonl (that segment's lines of rows.jsonl) and split/state-k.json (counts, what the reader
  noticed). Segment k+1 starts from index-k and state-k; a segment re-run after a crash starts from the
  same objects, so what a segment leaves is written once, at its end. The invocation that reaches the end
  of the file streams the parts, then its own, into rows.jsonl (the one object the finisher reads) and
  deletes split/.
"""

from __future__ import annotations

import base64
import hashlib
import json
import tempfile
from array import array
from collections.abc import Iterator
from typing import IO, Any

from boto3.s3.transfer import TransferConfig

from imagepipe.layout import JobLayout
from imagepipe.observability import logger

MAX_LOAD = 0.6
_SUFFIXES = {"rows": ".jsonl", "index": ".bin", "state": ".json"}
_HEADER = 16  # capacity and count, 8 bytes each, before the two arrays
# What goes to and from S3 (rows.jsonl, its parts, the index) moves 5 MB at a time in this thread: the
# defaults' threads hold up to ten 8 MB parts each way and leave the memory they took fragmented (measured:
# +190 MB of RSS at a million rows), more than everything else the splitter holds.
_UPLOAD = TransferConfig(multipart_threshold=5 * 2**20, multipart_chunksize=5 * 2**20, use_threads=False)


class IdIndex:
    """Ids seen so far -> the row that first used each one."""

    def __init__(self, capacity: int = 1 << 16) -> None:
        self._keys = array("Q", bytes(8 * capacity))
        self._rows = array("I", bytes(4 * capacity))
        self.count = 0

    def add(self, row_id: str, row: int) -> int | None:
        """None for an id not seen before (now recorded for `row`), else the row that used it first."""
        digest = hashlib.blake2b(row_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
        key = int.from_bytes(digest, "little") or 1  # 0 marks an empty slot
        keys = self._keys
        mask = len(keys) - 1
        slot = key & mask
        while True:
            found = keys[slot]
            if found == 0:
                break
            if found == key:
                return self._rows[slot]
            slot = (slot + 1) & mask
        keys[slot], self._rows[slot] = key, row
        self.count += 1
        if self.count > len(keys) * MAX_LOAD:
            self._grow()
        return None

    def _grow(self) -> None:
        old_keys, old_rows = self._keys, self._rows
        self._keys = array("Q", bytes(16 * len(old_keys)))
        self._rows = array("I", bytes(8 * len(old_keys)))
        keys, rows, mask = self._keys, self._rows, len(self._keys) - 1
        for key, row in zip(old_keys, old_rows, strict=True):
            if key:
                slot = key & mask
                while keys[slot]:
                    slot = (slot + 1) & mask
                keys[slot], rows[slot] = key, row

    def write(self, file: IO[bytes]) -> None:
        file.write(len(self._keys).to_bytes(8, "little") + self.count.to_bytes(8, "little"))
        self._keys.tofile(file)
        self._rows.tofile(file)

    @classmethod
    def read(cls, file: IO[bytes]) -> IdIndex:
        header = file.read(_HEADER)
        capacity, count = int.from_bytes(header[:8], "little"), int.from_bytes(header[8:], "little")
        index = cls(1)
        index._keys, index._rows = array("Q"), array("I")
        index._keys.fromfile(file, capacity)
        index._rows.fromfile(file, capacity)
        index.count = count
        return index


class SegmentStore:
    """A split's segments in the output bucket (jobs/{job}/split/)."""

    def __init__(self, s3: Any, bucket: str, job_id: str) -> None:
        self._s3, self._bucket = s3, bucket
        self._layout = JobLayout(job_id)
        self._prefix = f"{self._layout.prefix}split/"

    def _key(self, kind: str, segment: int) -> str:
        return f"{self._prefix}{kind}-{segment:05d}{_SUFFIXES[kind]}"

    def save(self, segment: int, rows: IO[bytes], index: IdIndex, state: dict[str, Any]) -> None:
        """What segment `segment` leaves for the next (its rows' lines, the index so far, the counts)."""
        rows.seek(0)
        self._s3.upload_fileobj(rows, self._bucket, self._key("rows", segment), Config=_UPLOAD)
        with tempfile.TemporaryFile() as file:  # on /tmp: the index is never held twice in memory
            index.write(file)
            file.seek(0)
            self._s3.upload_fileobj(file, self._bucket, self._key("index", segment), Config=_UPLOAD)
        state = {**state, "unknown_seen": base64.b64encode(state.get("unknown_seen", b"")).decode()}
        self._s3.put_object(
            Bucket=self._bucket, Key=self._key("state", segment), Body=json.dumps(state).encode()
        )

    def load(self, segment: int) -> tuple[IdIndex, dict[str, Any]]:
        """The index and counts segment `segment` left (an empty index and no counts before segment 0)."""
        if segment < 0:
            return IdIndex(), {}
        body = self._s3.get_object(Bucket=self._bucket, Key=self._key("state", segment))["Body"]
        state = json.loads(body.read())
        state["unknown_seen"] = base64.b64decode(state.get("unknown_seen", ""))
        with tempfile.TemporaryFile() as file:
            self._s3.download_fileobj(self._bucket, self._key("index", segment), file, Config=_UPLOAD)
            file.seek(0)
            index = IdIndex.read(file)
        return index, state

    def assemble(self, segments: int, last: IO[bytes]) -> None:
        """rows.jsonl: the parts of segments 0 .. segments-1, then `last` (this invocation's), streamed."""
        last.seek(0)
        if segments == 0:
            self._s3.upload_fileobj(
                last,
                self._bucket,
                self._layout.rows_key,
                ExtraArgs={"ContentType": "application/x-ndjson"},
                Config=_UPLOAD,
            )
            return
        parts = [self._key("rows", k) for k in range(segments)]
        self._s3.upload_fileobj(
            _Chain(self._bodies(parts), last),
            self._bucket,
            self._layout.rows_key,
            ExtraArgs={"ContentType": "application/x-ndjson"},
            Config=_UPLOAD,
        )

    def _bodies(self, keys: list[str]) -> Iterator[bytes]:
        for key in keys:
            yield from self._s3.get_object(Bucket=self._bucket, Key=key)["Body"].iter_chunks(2**20)

    def clean(self, segments: int) -> None:
        """The parts are in rows.jsonl now. Best effort: a part left behind costs storage, nothing else."""
        try:
            keys = [self._key(kind, k) for k in range(segments) for kind in ("rows", "index", "state")]
            for start in range(0, len(keys), 1000):
                self._s3.delete_objects(
                    Bucket=self._bucket,
                    Delete={"Objects": [{"Key": key} for key in keys[start : start + 1000]], "Quiet": True},
                )
        except Exception:  # noqa: BLE001
            logger.warning("could not delete the split's parts", extra={"prefix": self._prefix})


class _Chain:
    """A file-like object reading S3 bodies' chunks and then a local file, for upload_fileobj."""

    def __init__(self, chunks: Iterator[bytes], last: IO[bytes]) -> None:
        self._chunks: Iterator[bytes] | None = chunks
        self._last, self._buffer = last, bytearray()

    def read(self, size: int = -1) -> bytes:
        while self._chunks is not None and (size < 0 or len(self._buffer) < size):
            chunk = next(self._chunks, None)
            if chunk is None:
                self._chunks = None
            else:
                self._buffer += chunk
        if self._chunks is None and (size < 0 or len(self._buffer) < size):
            self._buffer += self._last.read(-1 if size < 0 else size - len(self._buffer))
        cut = len(self._buffer) if size < 0 else size
        data = bytes(self._buffer[:cut])
        del self._buffer[:cut]
        return data
