"""Reusing committed rows: one mechanism for --previous (an earlier run's output) and --resume (an
interrupted run's checkpoints).

A committed row is found by reference, never carried by value until it is written again:

1. `CommittedIndex`: per committed Parquet file, its rows' references (`Refs`: uri, position, digest,
   listing), by bucket of the uri; only the `uri`, `sha256` and `listing` columns are read, a row
   group at a time.
2. `decide`: joined by uri with this run's items, a bucket at a time (`ByBucket`, `decide_bucket`):
   what crosses the shuffle is a list per bucket, not an element per object. Where the committed row's listing shows the same
   object as this run's listing (transforms/listing.py: `same_object`), the row is reused unread: a
   `Use` of it, keyed by its file. Otherwise the item goes on with the Refs (`Item.reuse`): the embed
   step reads and hashes the bytes, and reuses the row if they hash the same (`Reused`), else embeds.
   Previous rows of uris no longer listed are `gone`.
3. `WholeFiles`: a committed file every row of which is reused exactly as it is (an `exact` Use: the
   same uri, the same listing, no columns of this run's own), and whose schema is this run's output
   schema, is copied whole by the summary step (`write.number_shards`), not read: on gs:// a copy
   within the store. A file with any other row (changed, gone, touched) is read back as below.
4. `FetchRows`: the `Use`s, ((file, row group), Batch of Uses), grouped by row group; each row group's
   wanted rows read back by position, a slice at a time, as output tables with this run's uri, columns
   and listing. The row groups of files copied whole are only counted.

Memory is one small reference per row (a path, a position, a digest, a listing), never a vector;
the joins are shuffles on Dataflow and the vectors are read back where they are written. A bucket
(`BUCKETS` of them, by a hash of the uri) holds 1/512 of the objects: ~20,000 references for a
bucket of 10M objects, in one worker's memory for its join. What crosses a shuffle is a `Batch`: a
list pickled and, from 2 KB, compressed (zstd): ~2x smaller than the pickle for references, ~3x for items.

Where one process runs the job (the local runner's defaults), `ONE_PROCESS_BUCKETS` buckets: the
local runner holds every element of a shuffle in its memory, each with its own overhead, and one
worker has nothing to spread 512 keys over. With both, an unchanged refresh's peak grows ~0.5 KB a
previous row there, against ~1.7 KB with 512 buckets of plain pickles (benchmarks/README.md).
"""

import contextlib
import pickle
import zlib
from typing import NamedTuple, Optional

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindows

from transforms.listing import from_row, listing_array, same_object
from transforms.write import embeddings_schema

PREVIOUS, RESUME = "previous", "resume"
ROW, ERROR = "row", "error"
_READ_BUFFER = 1 << 20
_GCS_SMALL_READS = 4 << 20
_BATCH_ROWS = 256
BUCKETS = 512  # the join's keys: a list of a bucket's objects crosses the shuffle, not each object
ONE_PROCESS_BUCKETS = 64  # the same, where one process runs every stage (RunConfig.fan_out False)
_FLUSH = 8192  # objects held by one worker before its lists go on, whatever the bundle


class Ref(NamedTuple):
  """Where one committed row is: `path` (a Parquet file), `row` (its position in that file)."""
  source: str  # PREVIOUS or RESUME
  path: str
  row: int
  kind: str  # ROW (an embeddings file) or ERROR (a checkpoint's errors file)
  sha256: str
  listed: object  # transforms.listing.Listed, or None
  group: int = 0  # the row group of `path` that holds `row`

  @property
  def part(self) -> tuple:
    """What reused rows are grouped by to be read back: (path, row group)."""
    return self.path, self.group


