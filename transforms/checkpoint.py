"""Checkpoints: rows made durable under `<output>/_checkpoints/` as they are made, and reused by --resume.

Beam makes a bundle's output durable only when the bundle ends, and the local runner runs a
stage as one bundle: a run killed at 90% would lose everything. So the embed step commits its
rows itself, at least every `every_seconds` and every `every_rows` rows:

- `embeddings-<bundle>-<seq>.parquet`: the output rows, with their `listing` column (what lets a
  resume skip reading a file: transforms/reuse.py);
- `errors-<bundle>-<seq>.parquet`: decode and embed error rows, with the file's digest and listing
  (read errors are not kept: they are retried);
- `_layout.json`: the model the rows were made with (written when the job starts).

A commit is atomic: locally a temporary file renamed into place; on gs:// the final object
written directly, since an object appears whole and a rename is a copy. `<run>-<bundle>` is
the run's launch time and a digest of the bundle's first item, so a retried bundle writes the
same names again (duplicate rows, from a retry that committed at other points, are resolved on
reuse), and a resumed run never overwrites the files of the run it resumes.
"""

import hashlib
import io
import os
import json
import time
import uuid
from typing import Callable, Optional

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindows

from transforms import decode_pool, reuse, store
from transforms.listing import LISTING_FIELD
from transforms.results import EmbeddingBatch, Reused
from transforms.write import ERRORS_SCHEMA, package_versions, rows_to_table

DIRECTORY = "_checkpoints"
LAYOUT_FILE = "_layout.json"
EVERY_ROWS = 4096
ERROR_FIELDS = (pa.field("sha256", pa.string(), nullable=True), LISTING_FIELD)


def directory(output: str) -> str:
  return FileSystems.join(output, DIRECTORY)


def embeddings_glob(output: str) -> str:
  return FileSystems.join(directory(output), "embeddings-*.parquet")


def errors_glob(output: str) -> str:
  return FileSystems.join(directory(output), "errors-*.parquet")


def committed_files(output: str) -> list:
  """(path, kind) of every committed checkpoint file, for reuse.CommittedIndex."""
  return sorted((path, reuse.ROW if "/embeddings-" in path else reuse.ERROR) for path in files(output)
                if path.endswith(".parquet") and ("/embeddings-" in path or "/errors-" in path))


def files(output: str) -> list:
  try:
    result = FileSystems.match([FileSystems.join(directory(output), "*")])[0]
  except Exception:  # no such directory (gs:// raises, local returns nothing)
    return []
  return [m.path for m in result.metadata_list]


def write_layout(output: str, layout: dict):
  with FileSystems.create(FileSystems.join(directory(output), LAYOUT_FILE), mime_type="application/json") as f:
    f.write(json.dumps(layout, sort_keys=True).encode())


def read_layout(output: str) -> Optional[dict]:
  path = FileSystems.join(directory(output), LAYOUT_FILE)
  if not FileSystems.exists(path):
    return None
  with FileSystems.open(path, compression_type="uncompressed") as f:
    return json.loads(f.read().decode("utf-8"))


def committed_rows(output: str) -> int:
  """Rows in the committed checkpoint files (both kinds), duplicates included."""
  total = 0
  for path in files(output):
    if path.endswith(".parquet"):
      with FileSystems.open(path, compression_type="uncompressed") as f:
        total += pq.ParquetFile(io.BytesIO(f.read())).metadata.num_rows
  return total


def _atomic_write(path: str, table: pa.Table):
  sink = io.BytesIO()
  # As the final shards: unique floats and strings gain nothing from dictionary pages.
  pq.write_table(table, sink, compression="snappy", use_dictionary=False)
  data = sink.getvalue()
  if path.startswith("gs://"):
    with FileSystems.create(path, mime_type="application/x-parquet") as f:
      f.write(data)
    return
  directory_, name = FileSystems.split(path)
  temporary = FileSystems.join(directory_, f".{name}.{uuid.uuid4().hex}.tmp")
  with FileSystems.create(temporary, mime_type="application/x-parquet") as f:
    f.write(data)
  FileSystems.rename([temporary], [path])


class CheckpointWriter:
  """Buffers a bundle's rows and commits them as Parquet files; `clock` is injected for tests."""

  def __init__(self, output: str, run: str, every_seconds: float, every_rows: int = EVERY_ROWS,
               clock: Callable[[], float] = time.monotonic):
    self._directory = directory(output)
    self._run = run
    self._every_seconds = every_seconds
    self._every_rows = every_rows
    self._clock = clock
    self._bundle = None
    self._sequence = 0
    self._tables, self._errors, self._rows = [], [], 0
    self._last = clock()
    self.commits = 0

  def start_bundle(self, first_uri: str):
    """Names the bundle's files after its first item. The `every_seconds` clock runs from the writer's
    creation (the bundle's start), not from here: the first batch comes after the model is built, and
    rows that took longer than `every_seconds` to make are committed as soon as they are added."""
    self._bundle = f"{self._run}-{hashlib.sha1(first_uri.encode()).hexdigest()[:16]}"
    self._sequence = 0

  def add(self, table: Optional[pa.Table], errors=()):
    """`table`: output rows with their `listing` column; `errors`: error rows with `sha256` and
    `listing` keys. Commits when enough rows or time have gathered."""
    if table is not None and table.num_rows:
      self._tables.append(table)
      self._rows += table.num_rows
    for row in errors:
      self._errors.append(row)
      self._rows += 1
    if self._rows >= self._every_rows or self._clock() - self._last >= self._every_seconds:
      self.commit()

  def commit(self):
    if self._bundle is None or not (self._tables or self._errors):
      self._last = self._clock()
      return
    name = f"{self._bundle}-{self._sequence:06d}.parquet"
    if self._tables:
      _atomic_write(FileSystems.join(self._directory, f"embeddings-{name}"), pa.concat_tables(self._tables))
    if self._errors:
      schema = pa.schema(list(ERRORS_SCHEMA) + list(ERROR_FIELDS))
      _atomic_write(FileSystems.join(self._directory, f"errors-{name}"),
                    pa.Table.from_pylist(self._errors, schema=schema))
    self._sequence += 1
    self.commits += 1
    self._tables, self._errors, self._rows = [], [], 0
    self._last = self._clock()


