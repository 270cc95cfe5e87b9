"""Listing: the --input globs matched, each object with what the store's listing said of it (`Listed`).

Interface (the graph's MatchInputs; --previous and --resume reuse a row unread when `same_object`):

    pcoll = p | ListInputs(["gs://b/photos/**/*.jpg", "/data/*.png"])
    # -> (uri, Listed) per matched object, each uri once

Each output row records its listing (`LISTING_FIELD`, a nullable struct column `listing`), so the
next run can compare without reading the object.

`Listed` carries, by scheme:
- local paths: `size` and `mtime_ns` (os.stat's st_mtime_ns);
- gs://: `size`, `generation`, `crc32c` (base64, as GCS gives it) and `md5` when the object has one;
  listed with google-cloud-storage's `list_blobs(prefix=...)`, page by page (one request per 1,000
  objects), under transforms/store.py's retry policy and outage deadline; Beam's match would give
  neither generation nor crc32c;
- any other Beam filesystem: Beam's match, `size` and `mtime` (seconds, as Beam reports it).

Globs mean what Beam's FileSystems.match makes of them (`FileSystem.translate_pattern`: `*` within a
folder, `**` across folders, `?`, `[...]`), from the prefix before the first glob character.
`match_pattern(pattern)` is the same thing as a plain function, for tests and the launch checks.
"""

import os
import re
from typing import Iterator, NamedTuple, Optional, Tuple

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystem import FileSystem
from apache_beam.io.filesystems import FileSystems

from transforms import read  # its client, and the store's retry policy installed

_GCS = "gs://"
PAGE_SIZE = 1000  # GCS's most per list request
_FIELDS = "items(name,size,generation,crc32c,md5Hash),nextPageToken"


class Listed(NamedTuple):
  """What one listing said of one object; two equal values mean the same object, unchanged.

  A NamedTuple, not a dataclass: one rides with every object through the listing and the reuse
  join, pickled at each of the local runner's stage boundaries, and a tuple pickles and loads in
  a third of a dataclass's time (no __reduce__ or __init__ of ours per object)."""
  size: int
  mtime_ns: Optional[int] = None  # local files
  generation: Optional[int] = None  # gs://
  crc32c: Optional[str] = None  # gs://, base64
  md5: Optional[str] = None  # gs://, base64, absent for composite objects
  mtime: Optional[float] = None  # other filesystems: seconds, as Beam's match gives


  def as_row(self) -> dict:
    return dict(zip(self._fields, self))

LISTING_TYPE = pa.struct([
    pa.field("size", pa.int64()), pa.field("mtime_ns", pa.int64()), pa.field("generation", pa.int64()),
    pa.field("crc32c", pa.string()), pa.field("md5", pa.string()), pa.field("mtime", pa.float64())])
LISTING_FIELD = pa.field("listing", LISTING_TYPE, nullable=True)


def listing_array(listings) -> pa.Array:
  """The `listing` column for `Listed`s (None where an input had no listing: bytes, a manifest row)."""
  return pa.array([None if each is None else each.as_row() for each in listings], LISTING_TYPE)


def from_row(row) -> Optional[Listed]:
  """A `listing` column value (a dict, or None) back as a Listed."""
  if not row or row.get("size") is None:
    return None
  return Listed(*[row.get(name) for name in Listed._fields])


def same_object(before: Optional[Listed], now: Optional[Listed]) -> bool:
  """True when two listings show the same bytes without reading them:
  - gs://: the same generation, or the same size and md5 (else crc32c) of the content;
  - local files: the same size and st_mtime_ns;
  - other filesystems: the same size and modification time, where the listing gives one.
  A missing listing on either side is never the same object: that input is read."""
  if before is None or now is None or before.size != now.size:
    return False
  if before.generation is not None and before.generation == now.generation:
    return True
  if before.md5 is not None or now.md5 is not None:
    return before.md5 == now.md5 and now.md5 is not None
  if before.crc32c is not None and before.crc32c == now.crc32c:
    return True
  if before.mtime_ns is not None and before.mtime_ns == now.mtime_ns:
    return True
  return before.mtime is not None and before.mtime == now.mtime and before.generation is None


def _prefix(pattern: str) -> str:
  return re.match(r"^[^[*?]*", pattern).group(0)


def _regex(pattern: str):
  return re.compile(FileSystem.translate_pattern(pattern))


def match_gcs(pattern: str) -> Iterator[Tuple[str, Listed]]:
  """gs:// objects matching `pattern`, one list request per PAGE_SIZE objects under its prefix."""
  bucket, _, name_pattern = pattern[len(_GCS):].partition("/")
  prefix = _prefix(name_pattern)
  regex = _regex(pattern)
  client, retry = read._gcs_client()
  blobs = client.list_blobs(bucket, prefix=prefix, page_size=PAGE_SIZE, fields=_FIELDS, retry=retry)
  for page in blobs.pages:
    for blob in page:
      uri = f"{_GCS}{bucket}/{blob.name}"
      if regex.fullmatch(uri) and not blob.name.endswith("/"):
        yield uri, Listed(size=int(blob.size or 0), generation=int(blob.generation), crc32c=blob.crc32c,
                          md5=blob.md5_hash)


def match_local(pattern: str) -> Iterator[Tuple[str, Listed]]:
  """Local files matching `pattern`, with os.stat's size and st_mtime_ns (one scandir per folder)."""
  prefix = _prefix(pattern)
  if prefix == pattern:  # no glob character: the file itself
    if os.path.isfile(pattern):
      stat = os.stat(pattern)
      yield pattern, Listed(size=stat.st_size, mtime_ns=stat.st_mtime_ns)
    return
  regex = _regex(pattern)
  top = prefix if prefix.endswith(os.sep) else (os.path.dirname(prefix) or ".")
  stack = [top]
  while stack:
    folder = stack.pop()
    try:
      entries = list(os.scandir(folder))
    except OSError:  # a folder that vanished or cannot be read: as Beam's match, not listed
      continue
    for entry in sorted(entries, key=lambda e: e.name, reverse=True):
      path = entry.name if folder == "." else os.path.join(folder, entry.name)
      if entry.is_dir(follow_symlinks=True):
        stack.append(path)
      elif regex.fullmatch(path):
        stat = entry.stat()
        yield path, Listed(size=stat.st_size, mtime_ns=stat.st_mtime_ns)


def match_other(pattern: str) -> Iterator[Tuple[str, Listed]]:
  for metadata in FileSystems.match([pattern])[0].metadata_list:
    yield metadata.path, Listed(size=metadata.size_in_bytes, mtime=metadata.last_updated_in_seconds)


def match_pattern(pattern: str) -> Iterator[Tuple[str, Listed]]:
  """(uri, Listed) for each object `pattern` matches, by its scheme."""
  if pattern.startswith(_GCS):
    return match_gcs(pattern)
  if FileSystems.get_scheme(pattern) is None:
    return match_local(pattern)
  return match_other(pattern)


class ListInputs(beam.PTransform):
  """Globs in (the constructor's), (uri, Listed) out: each matched object once."""

  def __init__(self, patterns):
    super().__init__()
    self._patterns = list(patterns)

  def expand(self, pbegin):
    listed = (pbegin
              | "Patterns" >> beam.Create(self._patterns)
              | "Match" >> beam.FlatMap(match_pattern))
    if len(self._patterns) <= 1:
      return listed
    # A file matched by two globs is one input; its listing is the same either way.
    return (listed
            | "ByUri" >> beam.GroupByKey()
            | "Once" >> beam.Map(lambda kv: (kv[0], next(iter(kv[1])))))
