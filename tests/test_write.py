"""Write stage: Arrow tables, the Parquet sink's files, and the run summary."""

import json

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
  np.testing.assert_array_equal(write.embedding_matrix(table.column("embedding")), emb)
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
  np.testing.assert_array_equal(write.embedding_matrix(table.column("embedding")), np.concatenate(expected))


def _batch(emb, first=0):
  n = len(emb)
  return write.rows_to_table([f"u{first + i}" for i in range(n)], ["s"] * n, [1] * n, [2] * n, emb)


def test_embedding_matrix_of_one_chunk_is_a_view_of_the_arrow_buffer():
  emb = np.arange(12, dtype=np.float32).reshape(3, 4)
  column = _batch(emb).column("embedding")
  matrix = write.embedding_matrix(column)
  assert matrix.dtype == np.float32 and matrix.shape == (3, 4)
  np.testing.assert_array_equal(matrix, emb)
  assert np.shares_memory(matrix, emb)  # rows_to_table wraps emb without a copy; so does this


def test_embedding_matrix_joins_chunks_in_order_and_respects_slices():
  rng = np.random.default_rng(0)
  parts = [rng.standard_normal((n, 5)).astype(np.float32) for n in (3, 1, 4)]
  table = pa.concat_tables([_batch(p, first=10 * i) for i, p in enumerate(parts)])
  assert table.column("embedding").num_chunks == 3
  np.testing.assert_array_equal(write.embedding_matrix(table.column("embedding")), np.concatenate(parts))
  # A slice keeps the whole buffer underneath: rows before the offset must not leak in.
  sliced = table.slice(2, 3).column("embedding")
  np.testing.assert_array_equal(write.embedding_matrix(sliced), np.concatenate(parts)[2:5])
  np.testing.assert_array_equal(write.embedding_matrix(sliced.chunk(0)), parts[0][2:])


def test_embedding_matrix_of_an_empty_table_keeps_its_width(tmp_path):
  schema = write.embeddings_schema(7)
  pq.write_table(schema.empty_table(), tmp_path / "empty.parquet")
  columns = [schema.empty_table().column("embedding"), pa.chunked_array([], type=schema.field("embedding").type),
             pq.read_table(tmp_path / "empty.parquet").column("embedding")]
  for column in columns:
    matrix = write.embedding_matrix(column)
    assert matrix.shape == (0, 7) and matrix.dtype == np.float32


def test_embedding_matrix_rejects_other_columns():
  expected = (r"^`column` must be a fixed-size list of float32 \(the `embedding` column\); "
              r"Received: column.type=string$")
  with pytest.raises(TypeError, match=expected):
    write.embedding_matrix(pa.chunked_array([["a"]]))
  nulls = pa.array([[1.0, 2.0], None], type=pa.list_(pa.float32(), 2))
  with pytest.raises(ValueError, match=r"^`column` has 1 null rows; an embedding column has none$"):
    write.embedding_matrix(nulls)


def test_errors_table_schema():
  rows = [write.error_row("a.jpg", "decode", "truncated_image", "image file is truncated")]
  table = write.errors_to_table(rows)
  assert table.schema == write.ERRORS_SCHEMA
  assert table.to_pylist() == rows
  with pytest.raises(AssertionError):
    write.error_row("a.jpg", "resize", "x", "y")


def _facts(**kw):
  base = dict(max_failure_fraction=0.05, started_at=1000.0, inputs=("in/*.jpg",), output="out",
              layout={"dim": 1, "versions": {"keras": "3.15.1"}})
  base.update(kw)
  return base


@pytest.mark.parametrize("matched,embedded,failures,status", [
    (100, 100, [], "ok"),
    (100, 95, [(("decode", "truncated_image"), 5)], "ok"),
    (100, 94, [(("decode", "truncated_image"), 5), (("read", "FileNotFoundError"), 1)],
     "over_failure_budget"),
    (100, 90, [(("decode", "truncated_image"), 5)], "inconsistent"),
    (0, 0, [], "ok"),
])
def test_summarize_counts_and_status(matched, embedded, failures, status):
  summary = write.summarize(matched, embedded, failures, ["out/embeddings-00000-of-00001.parquet"],
                            finished_at=1010.0, **_facts())
  assert summary["status"] == status
  assert summary["counts"]["failed"] == sum(c for _, c in failures)
  if failures:
    assert sum(summary["counts"]["failed_by_stage"].values()) == summary["counts"]["failed"]
    assert sum(summary["counts"]["failed_by_type"].values()) == summary["counts"]["failed"]
  assert summary["timings"]["seconds"] == 10.0
  assert summary["files"] == ["embeddings-00000-of-00001.parquet"]


def test_summary_warns_when_workers_ran_other_versions():
  same = write.summarize(1, 1, [], [], worker_versions=[{"keras": "3.15.1"}], **_facts())
  assert "warnings" not in same
  assert same["worker_versions"] == [{"keras": "3.15.1"}]
  other = write.summarize(1, 1, [], [], worker_versions=[{"keras": "3.15.1"}, {"keras": "3.14.0"}], **_facts())
  assert other["warnings"] == [
      "workers ran other package versions than the launcher: keras 3.15.1 at launch, 3.14.0 on a worker"]


def test_summary_round_trip(tmp_path):
  summary = {"status": "ok", "counts": {"matched": 1}}
  write.write_summary(str(tmp_path), summary)
  assert write.read_summary(str(tmp_path)) == summary


def test_number_shards_renames_both_sinks_files_into_one_set(tmp_path):
  names = ["embeddings-00000-of-00002.parquet", "embeddings-00001-of-00002.parquet",
           "embeddings-reused-00000-of-00001.parquet", "errors-00000-of-00001.parquet"]
  for name in names:
    (tmp_path / name).write_bytes(name.encode())
  files = write.number_shards([str(tmp_path / n) for n in names], str(tmp_path))
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      "embeddings-00000-of-00003.parquet", "embeddings-00001-of-00003.parquet", "embeddings-00002-of-00003.parquet",
      "errors-00000-of-00001.parquet"]
  assert (tmp_path / "embeddings-00002-of-00003.parquet").read_bytes() == names[2].encode()  # the reused rows
  assert sorted(files) == sorted(str(p) for p in tmp_path.iterdir())
  # A run with one sink only is left as it is.
  assert write.number_shards(files, str(tmp_path)) == files


def test_number_shards_copies_files_reused_whole_as_the_last_of_the_set(tmp_path):
  previous = tmp_path / "previous"
  previous.mkdir()
  (previous / "embeddings-00000-of-00001.parquet").write_bytes(b"committed rows")
  out = tmp_path / "out"
  out.mkdir()
  names = ["embeddings-00000-of-00001.parquet", "embeddings-reused-00000-of-00001.parquet"]
  for name in names:
    (out / name).write_bytes(name.encode())
  files = write.number_shards([str(out / n) for n in names], str(out),
                              copies=[str(previous / "embeddings-00000-of-00001.parquet")])
  assert sorted(p.name for p in out.iterdir()) == [f"embeddings-0000{i}-of-00003.parquet" for i in range(3)]
  assert [(out / f"embeddings-0000{i}-of-00003.parquet").read_bytes() for i in range(3)] == [
      names[0].encode(), names[1].encode(), b"committed rows"]
  assert (previous / "embeddings-00000-of-00001.parquet").exists()  # copied, not moved
  assert sorted(files) == sorted(str(p) for p in out.iterdir())