# --- the command line's step after the model ---------------------------------------

def batch_table(batch: EmbeddingBatch, extra_fields) -> pa.Table:
  """An EmbeddingBatch keyed by Items as output rows: each item's duplicates (--dedupe) get its
  vector, every row its item's extra columns and its listing."""
  uris, shas, widths, heights, index, listings = [], [], [], [], [], []
  extra = {f.name: [] for f in extra_fields}
  for i, item in enumerate(batch.keys):
    for each in item.items():
      uris.append(each.uri)
      shas.append(batch.sha256s[i])
      widths.append(batch.widths[i])
      heights.append(batch.heights[i])
      index.append(i)
      listings.append(each.listed)
      for name in extra:
        extra[name].append(each.columns.get(name))
  embeddings = batch.embeddings if len(index) == len(batch) else batch.embeddings[index]
  return rows_to_table(uris, shas, widths, heights, embeddings, extra, extra_fields, listings)


class CommitRows(beam.DoFn):
  """After the model, in the same stage: `EmbeddingBatch`es, `(Item, ImageError)`s and
  `(Item, Reused)`s in (EmbedImages.as_one_output()); Arrow tables of output rows (main), error
  rows (`errors`), and the committed rows to reuse (`reused`: (file, reuse.Batch of Uses), for reuse.FetchRows)
  out, each item's --dedupe duplicates included. Rows and decode/embed errors are committed under
  `<output>/_checkpoints/` as they pass (with `every_seconds`); per bundle, the worker's decode
  processes and package versions are tagged `worker_stats`."""

  ERRORS_TAG, REUSED_TAG, WORKER_STATS_TAG = "errors", "reused", "worker_stats"

  def __init__(self, output, run_started_at, every_seconds, extra_fields, progress=False, store_retry_seconds=None):
    self._output, self._run = output, f"{int(run_started_at * 1000):x}"
    self._store_retry_seconds = store_retry_seconds
    self._every_seconds, self._extra_fields, self._progress_on = every_seconds, extra_fields, progress
    self._embedded = beam.metrics.Metrics.counter("embed", "num_embedded")
    self._carried = beam.metrics.Metrics.counter("embed", "num_carried_over")

  def setup(self):
    if self._store_retry_seconds and store.OUTAGE.seconds != self._store_retry_seconds:
      store.configure(self._store_retry_seconds)  # a remote worker: the launcher's --store-retry-seconds
    self._versions = package_versions()
    self._progress = None
    if self._progress_on:
      from transforms.progress import progress_bar
      self._progress = progress_bar("embedded")

  def start_bundle(self):
    self._writer = None
    if self._every_seconds:
      self._writer = CheckpointWriter(self._output, self._run, self._every_seconds)
    self._first = True

  def process(self, element):
    if isinstance(element, EmbeddingBatch):
      self._started(element.keys[0].uri)
      table = batch_table(element, self._extra_fields)
      if self._writer is not None:
        self._writer.add(table)
      self._embedded.inc(table.num_rows)
      if self._progress is not None:
        self._progress.update(table.num_rows)
      yield table
      return
    item, value = element
    self._started(item.uri)
    if isinstance(value, Reused):  # the bytes hash as a committed row's
      ref = reuse.reused_by(item, value.sha256)
      uses = [reuse.use(ref, each)[1] for each in item.items()]
      if ref.source == reuse.PREVIOUS:
        self._carried.inc(len(uses))
      yield beam.pvalue.TaggedOutput(self.REUSED_TAG, (ref.part, reuse.Batch(uses)))
      return
    committed = []
    for each in item.items():
      row = dict(value.row(), uri=each.uri)
      yield beam.pvalue.TaggedOutput(self.ERRORS_TAG, row)
      if value.sha256 is not None:  # read errors have none, and are retried by a resume
        committed.append(dict(row, sha256=value.sha256, listing=each.listed and each.listed.as_row()))
    if committed and self._writer is not None:
      self._writer.add(None, committed)

  def _started(self, uri):
    if self._first and self._writer is not None:
      self._writer.start_bundle(uri)  # names a retry of this bundle repeats
    self._first = False

  def finish_bundle(self):
    if self._writer is not None:
      self._writer.commit()
    stats = dict(decode_pool.process_stats(), versions=self._versions, own_peak_rss=decode_pool.own_peak_rss())
    yield beam.pvalue.TaggedOutput(self.WORKER_STATS_TAG, GlobalWindows.windowed_value((os.getpid(), stats)))


def clear(output: str):
  """Deletes the checkpoints (after the final outputs and _SUCCESS.json are written)."""
  doomed = files(output)
  if doomed:
    FileSystems.delete(doomed)
  if not output.startswith("gs://") and FileSystems.exists(directory(output)):
    try:
      FileSystems.delete([directory(output)])
    except Exception:  # not empty (a commit racing the end): harmless, the next run clears it
      pass
