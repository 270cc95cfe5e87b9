"""Shard readers: WebDataset tars, Parquet image columns and TFRecords of tf.train.Example, streamed a member at a time."""

import dataclasses
import json
import posixpath
import struct
import tarfile
import zlib
from typing import Optional

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from transforms.item import Item
from transforms.load import LoadRequest
from transforms.results import ImageError
from transforms.write import error_row

FORMATS = ("tar", "parquet", "tfrecord")
_EXTENSIONS = {".tar": "tar", ".parquet": "parquet", ".tfrecord": "tfrecord", ".tfrecords": "tfrecord",
               ".tfrec": "tfrecord"}
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm")
# Names our own columns use (img2dataset writes width, height, sha256 and key too): such a source
# column becomes source_NAME.
RESERVED_NAMES = ("uri", "sha256", "width", "height", "embedding", "key")
DEFAULT_IMAGE_FEATURE = "image/encoded"
_PARQUET_IMAGE_NAMES = ("image", "jpg", "jpeg", "png", "webp", "img")
_PARQUET_BATCH_ROWS = 64  # rows (images) per Arrow batch read: what a shard costs in memory at once
_PARQUET_READ_BUFFER = 1 << 20
_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, tarfile.TarError, pa.ArrowException, struct.error)


def shard_format(uri: str, forced: str = "auto") -> Optional[str]:
  """'tar', 'parquet' or 'tfrecord' by extension (`.gz` of a TFRecord too), or `forced`; None for a
  loose image file."""
  if forced and forced != "auto":
    return None if forced == "image" else forced
  name = uri.lower()
  if name.endswith(".gz"):
    name = name[:-3]
    kind = _EXTENSIONS.get(posixpath.splitext(name)[1])
    return kind if kind == "tfrecord" else None
  return _EXTENSIONS.get(posixpath.splitext(name)[1])


def may_match_shards(patterns, forced: str = "auto") -> bool:
  """Whether any object the globs `patterns` match can be a shard (`shard_format` not None): False
  only where every pattern's name ends in a literal extension that is no shard's (`*.jpg`), or
  `forced` is "image". A pattern ending in a glob, in no extension, or in `.gz` may match shards."""
  if forced and forced != "auto":
    return forced != "image"
  for pattern in patterns:
    name = pattern.rstrip("/").rpartition("/")[2]
    stem, dot, extension = name.rpartition(".")
    if not dot or not stem or any(c in extension for c in "*?[]") or extension.lower() == "gz":
      return True
    if shard_format(name, forced) is not None:
      return True
  return False


def output_name(name: str, reserved=RESERVED_NAMES) -> str:
  return f"source_{name}" if name in reserved else name


@dataclasses.dataclass(frozen=True)
class ShardLayout:
  """What a format's shards carry, fixed at launch from the first shard of that format.

  `image`: the Parquet column (None: found per shard) or TFRecord feature holding the image;
  `columns`: ((source name, output pyarrow Field), ...) carried to the rows.
  """
  format: str
  image: Optional[str] = None
  columns: tuple = ()

  def rename(self, values: dict) -> dict:
    return {field.name: values.get(source) for source, field in self.columns if source in values}


@dataclasses.dataclass
class Member:
  """One image of a shard: its key and bytes (or a path to read them from), its source columns; or
  an error row (for its key, or for the shard when `key` is None)."""
  key: Optional[str]
  data: Optional[bytes] = None
  source: Optional[str] = None
  columns: dict = dataclasses.field(default_factory=dict)
  error: Optional[dict] = None


def conform(values: dict, fields) -> dict:
  """Each value as its field's type, or None where it is not of it: a later shard's column of another
  type must cost its value, never the batch."""
  out = {}
  for field in fields:
    if field.name not in values:
      continue
    value = values[field.name]
    try:
      pa.array([value], type=field.type)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
      value = None
    out[field.name] = value
  return out


def _compression(uri):
  return CompressionTypes.GZIP if uri.lower().endswith(".gz") else CompressionTypes.UNCOMPRESSED


def _open(uri):
  return FileSystems.open(uri, compression_type=_compression(uri))


