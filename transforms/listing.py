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
  neither generation nor crc32c. A listing that runs past _SPLIT_AFTER_PAGES pages is split by name
  into ranges (`startOffset`, `endOffset`) listed by up to LIST_THREADS threads at once (`_list_gcs`),
  so a bucket of millions of objects is not one request after another;
- any other Beam filesystem: Beam's match, `size` and `mtime` (seconds, as Beam reports it).

Globs mean what Beam's FileSystems.match makes of them (`FileSystem.translate_pattern`: `*` within a
folder, `**` across folders, `?`, `[...]`), from the prefix before the first glob character.
`match_pattern(pattern)` is the same thing as a plain function, for tests and the launch checks.
"""

import concurrent.futures
import os
import queue
import re
import threading
from typing import Iterator, NamedTuple, Optional, Tuple

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystem import FileSystem
from apache_beam.io.filesystems import FileSystems

from transforms import read  # its client, and the store's retry policy installed

_GCS = "gs://"
PAGE_SIZE = 1000  # GCS's most per list request
_FIELDS = "items(name,size,generation,crc32c,md5Hash),nextPageToken"
LIST_THREADS = 8  # list requests in flight at once for one pattern, once its listing is split
_SPLIT_AFTER_PAGES = 32  # pages listed in all before the first split: a listing of up to 32,000 objects is one range
_QUEUED_PAGES = 2 * LIST_THREADS  # pages listed and not yet taken, before the listing threads wait
_WAIT = 0.5  # seconds a listing thread waits on a full queue before it looks whether it should stop
_MAX_CHAR = 0x10FFFF
_FIRST_ASCII_ABOVE = 0x80  # split points are sought among ASCII characters first, as most names are


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
  """gs:// objects matching `pattern`, one list request per PAGE_SIZE objects under its prefix
  (and, past _SPLIT_AFTER_PAGES pages, one more for each range a split starts that ends a page short)."""
  bucket, _, name_pattern = pattern[len(_GCS):].partition("/")
  prefix = _prefix(name_pattern)
  regex = _regex(pattern)
  for page in _list_gcs(bucket, prefix):
    for name, listed in page:
      uri = f"{_GCS}{bucket}/{name}"
      if regex.fullmatch(uri) and not name.endswith("/"):
        yield uri, listed


def _char(code: int, above: int, below: Optional[int]) -> Optional[str]:
  """chr(code), moved out of the surrogates (no name holds one), if still strictly between `above`
  and `below` (None: no bound); else None."""
  if 0xD800 <= code <= 0xDFFF:
    code = 0xD7FF if 0xD7FF > above else 0xE000
  return chr(code) if above < code and (below is None or code < below) else None


def _between(low: str, high: Optional[str]) -> Optional[str]:
  """A name strictly between `low` and `high` (None: no bound above) in GCS's listing order, which
  is by UTF-8 bytes, so by code points, as Python compares str: near the middle of what lies
  between them, among ASCII characters first. None where no such name is worth a request."""
  i = 0
  while True:
    if i >= len(low):  # past low's end: low + any character (not a control character) is above it
      return low + c if (c := _char((0x1F + (_FIRST_ASCII_ABOVE if high is None else ord(high[i]))) // 2, 0x1F,
                                    None if high is None else ord(high[i]))) else None
    a = ord(low[i])
    if high is None:
      top = _top_above(a)
      if top - a >= 2:
        return low[:i] + _char((a + top) // 2, a, top)
      i += 1  # low's character is the highest there is: look past it
      continue
    b = ord(high[i])
    if a == b:
      i += 1
      continue
    if b - a >= 2 and (c := _char((a + b) // 2, a, b)):
      return low[:i] + c
    # Neighbours (or only surrogates between): every name that goes on from low[:i + 1] is below high.
    high = None
    i += 1


def _top_above(code: int) -> int:
  """Past the ASCII characters where `code` is one below their top, else past every character."""
  return _FIRST_ASCII_ABOVE if code < _FIRST_ASCII_ABOVE - 1 else _MAX_CHAR + 1


def _class_top(code: int) -> int:
  """The code point just above the class of characters that `code` is in (digits; ASCII letters of
  its case; else ASCII, else all): where the names' next character likely stops."""
  if 0x30 <= code <= 0x39:
    return 0x3A
  if 0x61 <= code <= 0x7A:
    return 0x7B
  if 0x41 <= code <= 0x5A:
    return 0x5B
  return _top_above(code)


