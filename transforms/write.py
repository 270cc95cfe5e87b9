"""Write stage: Arrow tables for embeddings and errors, the Parquet sink, and the run summary (_SUCCESS.json)."""

import datetime
import importlib.metadata
import io
import json
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io import filebasedsink
from apache_beam.io.filesystems import FileSystems

LAYOUT_KEY = b"embedding_layout"
SUCCESS_FILE = "_SUCCESS.json"
ERROR_STAGES = ("read", "decode", "embed")


def embeddings_schema(dim: int, layout: dict = None, extra_fields=(), listing=False) -> pa.Schema:
  """The embeddings Parquet's schema; `listing`: with the `listing` column the command line records
  (what the store's listing said of each input: transforms/listing.py), after the extra fields."""
  from transforms.listing import LISTING_FIELD
  fields = [
      pa.field("uri", pa.string(), nullable=False),
      pa.field("sha256", pa.string(), nullable=False),
      pa.field("width", pa.int32(), nullable=False),
      pa.field("height", pa.int32(), nullable=False),
      pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
      *extra_fields,
      *([LISTING_FIELD] if listing else []),
  ]
  metadata = {LAYOUT_KEY: json.dumps(layout, sort_keys=True).encode()} if layout else None
  return pa.schema(fields, metadata=metadata)


ERRORS_SCHEMA = pa.schema([
    pa.field("uri", pa.string(), nullable=False),
    pa.field("stage", pa.string(), nullable=False),
    pa.field("error_type", pa.string(), nullable=False),
    pa.field("message", pa.string(), nullable=False),
])


def rows_to_table(uris, sha256s, widths, heights, embeddings: np.ndarray, extra=None,
                  extra_fields=(), listings=None) -> pa.Table:
  """One Arrow table for a batch: the vector column is a FixedSizeList over one flat float32 buffer.

  `extra` maps each of `extra_fields` (manifest columns, label) to its values, in row order;
  `listings` (Listed or None per row), when given, is the `listing` column.
  """
  embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
  n, dim = embeddings.shape
  values = pa.array(embeddings.reshape(-1), type=pa.float32())  # zero-copy view
  return pa.Table.from_arrays(
      [
          pa.array(uris, type=pa.string()),
          pa.array(sha256s, type=pa.string()),
          pa.array(np.asarray(widths, dtype=np.int32)),
          pa.array(np.asarray(heights, dtype=np.int32)),
          pa.FixedSizeListArray.from_arrays(values, dim),
          *[pa.array(extra[f.name], type=f.type) for f in extra_fields],
          *([] if listings is None else [_listing_array(listings)]),
      ],
      schema=embeddings_schema(dim, extra_fields=extra_fields, listing=listings is not None),
  )


def _listing_array(listings):
  from transforms.listing import listing_array
  return listing_array(listings)


def rows_table(rows, extra_fields=()) -> pa.Table:
  """`rows_to_table` for rows reused whole (carried over, resumed): (uri, sha256, width, height,
  vector, columns) tuples, `columns` a dict of the extra fields' values."""
  uris, shas, widths, heights, vectors, columns = zip(*rows)
  extra = {f.name: [c.get(f.name) for c in columns] for f in extra_fields}
  return rows_to_table(list(uris), list(shas), list(widths), list(heights), np.stack(vectors), extra,
                       extra_fields)


REUSED_PREFIX = "embeddings-reused"  # a refresh's reused rows, before `number_shards` renames them


def number_shards(files, output, copies=()) -> list:
  """`files` with the embeddings files numbered as one set, `embeddings-SSSSS-of-NNNNN.parquet`.

  A refresh writes the rows it makes and the rows it reuses through two sinks (so that neither
  waits for the other in memory): this renames the second sink's files (`embeddings-reused-*`) and
  the first's into one numbering. Names never collide: NNNNN is larger than the first sink's count.
  `copies`: committed files reused whole (transforms/reuse.py, WholeFiles), copied into the output
  as the last of the set (on gs://, a copy within the store). Other files pass unchanged."""
  names = [FileSystems.split(f)[1] for f in files]
  reused = sorted(f for f, n in zip(files, names) if n.startswith(REUSED_PREFIX + "-"))
  if not reused and not copies:
    return list(files)
  made = sorted(f for f, n in zip(files, names) if n.startswith("embeddings-") and f not in reused)
  others = [f for f in files if f not in reused and f not in made]
  ordered = made + reused
  total = len(ordered) + len(copies)
  numbered = [FileSystems.join(output, f"embeddings-{i:05d}-of-{total:05d}.parquet") for i in range(total)]
  if copies:  # first: a step retried after a failed copy finds the files to rename where they were
    FileSystems.copy(list(copies), numbered[len(ordered):])
  moves = [(a, b) for a, b in zip(ordered, numbered) if a != b]
  if moves:
    FileSystems.rename([a for a, _ in moves], [b for _, b in moves])
  return numbered + others