def read_members(uri: str, layout: ShardLayout, row_groups: Optional[tuple] = None):
  """Every image of the shard at `uri` as a Member, streamed; never raises: a shard that cannot be
  opened, or is damaged, ends with one Member whose error row names it (and the byte offset).
  `row_groups`: (first, stop, first row) to read only those row groups of a Parquet shard."""
  try:
    handle = _open(uri)
  except Exception as e:  # missing, permission, bad scheme: the shard's own fault
    yield Member(None, error=error_row(uri, "read", type(e).__name__, f"could not open shard: {e}"))
    return
  with handle:
    if layout.format == "parquet":
      yield from _parquet_members(uri, handle, layout, row_groups)
    else:
      yield from {"tar": _tar_members, "tfrecord": _tfrecord_members}[layout.format](uri, handle, layout)


def shard_images(shard, layouts, extra_fields):
  """(Member, its uri `SHARD#KEY`, the columns of its row) for each member of the shard (or slice of
  one) that the Item `shard` names, streamed by `read_members`: the row's columns are the shard
  item's and the member's own, conformed to `extra_fields`. A member about the shard itself (no
  key) comes with None, None."""
  layout = next((l for l in layouts if l.format == shard.shard_format), None) or ShardLayout(shard.shard_format)
  for member in read_members(shard.uri, layout, shard.row_groups):
    if member.key is None:
      yield member, None, None
    else:
      yield member, f"{shard.uri}#{member.key}", dict(shard.columns, **conform(member.columns, extra_fields))


def parquet_parts(uri: str, rows_per_part: int) -> list:
  """Slices of a Parquet shard to read apart, [(first row group, stop, first row)], each of whole row
  groups and at least `rows_per_part` rows (the last may hold fewer); [] to read it whole: one row
  group (img2dataset writes a shard as one), too few rows, or a footer that can't be read (the
  reader then reports why)."""
  try:
    with _open(uri) as handle:
      meta = pq.ParquetFile(handle).metadata
  except Exception:  # reported, with the shard's name, when the embed stage reads it
    return []
  parts, first, first_row, rows = [], 0, 0, 0
  for group in range(meta.num_row_groups):
    rows += meta.row_group(group).num_rows
    if rows >= rows_per_part:
      parts.append((first, group + 1, first_row))
      first, first_row, rows = group + 1, first_row + rows, 0
  if first < meta.num_row_groups:
    parts.append((first, meta.num_row_groups, first_row))
  return parts if len(parts) > 1 else []


# --- WebDataset tar -----------------------------------------------------------------------------

def _split_key(name):
  """'dir/000012.seg.jpg' -> ('dir/000012', 'seg.jpg'): WebDataset's key is up to the first dot."""
  folder, base = posixpath.split(name)
  stem, _, extension = base.partition(".")
  return posixpath.join(folder, stem) if folder else stem, extension.lower()


def _group_member(uri, key, parts: dict, layout) -> Member:
  image = next((e for e in IMAGE_EXTENSIONS if e in parts), None)
  if image is None:
    return Member(key, error=error_row(f"{uri}#{key}", "read", "missing_image",
                                       f"no image member in group {key!r}; members: {sorted(parts)}"))
  values = {}
  try:
    if "json" in parts:
      meta = json.loads(parts["json"].decode("utf-8"))
      if isinstance(meta, dict):
        values.update(meta)
    if "txt" in parts:
      values["txt"] = parts["txt"].decode("utf-8")
    if "cls" in parts:
      text = parts["cls"].decode("utf-8").strip()
      values["cls"] = int(text) if text.lstrip("-").isdigit() else text
  except (UnicodeDecodeError, ValueError) as e:
    return Member(key, error=error_row(f"{uri}#{key}", "read", "bad_metadata", f"group {key!r}: {e}"))
  return Member(key, data=parts[image], columns=layout.rename(values))


def _tar_groups(handle):
  """(key, {extension: bytes}) of consecutive members sharing a key; raises on damage, with the tar's
  offset at that point in `_DamagedShard`."""
  tar = tarfile.open(fileobj=handle, mode="r|*")
  key, parts = None, {}
  try:
    for info in tar:
      if not info.isfile():
        continue
      member_key, extension = _split_key(info.name)
      if member_key != key and parts:
        yield key, parts
        parts = {}
      key = member_key
      parts[extension] = tar.extractfile(info).read()
  except _READ_ERRORS as e:
    raise _DamagedShard(tar.offset, e) from None
  if parts:
    yield key, parts


