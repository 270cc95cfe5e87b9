"""Checkpoints: rows made durable under `<output>/_checkpoints/` as they are made, and reused by --resume.

Beam makes a bundle's output durable only when the bundle ends, and the local runner runs a
stage as one bundle: a run killed at 90% would lose everything. So the embed step commits its
rows itself, at least every `every_seconds` and every `every_rows` rows:

- `embeddings-<bundle>-<seq>.parquet`: the output rows, plus `size` and `mtime` of the file as
  listed (what lets a resume skip reading it);
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
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindows

from transforms import decode_pool
from transforms.results import EmbeddingBatch, Reused
from transforms.write import ERRORS_SCHEMA, embedding_matrix, package_versions, rows_to_table, rows_table

DIRECTORY = "_checkpoints"
LAYOUT_FILE = "_layout.json"
EVERY_ROWS = 4096
LISTING_FIELDS = (pa.field("size", pa.int64(), nullable=True), pa.field("mtime", pa.float64(), nullable=True))
ERROR_FIELDS = (pa.field("sha256", pa.string(), nullable=True),) + LISTING_FIELDS


def directory(output: str) -> str:
  return FileSystems.join(output, DIRECTORY)


def embeddings_glob(output: str) -> str:
  return FileSystems.join(directory(output), "embeddings-*.parquet")


def errors_glob(output: str) -> str:
  return FileSystems.join(directory(output), "errors-*.parquet")


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
    self._bundle = f"{self._run}-{hashlib.sha1(first_uri.encode()).hexdigest()[:16]}"
    self._sequence = 0
    self._last = self._clock()

  def add(self, table: Optional[pa.Table], errors=()):
    """`table`: output rows with `size` and `mtime` columns; `errors`: error rows with `sha256`,
    `size` and `mtime` keys. Commits when enough rows or time have gathered."""
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
  vector, every row its item's extra columns and, for checkpoints, its listing (size, mtime)."""
  uris, shas, widths, heights, index, sizes, mtimes = [], [], [], [], [], [], []
  extra = {f.name: [] for f in extra_fields}
  for i, item in enumerate(batch.keys):
    for each in item.items():
      uris.append(each.uri)
      shas.append(batch.sha256s[i])
      widths.append(batch.widths[i])
      heights.append(batch.heights[i])
      index.append(i)
      sizes.append(each.size)
      mtimes.append(each.mtime)
      for name in extra:
        extra[name].append(each.columns.get(name))
  embeddings = batch.embeddings if len(index) == len(batch) else batch.embeddings[index]
  table = rows_to_table(uris, shas, widths, heights, embeddings, extra, extra_fields)
  return (table.append_column(LISTING_FIELDS[0], pa.array(sizes, pa.int64()))
          .append_column(LISTING_FIELDS[1], pa.array(mtimes, pa.float64())))


class CommitRows(beam.DoFn):
  """After the model, in the same stage: `EmbeddingBatch`es, `(Item, ImageError)`s and
  `(Item, Reused)`s in (EmbedImages.as_one_output()); Arrow tables of output rows (main), error rows (`errors`), and the rows to
  reuse from --previous (`carried`) or an interrupted run (`resumed`) as (sha256, (uri, columns))
  out, each item's --dedupe duplicates included. Rows and decode/embed errors are committed under
  `<output>/_checkpoints/` as they pass (with `every_seconds`); per bundle, the worker's decode
  processes and package versions are tagged `worker_stats`."""

  ERRORS_TAG, CARRIED_TAG, RESUMED_TAG, WORKER_STATS_TAG = "errors", "carried", "resumed", "worker_stats"

  def __init__(self, output, run_started_at, every_seconds, extra_fields, progress=False):
    self._output, self._run = output, f"{int(run_started_at * 1000):x}"
    self._every_seconds, self._extra_fields, self._progress_on = every_seconds, extra_fields, progress
    self._embedded = beam.metrics.Metrics.counter("embed", "num_embedded")
    self._carried = beam.metrics.Metrics.counter("embed", "num_carried_over")

  def setup(self):
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
      yield table.drop_columns([f.name for f in LISTING_FIELDS])
      return
    item, value = element
    self._started(item.uri)
    if isinstance(value, Reused):  # the bytes hash as a committed row's
      tag = self.RESUMED_TAG if value.sha256 == item.resume_sha256 else self.CARRIED_TAG
      for uri, columns in item.rows():
        if tag == self.CARRIED_TAG:
          self._carried.inc()
        yield beam.pvalue.TaggedOutput(tag, (value.sha256, (uri, columns)))
      return
    committed = []
    for each in item.items():
      row = dict(value.row(), uri=each.uri)
      yield beam.pvalue.TaggedOutput(self.ERRORS_TAG, row)
      if value.sha256 is not None:  # read errors have none, and are retried by a resume
        committed.append(dict(row, sha256=value.sha256, size=each.size, mtime=each.mtime))
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