class Batch:
  """Values that cross a shuffle together, as one pickle of the list, compressed (`_pack`): Beam's
  coder would pickle a list's values one by one, which is most of what an unchanged refresh costs,
  object by object. Unpickled, a Batch holds those bytes until `values` is read: a stage that only
  moves it on (the local runner's Flatten before a GroupByKey decodes and encodes every element)
  copies bytes, and the local runner's shuffles hold them, not the objects."""

  __slots__ = ("_values", "_blob")

  def __init__(self, values=None, *, blob=None):
    self._values, self._blob = values, blob

  @property
  def values(self) -> list:
    if self._values is None:
      self._values, self._blob = pickle.loads(_unpack(self._blob)), None
    return self._values

  def __reduce__(self):
    blob = self._blob if self._blob is not None else _pack(pickle.dumps(self._values, pickle.HIGHEST_PROTOCOL))
    return _unpickled_batch, (blob,)

  def __eq__(self, other):
    return isinstance(other, Batch) and self.values == other.values

  def __repr__(self):
    return f"Batch({self.values!r})"


_PACK_FROM = 2048  # bytes of pickle; a smaller one is sent as it is


def _pack(raw: bytes) -> bytes:
  """`raw`, a pickle, as a Batch sends it: from _PACK_FROM bytes, b"Z", its length (8 bytes), then zstd at level 1
  (pyarrow's codec); below, the pickle itself (which starts with PROTO, 0x80). Measured on an unchanged refresh's
  lists (30,720 objects): 10.2 MB of pickles to 4.3 MB for ~0.13 s of CPU (zlib level 1: 4.4 MB, 1.6x the time).
  A small pickle is not worth it: --previous-verify's one-item lists, ~35,000 of them, took ~62 us each to
  compress inside the run, 2.2 s of a 7.4 s run."""
  if len(raw) < _PACK_FROM:
    return raw
  return b"Z" + len(raw).to_bytes(8, "little") + pa.compress(raw, "zstd", asbytes=True)


def _unpack(blob: bytes):
  if blob[:1] != b"Z":
    return blob
  return pa.decompress(memoryview(blob)[9:], int.from_bytes(blob[1:9], "little"), "zstd", asbytes=True)


def _unpickled_batch(blob: bytes) -> Batch:
  return Batch(blob=blob)


class Use(NamedTuple):
  """A committed row reused for one uri of this run, with this run's columns and listing (`columns`
  None: the committed row's own, for an image of a shard left unread). `exact`: the output row is
  the committed row as it is (its uri, its listing, no columns of this run's own)."""
  row: int
  kind: str
  source: str
  uri: str
  columns: dict
  listed: object
  exact: bool = False


def use(ref: Ref, item, exact: bool = False) -> tuple:
  """((file, row group), Use) of `ref` for `item` (one of an item's rows: it or a duplicate)."""
  return ref.part, Use(ref.row, ref.kind, ref.source, item.uri, item.columns, item.listed, exact)


@contextlib.contextmanager
def _parquet(path, columns_only=True):
  """A committed Parquet file, read through Beam's filesystems a buffer at a time. On gs://, where only
  a few small columns or the footer are wanted (`columns_only`: the index, the errors' uris, a file's
  schema), gcsio reads _GCS_SMALL_READS bytes at a time instead of its 16 MiB: at 12,288 objects the
  index held 16 MiB chunks of a 28 MB file for three columns of ~1 MB each (main process peak
  272 MB against 238 MB with 4 MiB reads, and 239 against 227 MB at 3,072)."""
  if columns_only and FileSystems.get_scheme(path) == "gs":
    # FileSystems.open's own GcsIO (the store's retry policy installed in it), with a read buffer of our choosing.
    opened = FileSystems.get_filesystem(path)._gcsIO().open(path, "r", read_buffer_size=_GCS_SMALL_READS)
  else:
    opened = FileSystems.open(path, compression_type="uncompressed")
  with opened as handle:
    yield pq.ParquetFile(handle, buffer_size=_READ_BUFFER, pre_buffer=False)


def read_index(entry, source: str):
  """(uri, Ref) of each row of one committed file ((path, kind)); a file without a `listing` column (from before it
  was recorded) gives Refs without listings, so its objects are read."""
  path, kind = entry
  with _parquet(path) as parquet:
    columns = [c for c in ("uri", "sha256", "listing") if c in parquet.schema_arrow.names]
    row = 0
    for group in range(parquet.metadata.num_row_groups):
      for batch in parquet.iter_batches(batch_size=8192, row_groups=[group], columns=columns):
        uris, digests = batch.column("uri").to_pylist(), batch.column("sha256").to_pylist()
        listings = batch.column("listing").to_pylist() if "listing" in columns else [None] * len(uris)
        for uri, sha, listed in zip(uris, digests, listings):
          if sha is not None:  # a read error: never committed with a digest, always retried
            yield uri, Ref(source, path, row, kind, sha, from_row(listed), group)
          row += 1