class _DamagedShard(Exception):
  """Where a shard's damage was found: a byte offset (tar, TFRecord), or a row or record number."""

  def __init__(self, where, cause):
    where = f"byte {where}" if isinstance(where, int) else where
    super().__init__(f"at {where}: {type(cause).__name__}: {cause}")
    self.cause = cause


def _tar_members(uri, handle, layout):
  try:
    for key, parts in _tar_groups(handle):
      yield _group_member(uri, key, parts, layout)
  except _DamagedShard as e:
    yield _damaged(uri, e)
  except _READ_ERRORS as e:  # not a tar at all (tarfile.open)
    yield _damaged(uri, _DamagedShard(0, e))


def _damaged(uri, e):
  return Member(None, error=error_row(uri, "read", "shard_damaged", f"shard damaged {e}; images before it are kept"))


def tar_columns(uri) -> tuple:
  """Launch-time: (source, Field) of the first group's .json fields, .txt and .cls."""
  with _open(uri) as handle:
    for _, parts in _tar_groups(handle):
      if not any(e in parts for e in IMAGE_EXTENSIONS):
        continue
      values = {}
      if "json" in parts:
        meta = json.loads(parts["json"].decode("utf-8"))
        values.update(meta if isinstance(meta, dict) else {})
      fields = list(_fields_of(values))
      if "txt" in parts:
        fields.append(("txt", pa.field("txt", pa.string())))
      if "cls" in parts:
        text = parts["cls"].decode("utf-8", "replace").strip()
        fields.append(("cls", pa.field("cls", pa.int64() if text.lstrip("-").isdigit() else pa.string())))
      return tuple(fields)
  return ()


def _fields_of(values: dict):
  if not values:
    return
  table = pa.Table.from_pylist([values])
  for field in table.schema:
    kind = pa.string() if field.type == pa.null() else field.type
    yield field.name, pa.field(output_name(field.name), kind)


# --- Parquet ------------------------------------------------------------------------------------

def parquet_image_column(schema: pa.Schema, uri: str, image_column: Optional[str] = None) -> str:
  """The column holding image bytes: `image_column`, else img2dataset's `jpg`, a Hugging Face `image`
  struct with `bytes`, or the only binary column."""
  def is_image(field):
    return (pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type)
            or (pa.types.is_struct(field.type) and field.type.get_field_index("bytes") >= 0))
  if image_column is not None:
    if image_column not in schema.names or not is_image(schema.field(image_column)):
      raise ValueError(f"`image_column` {image_column!r} is not a binary or {{bytes, path}} column of {uri!r}; "
                       f"its columns: {schema.names}")
    return image_column
  for name in _PARQUET_IMAGE_NAMES:
    if name in schema.names and is_image(schema.field(name)):
      return name
  candidates = [f.name for f in schema if is_image(f)]
  if len(candidates) != 1:
    raise ValueError(f"`image_column`: {uri!r} has {len(candidates)} binary columns ({candidates}); "
                     f"name the one holding images")
  return candidates[0]


def parquet_layout(uri: str, image_column=None) -> ShardLayout:
  with _open(uri) as handle:
    schema = pq.ParquetFile(handle).schema_arrow
  image = parquet_image_column(schema, uri, image_column)
  columns = tuple((f.name, pa.field(output_name(f.name), pa.string() if f.type == pa.null() else f.type))
                  for f in schema if f.name != image)
  # Unless named, the image column is found per shard: a run may mix Parquet datasets.
  return ShardLayout("parquet", image_column, columns)


def _parquet_members(uri, handle, layout, row_groups=None):
  first, stop, row = row_groups or (None, None, 0)
  try:
    # Buffered reads of a column chunk, not the whole chunk at once: a one-row-group shard (as
    # img2dataset writes them) then costs about its largest pages, not its size
    # (benchmarks/README.md, "Shards").
    parquet = pq.ParquetFile(handle, buffer_size=_PARQUET_READ_BUFFER, pre_buffer=False)
    image = parquet_image_column(parquet.schema_arrow, uri, layout.image)
    groups = None if row_groups is None else list(range(first, stop))
    for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, row_groups=groups):
      for values in batch.to_pylist():
        key = values.get("key")
        key = str(row) if key is None else str(key)
        row += 1
        yield _parquet_member(uri, key, values.pop(image), layout.rename(values))
  except _READ_ERRORS as e:
    yield _damaged(uri, _DamagedShard(f"row {row} (the first not read)", e))