def error_row(uri, stage, error_type, message) -> dict:
  assert stage in ERROR_STAGES, stage
  return {"uri": uri, "stage": stage, "error_type": error_type, "message": str(message)}


def errors_to_table(rows) -> pa.Table:
  return pa.Table.from_pylist(list(rows), schema=ERRORS_SCHEMA)


class _BufferedParquetWriter:
  """Collects per-batch tables into row groups of `row_group_size` rows before writing."""

  def __init__(self, handle, schema, row_group_size):
    self.handle = handle
    self.schema = schema
    self.row_group_size = row_group_size
    # Embeddings are unique floats and uris/digests unique strings: a dictionary
    # page would only cost time, so it stays off.
    self.writer = pq.ParquetWriter(
        handle, schema, compression="snappy", use_dictionary=False, write_statistics=["uri"])
    self.pending = []
    self.pending_rows = 0

  def write(self, table: pa.Table):
    self.pending.append(table)
    self.pending_rows += table.num_rows
    if self.pending_rows >= self.row_group_size:
      self.flush(whole_groups_only=True)

  def flush(self, whole_groups_only=False):
    if not self.pending:
      return
    table = pa.concat_tables(self.pending).cast(self.schema)
    keep = table.num_rows % self.row_group_size if whole_groups_only else 0
    self.writer.write_table(table.slice(0, table.num_rows - keep), row_group_size=self.row_group_size)
    self.pending = [table.slice(table.num_rows - keep)] if keep else []
    self.pending_rows = keep

  def close(self):
    self.flush()
    self.writer.close()
    self.handle.close()


class ParquetTableSink(filebasedsink.FileBasedSink):
  """A file sink of pyarrow Tables with our schema's metadata, no dictionary pages, sized row groups.
  `skip_if_empty`: no file at all for no rows (else one file of none)."""

  def __init__(self, file_path_prefix, schema, num_shards=0, row_group_size=8192, skip_if_empty=False):
    super().__init__(
        file_path_prefix,
        coder=None,
        file_name_suffix=".parquet",
        num_shards=num_shards,
        shard_name_template=None,
        mime_type="application/x-parquet",
        compression_type="uncompressed",
        skip_if_empty=skip_if_empty)
    self._schema = schema
    self._row_group_size = row_group_size

  def open(self, temp_path):
    return _BufferedParquetWriter(super().open(temp_path), self._schema, self._row_group_size)

  def write_record(self, writer, table):
    writer.write(table)

  def close(self, writer):
    writer.close()


def package_versions() -> dict:
  """Versions of what makes a vector, in this process: recorded at launch and by each worker."""
  import apache_beam
  import PIL
  import pyarrow
  versions = {
      "python": sys.version.split()[0],
      "apache_beam": apache_beam.__version__,
      "keras": installed_version("keras"),
      "pillow": PIL.__version__,
      "pyarrow": pyarrow.__version__,
  }
  # The distributions' metadata: importing TensorFlow (4-6 s) or OpenVINO (~0.2 s) here would cost
  # every launch that, an unchanged refresh, never needs either.
  for key, names in (("tensorflow", TENSORFLOW_DISTRIBUTIONS), ("openvino", ("openvino",))):
    version = installed_version(*names)
    if version is not None:
      versions[key] = version
  return versions


TENSORFLOW_DISTRIBUTIONS = ("tensorflow", "tensorflow-cpu", "tensorflow-intel", "tensorflow-macos", "tf-nightly")


def installed_version(*distributions):
  """The version of the first of `distributions` installed (its metadata; nothing imported), else None."""
  for name in distributions:
    try:
      return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      continue
  return None