def bucket_of(uri: str, buckets: int = BUCKETS) -> int:
  """The join's key for a uri: the same for an input and its committed rows, on every worker."""
  return zlib.crc32(uri.encode("utf-8", "surrogatepass")) % buckets


class Refs(NamedTuple):
  """Committed rows of one file whose uris fall in one bucket, by column: a few lists cross the
  shuffle, not a Ref per row."""
  source: str
  path: str
  kind: str
  uris: list
  rows: list
  sha256s: list
  listings: list
  groups: list

  def refs(self, shards_only=False):
    """(uri, Ref) of each row; with `shards_only`, of the rows of shards' images (uri `SHARD#KEY`)."""
    for uri, row, sha256, listed, group in zip(self.uris, self.rows, self.sha256s, self.listings, self.groups):
      if not shards_only or "#" in uri:
        yield uri, Ref(self.source, self.path, row, self.kind, sha256, listed, group)


def bucketed_index(entry, source: str, buckets: int = BUCKETS, flush: int = _FLUSH):
  """(bucket, Batch of one Refs) of one committed file's rows (read_index), a Refs per bucket for every
  `flush` rows: what one worker holds is bounded, however big the file. In a Batch, so that the local
  runner's stages between here and the join (the CoGroupByKey's Flatten) copy its bytes."""
  path, kind = entry
  held, count = {}, 0
  for uri, ref in read_index(entry, source):
    columns = held.get(bucket_of(uri, buckets))
    if columns is None:
      columns = held[bucket_of(uri, buckets)] = ([], [], [], [], [])
    for column, value in zip(columns, (uri, ref.row, ref.sha256, ref.listed, ref.group)):
      column.append(value)
    count += 1
    if count >= flush:
      yield from ((bucket, Batch([Refs(source, path, kind, *columns)])) for bucket, columns in held.items())
      held, count = {}, 0
  yield from ((bucket, Batch([Refs(source, path, kind, *columns)])) for bucket, columns in held.items())


class ByBucket(beam.DoFn):
  """Items in; (bucket, Batch of Items) out: one per bucket for each bundle (and every `flush` items), so
  the join with the committed rows shuffles lists. For the command line's batch graph: its lists are
  in the global window."""

  def __init__(self, buckets: int = BUCKETS, flush: int = _FLUSH):
    self._buckets, self._flush = buckets, flush

  def start_bundle(self):
    self._held, self._count = {}, 0

  def process(self, item):
    self._held.setdefault(bucket_of(item.uri, self._buckets), []).append(item)
    self._count += 1
    if self._count >= self._flush:
      yield from self._lists()

  def finish_bundle(self):
    for element in self._lists():
      yield GlobalWindows.windowed_value(element)

  def _lists(self):
    held, self._held, self._count = self._held, {}, 0
    return ((bucket, Batch(items)) for bucket, items in held.items())


class CommittedIndex(beam.PTransform):
  """(bucket, Batch of Refs) of every row of `files`, a list of (path, kind), for `source`. The files are listed
  at launch; each is read by one worker, only its uri, sha256 and listing columns. `buckets`: ByBucket's."""

  def __init__(self, files, source, buckets: int = BUCKETS):
    super().__init__()
    self._files, self._source, self._buckets = list(files), source, buckets

  def expand(self, pbegin):
    return (pbegin
            | "Files" >> beam.Create(self._files)
            | "Spread" >> beam.Reshuffle()
            | "Index" >> beam.FlatMap(bucketed_index, self._source, self._buckets))


def join_buckets(fan_out: bool) -> int:
  """How many buckets the join by uri has: BUCKETS where workers share the job out, ONE_PROCESS_BUCKETS where
  one process runs it."""
  return BUCKETS if fan_out else ONE_PROCESS_BUCKETS


