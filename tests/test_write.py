"""Write stage: Arrow tables, the Parquet sink's files, and the run summary."""

import json
import types

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from transforms import write


def test_rows_to_table_is_fixed_size_list_over_flat_float32():
  emb = np.arange(12, dtype=np.float32).reshape(3, 4)
  table = write.rows_to_table(["a", "b", "c"], ["1", "2", "3"], [10, 20, 30], [5, 6, 7], emb)
  assert table.schema.field("embedding").type == pa.list_(pa.float32(), 4)
  assert table.schema.field("width").type == pa.int32()
  column = table.column("embedding").combine_chunks()
  np.testing.assert_array_equal(column.values.to_numpy().reshape(3, 4), emb)
  assert table.column("uri").to_pylist() == ["a", "b", "c"]
  assert table.column("height").to_pylist() == [5, 6, 7]


def test_sink_writes_metadata_row_groups_and_no_dictionary(tmp_path):
  layout = {"dim": 4, "backbones": [{"name": "x", "offset": 0, "dim": 4}]}
  schema = write.embeddings_schema(4, layout)
  handle = open(tmp_path / "f.parquet", "wb")
  writer = write._BufferedParquetWriter(handle, schema, row_group_size=5)
  rng = np.random.default_rng(0)
  expected = []
  for batch in range(4):  # 4 batches of 3 rows -> row groups of 5, 5, 2
    emb = rng.standard_normal((3, 4)).astype(np.float32)
    expected.append(emb)
    writer.write(write.rows_to_table([f"u{batch}{i}" for i in range(3)], ["s"] * 3, [1] * 3, [2] * 3, emb))
  writer.close()
  parquet = pq.ParquetFile(tmp_path / "f.parquet")
  assert [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)] == [5, 5, 2]
  assert json.loads(parquet.schema_arrow.metadata[write.LAYOUT_KEY]) == layout
  column_chunk = parquet.metadata.row_group(0).column(4)
  assert "PLAIN_DICTIONARY" not in column_chunk.encodings and "RLE_DICTIONARY" not in column_chunk.encodings
  table = parquet.read()
  got = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
  np.testing.assert_array_equal(got, np.concatenate(expected))


def test_errors_table_schema():
  rows = [write.error_row("a.jpg", "decode", "truncated_image", "image file is truncated")]
  table = write.errors_to_table(rows)
  assert table.schema == write.ERRORS_SCHEMA
  assert table.to_pylist() == rows
  with pytest.raises(AssertionError):
    write.error_row("a.jpg", "resize", "x", "y")


def _config(**kw):
  base = dict(max_failure_fraction=0.05, started_at=1000.0, inputs=("in/*.jpg",), output="out",
              layout=lambda: {"dim": 1})
  base.update(kw)
  return types.SimpleNamespace(**base)


@pytest.mark.parametrize("matched,embedded,failures,status", [
    (100, 100, [], "ok"),
    (100, 95, [(("decode", "truncated_image"), 5)], "ok"),
    (100, 94, [(("decode", "truncated_image"), 5), (("read", "FileNotFoundError"), 1)],
     "over_failure_budget"),
    (100, 90, [(("decode", "truncated_image"), 5)], "inconsistent"),
    (0, 0, [], "ok"),
])
def test_summarize_counts_and_status(matched, embedded, failures, status):
  summary = write.summarize(_config(), matched, embedded, failures, ["out/embeddings-00000-of-00001.parquet"],
                            finished_at=1010.0)
  assert summary["status"] == status
  assert summary["counts"]["failed"] == sum(c for _, c in failures)
  if failures:
    assert sum(summary["counts"]["failed_by_stage"].values()) == summary["counts"]["failed"]
    assert sum(summary["counts"]["failed_by_type"].values()) == summary["counts"]["failed"]
  assert summary["timings"]["seconds"] == 10.0
  assert summary["files"] == ["embeddings-00000-of-00001.parquet"]


def test_summary_round_trip(tmp_path):
  summary = {"status": "ok", "counts": {"matched": 1}}
  write.write_summary(str(tmp_path), summary)
  assert write.read_summary(str(tmp_path)) == summary