def _parquet_member(uri, key, cell, columns) -> Member:
  if isinstance(cell, dict):  # a Hugging Face image: {bytes, path}
    data, path = cell.get("bytes"), cell.get("path")
    if data is None and path:
      if not (posixpath.isabs(path) or "://" in path):
        path = FileSystems.join(FileSystems.split(uri)[0], path)
      return Member(key, source=path, columns=columns)
    cell = data
  if not cell:
    return Member(key, error=error_row(f"{uri}#{key}", "read", "missing_image", f"row {key!r} has no image bytes"))
  return Member(key, data=bytes(cell), columns=columns)


# --- TFRecord -----------------------------------------------------------------------------------

def _crc32c(data: bytes) -> int:
  import google_crc32c
  return google_crc32c.value(data)


def _masked_crc(data: bytes) -> int:
  crc = _crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecords(handle):
  """(byte offset, record bytes) of each record, checksums verified; raises `_DamagedShard` with the
  offset of the first record that is truncated or fails its checksum."""
  offset = 0
  while True:
    header = handle.read(12)
    if not header:
      return
    if len(header) < 12:
      raise _DamagedShard(offset, EOFError("truncated record header"))
    length, length_crc = struct.unpack("<QI", header)
    if _masked_crc(header[:8]) != length_crc:
      raise _DamagedShard(offset, ValueError("length checksum mismatch"))
    body = handle.read(length + 4)
    if len(body) < length + 4:
      raise _DamagedShard(offset, EOFError(f"truncated record of {length} bytes"))
    data, (data_crc,) = body[:length], struct.unpack("<I", body[length:])
    if _masked_crc(data) != data_crc:
      raise _DamagedShard(offset, ValueError("data checksum mismatch"))
    yield offset, data
    offset += 12 + length + 4


def _example(data):
  from tensorflow.core.example import example_pb2  # the proto only: no TensorFlow op runs here
  return example_pb2.Example.FromString(data)


def _scalar(feature):
  kind = feature.WhichOneof("kind")
  values = getattr(feature, kind).value if kind else ()
  if len(values) != 1:
    return None
  value = values[0]
  if kind == "bytes_list":
    try:
      return value.decode("utf-8")
    except UnicodeDecodeError:
      return value
  return value


_TF_TYPES = {"int64_list": pa.int64(), "float_list": pa.float32()}


def tfrecord_layout(uri: str, image_feature=None, carry_features=None) -> ShardLayout:
  """Launch-time: the image feature and the scalar features of the first record."""
  with _open(uri) as handle:
    first = next(iter(tfrecords(handle)), None)
  if first is None:
    return ShardLayout("tfrecord", image_feature or None)
  features = _example(first[1]).features.feature
  image = _tfrecord_image_feature(features, uri, image_feature)
  columns = []
  for name in sorted(features):
    feature = features[name]
    kind = feature.WhichOneof("kind")
    value = _scalar(feature)
    if name == image or value is None:
      continue
    if carry_features is not None and name not in carry_features:
      continue
    kind = _TF_TYPES.get(kind) or (pa.string() if isinstance(value, str) else pa.binary())
    columns.append((name, pa.field(output_name(name), kind)))
  missing = [n for n in carry_features or () if n not in {c[0] for c in columns}]
  if missing:
    raise ValueError(f"`carry_features` {missing} are not scalar features of {uri!r}'s first record; "
                     f"its features: {sorted(features)}")
  return ShardLayout("tfrecord", image, tuple(columns))