def _ordered(refs) -> dict:
  """The first Ref of each source, a row before an error (a retried bundle may commit both)."""
  if len(refs) == 1:  # nearly every uri of a refresh: one committed row
    return {refs[0].source: refs[0]}
  chosen = {}
  for ref in sorted(refs, key=lambda r: (r.kind != ROW, r.path, r.row)):
    chosen.setdefault(ref.source, ref)
  return chosen


def decide(uri, items, refs, trust_resume=True, trust_previous=True):
  """One uri's decision, from this run's `items` of it and the committed `refs` of it (lists), as
  (tag, value) pairs: (None, item) for an item to read (with `reuse` set to the Refs it may reuse),
  ("reused", ((file, row group), Use)) for a row reused unread, ("gone", uri) for a uri that only
  --previous has. The interrupted run's row goes first, then --previous's; `trust_*` False
  (--resume-verify, --previous-verify) reads every object."""
  refs = _ordered(refs)
  if not items:
    if PREVIOUS in refs:
      yield "gone", uri
    return
  trusted = {RESUME: trust_resume, PREVIOUS: trust_previous}
  for item in items:
    kept = []
    for source in (RESUME, PREVIOUS):
      ref = refs.get(source)
      if ref is None:
        continue
      if trusted[source] and same_object(ref.listed, item.listed):
        # The item itself (its uri is the committed row's), not a duplicate of it at another uri.
        exact = ref.kind == ROW and not item.columns and ref.listed == item.listed
        for each in item.items():
          yield "reused", use(ref, each, exact and each is item)
        break
      kept.append(ref)
    else:
      yield None, (item.replace(reuse=tuple(kept)) if kept else item)


def decide_bucket(joined, trust_resume=True, trust_previous=True):
  """CoGroupByKey {"items": Batches of Items, "committed": Batches of Refs} by bucket -> what `decide` gives for
  each uri in it (items to read on the main output, "gone" uris tagged), the reused rows tagged "reused" as
  ((file, row group), Batch of Uses): one per committed row group the bucket reuses."""
  _, groups = joined
  committed = {}
  for batch in groups["committed"]:
    for chunk in batch.values:
      for uri, ref in chunk.refs():
        committed.setdefault(uri, []).append(ref)
  items = {}
  for batch in groups["items"]:
    for item in batch.values:
      items.setdefault(item.uri, []).append(item)
  reused = {}
  for uri in (*items, *(uri for uri in committed if uri not in items)):
    for tag, value in decide(uri, items.get(uri, ()), committed.get(uri, ()), trust_resume, trust_previous):
      if tag == "reused":
        part, use_ = value
        reused.setdefault(part, []).append(use_)
      else:
        yield value if tag is None else beam.pvalue.TaggedOutput(tag, value)
  for part, uses in reused.items():
    yield beam.pvalue.TaggedOutput("reused", (part, Batch(uses)))
    yield beam.pvalue.TaggedOutput("parts", part_summary(part, uses))


def shard_refs(entry):
  """(shard path, (uri, Ref)) of each row of a shard's image in one (bucket, Batch of Refs) of the index."""
  for chunk in entry[1].values:
    for uri, ref in chunk.refs(shards_only=True):
      yield uri.rpartition("#")[0], (uri, ref)


def reused_by(item, sha256) -> Optional[Ref]:
  """The Ref of `item.reuse` whose digest the bytes turned out to have."""
  return next((ref for ref in item.reuse if ref.sha256 == sha256), None)


def attach_members(joined, trust_previous=False):
  """CoGroupByKey {"shards", "refs", "damaged"} by shard path -> shard items with `members`: their
  images' Refs by uri, an interrupted run's first.

  With `trust_previous`, a shard whose listing is the one every --previous row of its images
  recorded, with no error row of it in --previous and no row of it in an interrupted run, is not
  read at all: each of those rows is reused ("reused" (file, Batch of Uses), columns from the
  committed row), and its images are counted ("shard_count": shard, found, seen), as the shard's
  reader would have. An unchanged shard holds the same images, and the previous run made a row
  for each of them (an image that failed has an error row, which keeps the shard read)."""
  _, groups = joined
  by_uri = {}
  for uri, ref in groups["refs"]:
    by_uri.setdefault(uri, []).append(ref)
  members = {uri: tuple(ref for source, ref in sorted(_ordered(refs).items(), key=lambda kv: kv[0] != RESUME))
             for uri, refs in by_uri.items()}
  damaged = any(True for _ in groups.get("damaged", ()))
  for item in groups["shards"]:
    if trust_previous and not damaged and _unchanged_shard(item, members):
      by_part = {}
      for uri, refs in members.items():
        by_part.setdefault(refs[0].part, []).append(Use(refs[0].row, ROW, PREVIOUS, uri, None, item.listed))
      for part, uses in by_part.items():
        yield beam.pvalue.TaggedOutput("reused", (part, Batch(uses)))
      yield beam.pvalue.TaggedOutput("shard_count", (item.uri, len(members), len(members)))
      continue
    yield item.replace(members=members) if members else item


