"""Incremental refresh: which previous run can be reused, and carrying its unchanged rows over."""

import json

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from transforms.write import SUCCESS_FILE, embedding_matrix, rows_table

# What makes two runs' vectors interchangeable; versions and timings don't.
_MODEL_KEYS = ("dim", "pooling", "normalize", "resize", "fast_decode", "mixed_precision", "allow_tf32")
_BACKBONE_KEYS = ("name", "offset", "dim", "input_size", "preprocessing", "weights_fingerprint", "source", "layer",
                  "model_sha256", "model_output")


def _backbone_value(backbone: dict, key: str):
  # Layouts from before user models and layers had no source (the registry name) and no layer.
  if key == "source" and key not in backbone:
    return backbone.get("name")
  return backbone.get(key)


class PreviousRunError(ValueError):
  """The previous output is missing, partial, or not a run of this tool."""


def read_previous_summary(previous: str) -> dict:
  path = FileSystems.join(previous, SUCCESS_FILE)
  try:
    with FileSystems.open(path, compression_type="uncompressed") as f:
      summary = json.loads(f.read().decode("utf-8"))
  except Exception as e:
    raise PreviousRunError(
        f"`previous` {previous!r} has no readable {SUCCESS_FILE} (missing or partial run): "
        f"{type(e).__name__}") from None
  if not isinstance(summary, dict) or "layout" not in summary or "counts" not in summary:
    raise PreviousRunError(f"`previous` {previous!r}: {SUCCESS_FILE} is not an embed-images run summary")
  if summary.get("status") == "inconsistent":
    raise PreviousRunError(f"`previous` {previous!r} did not account for all its inputs (status inconsistent)")
  return summary


def model_difference(previous_layout: dict, layout: dict):
  """None when rows of the previous run are valid in this one; else why not, in words."""
  for key in _MODEL_KEYS:
    if previous_layout.get(key) != layout.get(key):
      return f"{key} changed: {previous_layout.get(key)!r} -> {layout.get(key)!r}"
  # In f32 the engines' rows agree within 1e-5 (tests/test_openvino.py), as one engine's do from batch
  # to batch; reduced precision differs by engine (float16 on TensorFlow's GPUs, bf16 on OpenVINO).
  engines = [layout_.get("engine", "tensorflow") for layout_ in (previous_layout, layout)]
  if layout.get("mixed_precision") and engines[0] != engines[1]:
    return f"engine changed under mixed_precision: {engines[0]!r} -> {engines[1]!r}"
  before = [tuple(_backbone_value(b, k) for k in _BACKBONE_KEYS) for b in previous_layout.get("backbones", [])]
  after = [tuple(_backbone_value(b, k) for k in _BACKBONE_KEYS) for b in layout["backbones"]]
  if [b[0] for b in before] != [b[0] for b in after]:
    return f"backbones changed: {[b[0] for b in before]} -> {[b[0] for b in after]}"
  for old, new in zip(before, after):
    for key, a, b in zip(_BACKBONE_KEYS, old, new):
      if a != b:
        return f"{old[0]} {key} changed: {a!r} -> {b!r}"
  return None


def previous_embeddings(previous: str) -> str:
  return FileSystems.join(previous, "embeddings-*.parquet")


def _index_rows(table):
  yield from zip(table.column("uri").to_pylist(), table.column("sha256").to_pylist())


def _rows_by_content(table):
  for sha, width, height, vector in zip(
      table.column("sha256").to_pylist(), table.column("width").to_pylist(),
      table.column("height").to_pylist(), embedding_matrix(table.column("embedding"))):
    yield sha, (width, height, vector)


class PreviousIndex(beam.PTransform):
  """(uri, sha256) of every row of the previous run; only those two columns are read."""

  def __init__(self, previous):
    super().__init__()
    self._previous = previous

  def expand(self, pbegin):
    return (pbegin
            | "ReadIndex" >> beam.io.ReadFromParquetBatched(
                previous_embeddings(self._previous), columns=["uri", "sha256"])
            | "IndexRows" >> beam.FlatMap(_index_rows))


def attach_previous(joined):
  """CoGroupByKey output -> items with their previous digest; uris only in the previous run are gone."""
  _, groups = joined
  digests = list(groups["previous"])
  for item in groups["items"]:
    yield item.replace(previous_sha256=digests[0]) if digests else item


def removed_uri(joined):
  uri, groups = joined
  if not list(groups["items"]):
    yield uri


def carried_rows(joined):
  """Rows for carried files: the previous run's size and vector for those bytes; this run's uri and
  extra columns. Joined by content, so a copy of an unchanged file under a new name is carried too."""
  sha, groups = joined
  for width, height, vector in groups["previous"]:
    for uri, columns in groups["carried"]:
      yield uri, sha, width, height, vector, columns
    return


class CarryOver(beam.PTransform):
  """(sha256, (uri, columns)) of carried files in, Arrow tables of their rows out; the previous
  vectors are joined here, so they never travel into the model stage."""

  def __init__(self, previous, extra_fields):
    super().__init__()
    self._previous, self._extra_fields = previous, extra_fields

  def expand(self, carried):
    previous = (carried.pipeline
                | "ReadPrevious" >> beam.io.ReadFromParquetBatched(
                    previous_embeddings(self._previous),
                    columns=["sha256", "width", "height", "embedding"])
                | "PreviousRows" >> beam.FlatMap(_rows_by_content))
    return ({"carried": carried, "previous": previous}
            | "JoinPrevious" >> beam.CoGroupByKey()
            | "CarriedRows" >> beam.FlatMap(carried_rows)
            | "Batch" >> beam.BatchElements(min_batch_size=64, max_batch_size=4096)
            | "ToArrow" >> beam.Map(rows_table, self._extra_fields))