def _tfrecord_image_feature(features, uri, image_feature=None):
  if image_feature is not None:
    if image_feature not in features or features[image_feature].WhichOneof("kind") != "bytes_list":
      raise ValueError(f"`image_feature` {image_feature!r} is not a bytes feature of {uri!r}; "
                       f"its features: {sorted(features)}")
    return image_feature
  if DEFAULT_IMAGE_FEATURE in features:
    return DEFAULT_IMAGE_FEATURE
  candidates = [n for n in sorted(features) if features[n].WhichOneof("kind") == "bytes_list"]
  if len(candidates) != 1:
    raise ValueError(f"`image_feature`: {uri!r} has {len(candidates)} bytes features ({candidates}); "
                     f"name the one holding images")
  return candidates[0]


def _tfrecord_members(uri, handle, layout):
  number = 0
  try:
    for _, data in tfrecords(handle):
      key = str(number)
      number += 1
      try:
        features = _example(data).features.feature
      except Exception as e:  # protobuf's DecodeError: this record only
        yield Member(key, error=error_row(f"{uri}#{key}", "read", "bad_record", f"not a tf.train.Example: {e}"))
        continue
      image = layout.image or DEFAULT_IMAGE_FEATURE
      values = features[image].bytes_list.value if image in features else ()
      if len(values) != 1 or not values[0]:
        yield Member(key, error=error_row(f"{uri}#{key}", "read", "missing_image",
                                          f"record {key} has no single {image!r} bytes value"))
        continue
      columns = {source: _scalar(features[source]) for source, _ in layout.columns if source in features}
      yield Member(key, data=values[0], columns=layout.rename(columns))
  except _DamagedShard as e:
    yield _damaged(uri, e)
  except _READ_ERRORS as e:  # a gzip stream that ends early
    yield _damaged(uri, _DamagedShard(f"record {number} (the first not read)", e))


def shard_layout(uri: str, kind: str, image_column=None, image_feature=None, carry_features=None) -> ShardLayout:
  """Launch-time, from the shard at `uri`: what its format's shards carry. Raises ValueError naming
  the argument at fault, or the shard that could not be read."""
  try:
    if kind == "tar":
      return ShardLayout("tar", None, tar_columns(uri))
    if kind == "parquet":
      return parquet_layout(uri, image_column)
    return tfrecord_layout(uri, image_feature, carry_features)
  except (_DamagedShard, *_READ_ERRORS) as e:
    if isinstance(e, ValueError) and str(e).startswith("`"):
      raise
    raise ValueError(f"shard {uri!r} could not be read: {e}".replace("\n", " ")) from None


class ExpandShards(beam.DoFn):
  """Items in, `(Item, LoadRequest)` out, one per image to load: a file item as it is, a shard item
  as its images, streamed a member at a time (each an item `SHARD#KEY` with the shard's columns
  and its own). A shard's damage is tagged `errors` as (Item, ImageError); per shard (or slice),
  (path, images found, how many of them --previous has rows for) is tagged `shard_count`."""

  ERRORS_TAG, SHARD_COUNT_TAG = "errors", "shard_count"

  def __init__(self, layouts, extra_fields):
    self._layouts, self._extra_fields = layouts, extra_fields

  def process(self, item):
    if item.shard_format is None:
      yield item, LoadRequest(item.uri, size=item.listed_size)
      return
    found = previous_seen = 0
    for member, uri, columns in shard_images(item, self._layouts, self._extra_fields):
      found += 1
      if uri is None:  # the shard itself: unopenable, or damaged past this point
        yield beam.pvalue.TaggedOutput(self.ERRORS_TAG, (item.replace(duplicates=()), ImageError.from_row(member.error)))
        continue
      previous_seen += any(ref.source == "previous" for ref in item.members.get(uri, ()))
      if uri in item.skip_members:  # --dedupe: another input with the same bytes makes its row
        continue
      # With the shard's listing: its row records it, and the next --previous may leave the shard unread.
      image = Item(uri, columns=columns, listed=item.listed, duplicates=item.member_duplicates.get(uri, ()),
                   reuse=item.members.get(uri, ()))
      if member.error is not None:
        yield beam.pvalue.TaggedOutput(self.ERRORS_TAG, (image, ImageError.from_row(member.error)))
        continue
      yield image, LoadRequest(uri, source=member.source, data=member.data)
    # What the shard (or this slice of it) held, and how many of --previous's rows of it were found:
    # the rest were removed from it.
    yield beam.pvalue.TaggedOutput(self.SHARD_COUNT_TAG, (item.uri, found, previous_seen))