def _unchanged_shard(item, members) -> bool:
  """Whether every image of the shard has a --previous row made from this very listing of it."""
  if item.listed is None or not members or item.row_groups is not None:
    return False
  return all(len(refs) == 1 and refs[0].source == PREVIOUS and refs[0].kind == ROW
             and same_object(refs[0].listed, item.listed) for refs in members.values())


def error_uris(path):
  """(shard path, uri) of each error row of one --previous errors file: a shard with one is read again
  (its failed images are retried, as loose files that failed are)."""
  with _parquet(path) as parquet:
    for batch in parquet.iter_batches(batch_size=8192, columns=["uri"]):
      for uri in batch.column("uri").to_pylist():
        yield (uri.rpartition("#")[0] or uri), uri


# --- committed files reused whole -----------------------------------------------------


def part_summary(part, uses) -> tuple:
  """(file, (row group, positions of its exact Uses, how many other Uses)): what `WholeFiles` decides
  a file by, a few bytes a row, without the Uses."""
  (path, group), exact = part, [u.row for u in uses if u.exact]
  return path, (group, np.array(exact, np.int64), len(uses) - len(exact))


def not_whole(element) -> tuple:
  """A part summary of ((file, row group), Batch of Uses) from a step that makes no exact Use (the
  embed step's rows reused after hashing, an unread shard's images): its file is read back."""
  (path, group), _ = element
  return path, (group, np.zeros(0, np.int64), 1)


def as_written(schema: pa.Schema) -> pa.Schema:
  """`schema` as a Parquet file written with it reads back (a list's item is named `element` there)."""
  buffer = pa.BufferOutputStream()
  pq.write_table(schema.empty_table(), buffer)
  return pq.ParquetFile(pa.BufferReader(buffer.getvalue())).schema_arrow


def whole_file(element, schema, output):
  """`file` when each of its rows has one exact Use and nothing else uses it, its schema (with the
  layout) is `schema` (`as_written`), and it is in `output`'s store: its bytes are then the output's,
  and it is copied rather than read back."""
  path, summaries = element
  summaries = list(summaries)
  if any(others for _, _, others in summaries) or FileSystems.get_scheme(path) != FileSystems.get_scheme(output):
    return
  rows = np.concatenate([exact for _, exact, _ in summaries])
  with _parquet(path) as parquet:
    # Here, not at construction: a pickled pyarrow list type forgets its item's name.
    total, same_schema = parquet.metadata.num_rows, parquet.schema_arrow.equals(as_written(schema), check_metadata=True)
  if same_schema and len(rows) == total and np.array_equal(np.sort(rows), np.arange(total)):
    yield path


class WholeFiles(beam.PTransform):
  """Part summaries (`part_summary`, `not_whole`) in; the committed files to copy whole into `output`
  out (a few per run: a side input of FetchRows, and the summary step's copies). Beam copies within
  one filesystem only: files in another store than `output` are read back."""

  def __init__(self, schema, output):
    super().__init__()
    self._schema, self._output = schema, output

  def expand(self, summaries):
    return (summaries
            | "ByFile" >> beam.GroupByKey()
            | "Whole" >> beam.FlatMap(whole_file, self._schema, self._output))


# --- reading reused rows back ------------------------------------------------------


