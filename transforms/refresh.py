"""Incremental refresh: whether a previous run's rows can be reused (reusing them: transforms/reuse.py)."""

import json

from apache_beam.io.filesystems import FileSystems

from transforms.write import SUCCESS_FILE

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


def previous_files(previous: str) -> list:
  """(path, kind) of the previous run's embeddings files, for reuse.CommittedIndex: listed once, at launch."""
  from transforms import reuse
  return sorted((m.path, reuse.ROW) for m in FileSystems.match([previous_embeddings(previous)])[0].metadata_list)


def previous_error_files(previous: str) -> list:
  """The previous run's errors files: a shard with an error row in them is read again."""
  return sorted(m.path for m in FileSystems.match([FileSystems.join(previous, "errors-*.parquet")])[0].metadata_list)


def kept_columns(previous: str, extra_fields) -> bool:
  """Whether the previous run's rows hold every extra column this run writes, of the same type:
  then an unchanged shard's images take their columns from those rows, unread."""
  import pyarrow.parquet as pq
  files = FileSystems.match([previous_embeddings(previous)])[0].metadata_list
  if not files:
    return False
  with FileSystems.open(files[0].path, compression_type="uncompressed") as handle:
    schema = pq.read_schema(handle)
  return all(f.name in schema.names and schema.field(f.name).type == f.type for f in extra_fields)