def _split_points(first: str, last: str, high: Optional[str], most: int) -> list:
  """Up to `most` names, ascending, strictly between `last` and `high` (None: no bound), where a range
  whose page ran from `first` to `last` splits into that many more ranges.

  One candidate a character position: from two before where `first` and `last` part (the page's
  names varied from there on) leftwards, each halfway between `last`'s character there and the top
  of its class (for a digit, just above "9"); the leftmost ones (the widest ranges) are taken. A name
  split at several places gallops: on folders of numbered files the new ranges start in the same
  folder, the next folders and the ones after those, so whatever the shape, one split lands near the
  names ahead, and one that lands past every name costs one request that finds nothing. With no
  candidate, one split at `_between`. Simulated (`benchmarks/listing.py --simulate`) on sequential
  numbers, uuids, numbered folders and dated folders, with the first split after 32 pages, 8 threads
  list 300,000 names in 0.24-0.28 of one range's time for 9-42% more requests than pages, and
  1,000,000 in 0.16-0.17 for 4-13% more; a listing of up to 32 pages is one range."""
  parted = len(os.path.commonprefix([first, last]))
  bounded = len(os.path.commonprefix([last, high])) if high is not None else 0
  points = []
  for p in range(min(parted - 2, len(last) - 1), bounded - 1, -1):
    a = ord(last[p])
    top = _class_top(a)
    if high is not None and p == bounded:
      top = min(top, ord(high[p]))
    if top - a >= 2 and (c := _char((a + top) // 2, a, top)):
      points.append(last[:p] + c)  # each further left is above the one before
  if not points and (between := _between(last, high)) is not None:
    points.append(between)
  return points[-most:] if most > 0 else []


def _above_prefix(prefix: str) -> Optional[str]:
  """The least name above every name that starts with `prefix` (None: the prefix bounds nothing)."""
  for i in range(len(prefix) - 1, -1, -1):
    if (c := _char(ord(prefix[i]) + 1, ord(prefix[i]), _MAX_CHAR + 1)) is not None:
      return prefix[:i] + c
  return None


class _Split(NamedTuple):
  """A queue message: one more range is being listed."""


class _Done(NamedTuple):
  """A queue message: a range is listed to its end (error: or it failed with that)."""
  error: Optional[BaseException] = None


def _listed(blob) -> Tuple[str, Listed]:
  return blob.name, Listed(size=int(blob.size or 0), generation=int(blob.generation), crc32c=blob.crc32c,
                           md5=blob.md5_hash)


def _list_gcs(bucket: str, prefix: str) -> Iterator[list]:
  """Pages (lists of (name, Listed)) of every object under `prefix`, each object once, in no set order.
  A page waits in the queue as these small tuples, not as google-cloud-storage's Blobs.

  One range, all of the prefix, is listed page by page as google-cloud-storage lists. Once
  `_SPLIT_AFTER_PAGES` pages are listed, a range with more pages after the one it got, while fewer
  than LIST_THREADS ranges are being listed, is split: names between its last object and its end
  (`_split_points`) start new ranges, each listed by another thread with `startOffset` (inclusive)
  and the next one's start, or the old end, as `endOffset` (exclusive); the range itself stops at the
  first name at or above the first of them. Ranges split until the threads are busy, so the names'
  shape decides where. Each request runs under the store's retry policy and outage deadline
  (read._gcs_client); the first range to fail stops the listing with its error."""
  pages = queue.Queue(_QUEUED_PAGES)
  stop = threading.Event()
  listing = [1, 0]  # ranges being listed (a thread of each, or one queued to start); pages listed
  lock = threading.Lock()
  above_prefix = _above_prefix(prefix)  # the first range's end, as a split sees it
  threads = concurrent.futures.ThreadPoolExecutor(LIST_THREADS, thread_name_prefix="list")

  def put(message) -> bool:
    while not stop.is_set():
      try:
        pages.put(message, timeout=_WAIT)
        return True
      except queue.Full:
        continue
    return False

  def split(first: str, last: str, end: Optional[str]) -> Optional[str]:
    """The range's new end, where it was split (new ranges from there to `end`), else None."""
    with lock:
      listing[1] += 1
      if listing[1] < _SPLIT_AFTER_PAGES:
        return None
      starts = _split_points(first, last, end if end is not None else above_prefix, LIST_THREADS - listing[0])
      for _ in starts:
        if not put(_Split()):
          return None  # stopped: nothing more is listed
      listing[0] += len(starts)
    for start, until in zip(starts, starts[1:] + [end]):
      threads.submit(list_range, start, until)
    return starts[0] if starts else None

  def list_range(start: Optional[str], end: Optional[str]):
    error = None
    try:
      client, retry = read._gcs_client()
      blobs = client.list_blobs(bucket, prefix=prefix, start_offset=start, end_offset=end, page_size=PAGE_SIZE,
                                fields=_FIELDS, retry=retry)
      for page in blobs.pages:
        page = [_listed(blob) for blob in page]
        below = page if end is None else [item for item in page if item[0] < end]
        if (below and not put(below)) or len(below) < len(page) or not blobs.next_page_token:
          break  # stopped, or at a split's start, or listed to the end
        if page:  # (GCS may answer a page with no object and a token for the next)
          end = split(page[0][0], page[-1][0], end) or end
    except Exception as e:  # noqa: BLE001 - the listing's caller raises it
      error = e
    finally:
      with lock:
        listing[0] -= 1
      put(_Done(error))

  threads.submit(list_range, None, None)
  try:
    ranges = 1
    while ranges:
      message = pages.get()
      if isinstance(message, _Split):
        ranges += 1
      elif isinstance(message, _Done):
        ranges -= 1
        if message.error is not None:
          raise message.error
      else:
        yield message
  finally:
    stop.set()
    threads.shutdown(wait=False, cancel_futures=True)


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
