"""Reading a run's output back in tests: local or gs://, through Beam's filesystems."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from transforms.write import embedding_matrix


def sorted_rows(output):
  """(uris, vectors) of every `embeddings-*.parquet` row under `output`, sorted by uri."""
  files = sorted(m.path for m in FileSystems.match([f"{output}/embeddings-*.parquet"])[0].metadata_list)
  tables = []
  for f in files:
    with FileSystems.open(f, compression_type="uncompressed") as handle:
      tables.append(pq.read_table(pa.BufferReader(handle.read())))
  table = pa.concat_tables(tables)
  order = np.argsort(table.column("uri").to_pylist())
  return [table.column("uri").to_pylist()[i] for i in order], embedding_matrix(table.column("embedding"))[order]
