"""Reading a run's output back: uris, one float32 matrix, and the layout to slice a backbone out."""

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from transforms.write import LAYOUT_KEY, embedding_matrix


@dataclasses.dataclass
class Embeddings:
  uris: list
  vectors: np.ndarray  # float32 [N, D]
  layout: dict
  table: pa.Table  # every column, extra ones (label, manifest columns) included

  def backbone(self, name: str) -> np.ndarray:
    """One backbone's part of every vector: a view, no copy."""
    for entry in self.layout["backbones"]:
      if entry["name"] == name:
        return self.vectors[:, entry["offset"]:entry["offset"] + entry["dim"]]
    raise KeyError(f"backbone {name!r} is not in this output; it has "
                   f"{[b['name'] for b in self.layout['backbones']]}")

  def column(self, name: str) -> list:
    return self.table.column(name).to_pylist()


def embedding_files(path: str) -> list:
  files = [m.path for m in FileSystems.match([FileSystems.join(path, "embeddings-*.parquet")])[0].metadata_list]
  if not files:
    raise FileNotFoundError(f"no embeddings-*.parquet under {path!r}")
  return sorted(files)


def read_embeddings(path: str) -> Embeddings:
  """All rows of a run's output directory (local or gs://), in file order."""
  tables = []
  for uri in embedding_files(path):
    with FileSystems.open(uri, compression_type="uncompressed") as f:
      tables.append(pq.read_table(pa.BufferReader(f.read())))
  table = pa.concat_tables(tables)
  layout = json.loads(table.schema.metadata[LAYOUT_KEY])
  return Embeddings(table.column("uri").to_pylist(), embedding_matrix(table.column("embedding")), layout,
                    table)
