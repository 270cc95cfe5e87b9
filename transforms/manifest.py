"""Manifest input: a CSV, JSONL or Parquet file with a `uri` column; every other column rides along to the output rows."""

import posixpath

import apache_beam as beam
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from transforms.item import Item

RESERVED_COLUMNS = ("sha256", "width", "height", "embedding")
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet",
           ".pq": "parquet"}


def manifest_format(uri: str) -> str:
  extension = posixpath.splitext(uri.lower())[1]
  if extension not in FORMATS:
    raise ValueError(f"`manifest` must end in {', '.join(FORMATS)}; received: {uri!r}")
  return FORMATS[extension]


def _open(uri):
  return FileSystems.open(uri, compression_type="uncompressed")


def read_manifest_batches(uri: str, schema: pa.Schema = None):
  """Record batches of the manifest; with `schema` (fixed at launch), every worker reads the same types."""
  kind = manifest_format(uri)
  with _open(uri) as f:
    if kind == "parquet":
      parquet = pq.ParquetFile(f)
      for batch in parquet.iter_batches(batch_size=8192):
        yield batch if schema is None else pa.Table.from_batches([batch]).cast(schema).to_batches()[0]
    elif kind == "csv":
      convert = pa_csv.ConvertOptions(column_types=schema) if schema is not None else None
      yield from pa_csv.open_csv(f, convert_options=convert)
    else:
      parse = pa_json.ParseOptions(explicit_schema=schema) if schema is not None else None
      yield from pa_json.read_json(f, parse_options=parse).to_batches()


def manifest_schema(uri: str) -> pa.Schema:
  """Launch-time: the manifest's columns from its first batch; `uri` must be one of them."""
  try:
    first = next(read_manifest_batches(uri), None)
  except (OSError, pa.ArrowInvalid) as e:
    raise ValueError(f"`manifest` {uri!r} could not be read: {e}".replace("\n", " ")) from None
  if first is None or "uri" not in first.schema.names:
    columns = first.schema.names if first is not None else []
    raise ValueError(f"`manifest` {uri!r} needs a 'uri' column; found columns: {columns}")
  clash = [c for c in first.schema.names if c in RESERVED_COLUMNS]
  if clash:
    raise ValueError(f"`manifest` {uri!r} has columns the output uses itself: {clash}")
  # Values of a column may be missing on some rows: every carried column is nullable.
  return pa.schema([pa.field(f.name, pa.string() if f.type == pa.null() else f.type, nullable=True)
                    for f in first.schema])


def extra_fields(schema: pa.Schema):
  return tuple(f for f in schema if f.name != "uri")


class ReadManifest(beam.PTransform):
  """An Item per manifest row, its other columns as the item's columns."""

  def __init__(self, uri, schema):
    super().__init__()
    self._uri, self._schema = uri, schema

  def expand(self, pbegin):
    def rows(uri, schema):
      for batch in read_manifest_batches(uri, schema):
        for row in batch.to_pylist():
          # An empty cell still counts as an input: it fails at read, in the errors output.
          yield Item(str(row.pop("uri") or ""), columns=row)

    return pbegin | "Manifest" >> beam.Create([self._uri]) | "Rows" >> beam.FlatMap(rows, self._schema)


def label_item(item: Item) -> Item:
  """--label-from-dir: the parent folder's name, as keras' image_dataset_from_directory labels."""
  label = posixpath.basename(posixpath.dirname(item.uri.replace("\\", "/")))
  return item.replace(columns=dict(item.columns, label=label))


LABEL_FIELD = pa.field("label", pa.string(), nullable=True)