def reused_table(taken: pa.Table, uses, extra_fields) -> pa.Table:
  """Output rows for `uses` from the committed rows `taken` (sha256, width, height, embedding, and
  the extra columns where a Use has no columns of its own: an unread shard's image), in order."""
  embedding = taken.column("embedding").combine_chunks()
  schema = embeddings_schema(embedding.type.list_size, extra_fields=extra_fields, listing=True)
  arrays = [pa.array([u.uri for u in uses], pa.string()), taken.column("sha256"), taken.column("width"),
            taken.column("height"), embedding,
            *[_extra_column(taken, uses, f) for f in extra_fields],
            listing_array([u.listed for u in uses])]
  return pa.Table.from_arrays(arrays, schema=schema)


def _extra_column(taken, uses, field):
  if all(u.columns is not None for u in uses):
    return pa.array([u.columns.get(field.name) for u in uses], field.type)
  committed = taken.column(field.name).to_pylist()
  return pa.array([committed[i] if u.columns is None else u.columns.get(field.name) for i, u in enumerate(uses)],
                  field.type)


class _FetchDoFn(beam.DoFn):
  """((file, row group), Batches of Uses) in; Arrow tables of reused rows out, error rows tagged
  "errors", and the summary's counts of them tagged "tally": ("carried", n) (--previous's rows) and
  ("resumed", n) (an interrupted run's)."""

  def __init__(self, extra_fields):
    self._extra_fields = extra_fields

  def process(self, element, whole=()):
    (path, group), batches = element
    uses = sorted((u for batch in batches for u in batch.values), key=lambda u: u.row)
    kind = uses[0].kind
    yield beam.pvalue.TaggedOutput("tally", ("carried", sum(u.source == PREVIOUS for u in uses)))
    yield beam.pvalue.TaggedOutput("tally", ("resumed", sum(u.source == RESUME and u.kind == ROW for u in uses)))
    if path in whole:  # copied whole by the summary step
      return
    columns = ["sha256", "width", "height", "embedding"] if kind == ROW else ["stage", "error_type", "message"]
    if kind == ROW and any(u.columns is None for u in uses):  # an unread shard's images: their own columns
      columns += [f.name for f in self._extra_fields]
    with _parquet(path, columns_only=False) as parquet:  # the vectors: gcsio's 16 MiB reads
      first = sum(parquet.metadata.row_group(g).num_rows for g in range(group))
      # The wanted positions in this row group, read a slice at a time: what is held is _BATCH_ROWS rows.
      positions, start, done = np.array([u.row for u in uses]) - first, 0, 0
      for batch in parquet.iter_batches(batch_size=_BATCH_ROWS, row_groups=[group], columns=columns):
        here = positions[(positions >= start) & (positions < start + batch.num_rows)] - start
        start += batch.num_rows
        if not len(here):
          continue
        taken = pa.Table.from_batches([batch])
        if not np.array_equal(here, np.arange(batch.num_rows)):
          taken = taken.take(pa.array(here, pa.int64()))  # else every row once, in order: no copy
        these = uses[done:done + len(here)]
        done += len(here)
        if kind == ERROR:
          for u, row in zip(these, taken.to_pylist()):
            yield beam.pvalue.TaggedOutput("errors", dict(row, uri=u.uri))
        else:
          yield reused_table(taken, these, self._extra_fields)


class FetchRows(beam.PTransform):
  """((file, row group), Batch of Uses) in; (tables of reused output rows, reused error rows, the
  summary's ("carried" | "resumed", count)s) out. Grouped
  by row group, not by file: what one worker holds at once is a row group's Uses and a slice of its rows,
  however big the file; only row groups holding wanted rows are read. `whole`: a PCollection of the
  files copied whole (WholeFiles), whose rows are counted and not read."""

  def __init__(self, extra_fields, whole=None):
    super().__init__()
    self._extra_fields, self._whole = extra_fields, whole

  def expand(self, uses):
    whole = () if self._whole is None else (beam.pvalue.AsDict(self._whole | "Keyed" >> beam.Map(lambda f: (f, True))),)
    fetched = (uses
               | "ByRowGroup" >> beam.GroupByKey()
               | "Read" >> beam.ParDo(_FetchDoFn(self._extra_fields), *whole)
               .with_outputs("errors", "tally", main="tables"))
    return fetched.tables, fetched.errors, fetched.tally