# --- reuse ------------------------------------------------------------------------


def _index(table, kind):
  for uri, sha, size, mtime in zip(*(table.column(c).to_pylist() for c in ("uri", "sha256", "size", "mtime"))):
    if sha is not None:
      yield uri, (kind, sha, size, mtime)


class CheckpointIndex(beam.PTransform):
  """(uri, (kind, sha256, size, mtime)) of every committed row; kind is "row" or "error"."""

  def __init__(self, output):
    super().__init__()
    self._output = output

  def expand(self, pbegin):
    columns = ["uri", "sha256", "size", "mtime"]
    present = files(self._output)
    parts = []
    if any("/embeddings-" in p for p in present):
      parts.append(pbegin
                   | "ReadRowIndex" >> beam.io.ReadFromParquetBatched(embeddings_glob(self._output), columns=columns)
                   | "RowIndex" >> beam.FlatMap(_index, "row"))
    if any("/errors-" in p for p in present):
      parts.append(pbegin
                   | "ReadErrorIndex" >> beam.io.ReadFromParquetBatched(errors_glob(self._output), columns=columns)
                   | "ErrorIndex" >> beam.FlatMap(_index, "error"))
    return tuple(parts) | "AllIndex" >> beam.Flatten(pipeline=pbegin.pipeline)


def decide(joined, verify=False):
  """CoGroupByKey of items and the checkpoint index, by uri -> ("resumed", (sha, (uri, columns)))
  for an item whose committed row is reused without reading the file (same size and mtime as
  listed), else ("item", item) with `resume_sha256` set when a row exists: the embed step reuses
  it if the bytes still hash the same (always so with `verify`)."""
  _, groups = joined
  entries = list(groups["checkpoint"])
  for item in groups["items"]:
    if not entries:
      yield "item", item
      continue
    _, sha, size, mtime = entries[0]
    if not verify and item.size is not None and (item.size, item.mtime) == (size, mtime):
      yield "resumed", (sha, (item.uri, item.columns))
    else:
      yield "item", item.replace(resume_sha256=sha)


def _rows_by_content(table):
  for sha, width, height, vector in zip(
      table.column("sha256").to_pylist(), table.column("width").to_pylist(),
      table.column("height").to_pylist(), embedding_matrix(table.column("embedding"))):
    yield sha, ("row", (width, height, np.array(vector)))


def _errors_by_content(table):
  for sha, stage, error_type, message in zip(*(table.column(c).to_pylist()
                                               for c in ("sha256", "stage", "error_type", "message"))):
    if sha is not None:
      yield sha, ("error", (stage, error_type, message))


def resumed_outputs(joined):
  """Per content: its committed row (or error) for every resumed uri. Tagged "row" tuples
  (uri, sha, width, height, vector, columns) or "error" rows."""
  sha, groups = joined
  committed = list(groups["committed"])
  if not committed:
    return
  kind, value = next(((k, v) for k, v in committed if k == "row"), committed[0])
  for uri, columns in groups["resumed"]:
    if kind == "row":
      width, height, vector = value
      yield beam.pvalue.TaggedOutput("rows", (uri, sha, width, height, vector, columns))
    else:
      stage, error_type, message = value
      yield beam.pvalue.TaggedOutput("errors", {"uri": uri, "stage": stage, "error_type": error_type,
                                                "message": message})


class Resume(beam.PTransform):
  """(sha256, (uri, columns)) of resumed items in; Arrow tables of their committed rows (main) and
  their committed error rows (tagged `errors`) out."""

  def __init__(self, output, extra_fields):
    super().__init__()
    self._output, self._extra_fields = output, extra_fields

  def expand(self, resumed):
    p = resumed.pipeline
    present = files(self._output)
    parts = []
    if any("/embeddings-" in f for f in present):
      parts.append(p
                   | "ReadRows" >> beam.io.ReadFromParquetBatched(
                       embeddings_glob(self._output), columns=["sha256", "width", "height", "embedding"])
                   | "RowsByContent" >> beam.FlatMap(_rows_by_content))
    if any("/errors-" in f for f in present):
      parts.append(p
                   | "ReadErrors" >> beam.io.ReadFromParquetBatched(
                       errors_glob(self._output), columns=["sha256", "stage", "error_type", "message"])
                   | "ErrorsByContent" >> beam.FlatMap(_errors_by_content))
    committed = tuple(parts) | "AllCommitted" >> beam.Flatten(pipeline=p)
    outputs = ({"resumed": resumed, "committed": committed}
               | "JoinCommitted" >> beam.CoGroupByKey()
               | "Outputs" >> beam.FlatMap(resumed_outputs).with_outputs("rows", "errors"))
    tables = (outputs.rows
              | "Batch" >> beam.BatchElements(min_batch_size=64, max_batch_size=4096)
              | "ToArrow" >> beam.Map(rows_table, self._extra_fields))
    return tables, outputs.errors


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