def summarize(matched, embedded, failures, files, *, layout, inputs, output, started_at, max_failure_fraction,
              refresh=None, carried=0, removed=0, resumed=0, decode_processes=None, worker_versions=None,
              finished_at=None) -> dict:
  """The run summary written last as _SUCCESS.json; failures is [((stage, error_type), count)].

  Every matched input is embedded, resumed (its row committed by an interrupted run of this output),
  carried over from --previous, or failed. `decode_processes`
  sums what the workers' decode pools reported; `worker_versions` are the package versions of
  the processes that embedded, compared here with the launcher's in `layout`."""
  failed = sum(count for _, count in failures)
  by_stage, by_type = {}, {}
  for (stage, error_type), count in failures:
    by_stage[stage] = by_stage.get(stage, 0) + count
    by_type[error_type] = by_type.get(error_type, 0) + count
  finished_at = finished_at or time.time()
  fraction = failed / matched if matched else 0.0
  if matched != embedded + resumed + carried + failed:
    status = "inconsistent"
  elif fraction > max_failure_fraction:
    status = "over_failure_budget"
  else:
    status = "ok"
  warnings = []
  for versions in worker_versions or ():
    if versions != layout.get("versions"):
      differ = sorted(k for k in set(versions) | set(layout.get("versions", {}))
                      if versions.get(k) != layout.get("versions", {}).get(k))
      warnings.append("workers ran other package versions than the launcher: " + ", ".join(
          f"{k} {layout.get('versions', {}).get(k)} at launch, {versions.get(k)} on a worker" for k in differ))
  iso = lambda t: datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat()
  summary = {
      "status": status,
      "counts": {
          "matched": matched,
          "embedded": embedded,
          "resumed": resumed,
          "carried_over": carried,
          "removed": removed,
          "failed": failed,
          "failed_by_stage": dict(sorted(by_stage.items())),
          "failed_by_type": dict(sorted(by_type.items())),
      },
      "failure_fraction": fraction,
      "max_failure_fraction": max_failure_fraction,
      "inputs": list(inputs),
      "output": output,
      "files": sorted(FileSystems.split(f)[1] for f in files),
      "layout": layout,
      "refresh": refresh,
      "decode_processes": decode_processes,
      "timings": {
          "started": iso(started_at),
          "finished": iso(finished_at),
          "seconds": round(finished_at - started_at, 3),
          "images_per_second": round(embedded / max(finished_at - started_at, 1e-9), 3),
      },
  }
  if worker_versions:
    summary["worker_versions"] = list(worker_versions)
  if warnings:
    summary["warnings"] = warnings
  return summary


def write_summary(output: str, summary: dict) -> str:
  path = FileSystems.join(output, SUCCESS_FILE)
  with FileSystems.create(path, mime_type="application/json") as f:
    f.write(json.dumps(summary, indent=2, sort_keys=False).encode())
  return path


def read_summary(output: str) -> dict:
  with FileSystems.open(FileSystems.join(output, SUCCESS_FILE),
                        compression_type="uncompressed") as f:
    return json.load(io.TextIOWrapper(f, encoding="utf-8"))


def embedding_matrix(column) -> np.ndarray:
  """An `embedding` column (FixedSizeList<float32>[D], Array or ChunkedArray) as a float32 (N, D) matrix.

  One chunk is a read-only view of Arrow's buffer, no copy; several chunks (a table of several
  files or row groups) are copied once, into one matrix.
  """
  if not pa.types.is_fixed_size_list(column.type):
    raise TypeError(f"`column` must be a fixed-size list of float32 (the `embedding` column); "
                    f"Received: column.type={column.type}")
  dim = column.type.list_size
  parts = []
  for chunk in column.chunks if isinstance(column, pa.ChunkedArray) else [column]:
    if chunk.null_count:
      raise ValueError(f"`column` has {chunk.null_count} null rows; an embedding column has none")
    # flatten(), not .values: .values ignores a sliced chunk's offset and would return other rows.
    parts.append(chunk.flatten().to_numpy(zero_copy_only=False).reshape(len(chunk), dim))
  if not parts:
    return np.zeros((0, dim), np.float32)
  matrix = parts[0] if len(parts) == 1 else np.concatenate(parts)
  return matrix.astype(np.float32, copy=False)
