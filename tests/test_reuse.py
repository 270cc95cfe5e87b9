"""transforms/reuse.py and listing.same_object: committed rows found by reference, trusted by listing."""

import pickle

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
from apache_beam.testing.util import assert_that, equal_to

from transforms import reuse
from transforms.item import Item
from transforms.listing import Listed, from_row, listing_array, same_object
from transforms.write import embedding_matrix, embeddings_schema, rows_to_table

LOCAL = Listed(size=10, mtime_ns=1_700_000_000_123_456_789)
GCS = Listed(size=10, generation=1700000000123456, crc32c="AAAAAA==", md5="bWQ1")


def test_same_object_by_scheme():
  assert same_object(LOCAL, Listed(size=10, mtime_ns=LOCAL.mtime_ns))
  assert not same_object(LOCAL, Listed(size=10, mtime_ns=LOCAL.mtime_ns + 1))  # one ns later
  assert not same_object(LOCAL, Listed(size=11, mtime_ns=LOCAL.mtime_ns))
  assert same_object(GCS, GCS)
  # A new generation of the same bytes (a copy over itself) is the same content by its md5 ...
  assert same_object(GCS, Listed(size=10, generation=2, crc32c="AAAAAA==", md5="bWQ1"))
  assert not same_object(GCS, Listed(size=10, generation=2, crc32c="AAAAAA==", md5="b3RoZXI="))
  # ... or, for a composite object (no md5), by its crc32c.
  assert same_object(Listed(10, generation=1, crc32c="AAAAAA=="), Listed(10, generation=2, crc32c="AAAAAA=="))
  assert not same_object(Listed(10, generation=1, crc32c="AAAAAA=="), Listed(10, generation=2, crc32c="BBBBBB=="))
  assert same_object(Listed(10, mtime=5.0), Listed(10, mtime=5.0))  # another filesystem: what it lists
  for missing in ((None, LOCAL), (LOCAL, None), (Listed(10), Listed(10))):
    assert not same_object(*missing)  # nothing to compare: the object is read


def test_a_listing_round_trips_through_its_column():
  column = listing_array([LOCAL, None, GCS])
  assert [from_row(row) for row in column.to_pylist()] == [LOCAL, None, GCS]


def _ref(source, sha="ab" * 32, listed=LOCAL, kind="row", row=0):
  return reuse.Ref(source, f"{source}.parquet", row, kind, sha, listed)


def _decide(items, refs, **trust):
  out = {"items": [], "reused": [], "gone": []}
  for tag, value in reuse.decide("a.jpg", items, refs, **trust):
    out[tag or "items"].append(value)
  return out


def test_decide_trusts_a_same_listing_and_reads_the_rest():
  item = Item("a.jpg", columns={"label": "x"}, listed=LOCAL)
  # The interrupted run's row first, then --previous's.
  got = _decide([item], [_ref("previous"), _ref("resume")])
  assert got == {"items": [], "gone": [], "reused": [
      (("resume.parquet", 0), reuse.Use(0, "row", "resume", "a.jpg", {"label": "x"}, LOCAL))]}
  touched = item.replace(listed=Listed(10, mtime_ns=LOCAL.mtime_ns + 1))
  got = _decide([touched], [_ref("previous"), _ref("resume")])
  assert got["items"] == [touched.replace(reuse=(_ref("resume"), _ref("previous")))] and not got["reused"]
  assert got["items"][0].digests() == ("ab" * 32, "ab" * 32)
  # --resume-verify / --previous-verify: read whatever the listing says.
  got = _decide([item], [_ref("previous")], trust_previous=False)
  assert got["items"] == [item.replace(reuse=(_ref("previous"),))]
  # A previous row of a uri no longer listed is gone; an interrupted run's is not counted.
  assert _decide([], [_ref("previous")])["gone"] == ["a.jpg"]
  assert _decide([], [_ref("resume")]) == {"items": [], "reused": [], "gone": []}
  assert _decide([item], []) == {"items": [item], "reused": [], "gone": []}
  # A row beats an error a retried bundle committed for the same uri.
  got = _decide([item], [_ref("resume", kind="error", row=5), _ref("resume", row=7)])
  assert got["reused"][0][1].row == 7


def test_a_use_is_exact_only_for_the_uri_itself_with_the_same_listing_and_no_columns_of_its_own():
  plain = Item("a.jpg", listed=LOCAL, duplicates=(Item("b.jpg", listed=LOCAL),))
  got = _decide([plain], [_ref("previous")])
  assert [(u.uri, u.exact) for _, u in got["reused"]] == [("a.jpg", True), ("b.jpg", False)]
  # A listing the same object by the store's rule, recorded otherwise (an md5 added): rewritten.
  other = Listed(10, mtime_ns=LOCAL.mtime_ns, md5=None, crc32c="AAAAAA==")
  assert [u.exact for _, u in _decide([plain.replace(listed=other)], [_ref("previous")])["reused"]] == [False, False]
  assert [u.exact for _, u in _decide([plain.replace(columns={"label": "x"})], [_ref("previous")])["reused"]] == [
      False, False]


def test_rows_are_fetched_back_by_position_with_todays_uri_columns_and_listing(tmp_path):
  n, dim = 20, 3
  vectors = np.arange(n * dim, dtype=np.float32).reshape(n, dim)
  table = rows_to_table([f"old{i}" for i in range(n)], [f"{i:064x}" for i in range(n)], list(range(n)), [1] * n,
                        vectors, listings=[None] * n)
  path = str(tmp_path / "previous.parquet")
  pq.write_table(table, path, row_group_size=6)  # four row groups
  index = dict(reuse.read_index((path, "row"), "previous"))
  # Each row knows its row group: the reused rows are read back a row group at a time.
  assert index["old13"] == reuse.Ref("previous", path, 13, "row", f"{13:064x}", None, group=2)
  assert [index[f"old{i}"].part for i in (0, 5, 6, 18, 19)] == [(path, 0), (path, 0), (path, 1), (path, 3), (path, 3)]
  wanted = [3, 19, 4, 12, 0]
  # Two batches for one row group (two buckets' worth): read back as one.
  uses = [(index[f"old{i}"].part, reuse.Batch([reuse.Use(i, "row", "previous", f"new{i}", {}, LOCAL)])) for i in wanted[:2]]
  uses += [((path, 0), reuse.Batch([reuse.Use(i, "row", "previous", f"new{i}", {}, LOCAL) for i in (4, 0)])),
           ((path, 2), reuse.Batch([reuse.Use(12, "row", "previous", "new12", {}, LOCAL)]))]
  with beam.Pipeline() as p:
    tables, _, counts = p | beam.Create(uses) | reuse.FetchRows(())
    rows = tables | beam.FlatMap(lambda t: zip(t.column("uri").to_pylist(), t.column("sha256").to_pylist(),
                                               t.column("width").to_pylist(),
                                               map(tuple, embedding_matrix(t.column("embedding")).tolist()),
                                               map(from_row, t.column("listing").to_pylist())))
    assert_that(rows, equal_to([(f"new{i}", f"{i:064x}", i, tuple(vectors[i].tolist()), LOCAL) for i in wanted]))
    # The summary's counts, made where the rows are read back: five carried over, none resumed.
    assert_that(counts | beam.CombinePerKey(sum), equal_to([("carried", 5), ("resumed", 0)]), label="counts")


def test_a_file_is_copied_whole_only_when_each_row_is_used_once_as_it_is_in_this_runs_schema(tmp_path):
  n, dim = 10, 3
  schema = embeddings_schema(dim, {"dim": dim}, listing=True)
  table = rows_to_table([f"u{i}" for i in range(n)], [f"{i:064x}" for i in range(n)], list(range(n)), [1] * n,
                        np.zeros((n, dim), np.float32), listings=[LOCAL] * n).cast(schema)
  path = str(tmp_path / "previous.parquet")
  pq.write_table(table, path, row_group_size=4)  # three row groups
  exact = lambda rows, others=0: (np.array(rows, np.int64), others)
  every = [(0, *exact([1, 0, 3, 2])), (1, *exact([5, 4, 7])), (1, *exact([6])), (2, *exact([9, 8]))]
  whole = lambda summaries, schema=schema, output=str(tmp_path / "out"): list(
      reuse.whole_file((path, summaries), schema, output))
  assert whole(every) == [path]
  assert whole(every[:-1]) == []  # rows 8 and 9 not reused (changed or gone): read back
  assert whole(every + [(2, *exact([], 1))]) == []  # a Use that is not the row as it is (touched, a duplicate)
  assert whole(every[:-1] + [(2, *exact([9, 9]))]) == []  # one row twice, another never
  assert whole(every, schema=embeddings_schema(dim, {"dim": dim, "pooling": "max"}, listing=True)) == []
  assert whole(every, output="gs://bucket/out") == []  # Beam copies within one filesystem only
  # What decide_bucket gives for a row group: the exact Uses' positions and a count of the others.
  uses = [reuse.Use(3, "row", "previous", "u3", {}, LOCAL, True), reuse.Use(1, "row", "previous", "copy", {}, LOCAL)]
  key, (group, rows, others) = reuse.part_summary((path, 0), uses)
  assert (key, group, rows.tolist(), others) == (path, 0, [3], 1)


def test_the_join_moves_a_list_per_bucket_and_decides_as_one_uri_at_a_time_would(tmp_path):
  # 40 committed rows in one file: 30 still listed the same (reused unread), 5 touched (read), 5 gone.
  n = 40
  listings = [Listed(size=i + 1, mtime_ns=1_000 + i) for i in range(n)]
  table = rows_to_table([f"img{i}.jpg" for i in range(n)], [f"{i:064x}" for i in range(n)], [1] * n, [1] * n,
                        np.zeros((n, 2), np.float32), listings=listings)
  path = str(tmp_path / "previous.parquet")
  pq.write_table(table, path)
  items = ([Item(f"img{i}.jpg", listed=listings[i]) for i in range(30)]
           + [Item(f"img{i}.jpg", listed=Listed(size=i + 1, mtime_ns=5)) for i in range(30, 35)]
           + [Item("new.jpg", listed=LOCAL)])
  index = list(reuse.bucketed_index((path, "row"), "previous", buckets=4, flush=16))
  # A Refs per bucket every 16 rows: never more than 16 rows held, and every row once.
  chunks = [(bucket, refs) for bucket, batch in index for refs in batch.values]
  assert len(chunks) == len(index) > 4 and all(len(refs.uris) <= 16 for _, refs in chunks)
  assert sorted(uri for _, refs in chunks for uri, _ in refs.refs()) == sorted(f"img{i}.jpg" for i in range(n))
  assert all(reuse.bucket_of(uri, 4) == bucket for bucket, refs in chunks for uri in refs.uris)
  with beam.Pipeline() as p:
    joined = ({"items": p | "Items" >> beam.Create(items) | beam.ParDo(reuse.ByBucket(buckets=4, flush=7)),
               "committed": p | "Index" >> beam.Create(index)}
              | beam.CoGroupByKey()
              | beam.FlatMap(reuse.decide_bucket).with_outputs("reused", "gone", main="items"))
    assert_that(joined.items | beam.Map(lambda item: (item.uri, [ref.row for ref in item.reuse])),
                equal_to([(f"img{i}.jpg", [i]) for i in range(30, 35)] + [("new.jpg", [])]), label="read")
    assert_that(joined.gone, equal_to([f"img{i}.jpg" for i in range(35, n)]), label="gone")
    # At most a list per bucket and row group: the reused rows travel as lists, not one by one.
    assert_that(joined.reused | beam.combiners.Count.Globally(), equal_to([4]), label="lists")
    assert_that(joined.reused | beam.FlatMapTuple(lambda file, uses: [(file, u.uri, u.row) for u in uses.values]),
                equal_to([((path, 0), f"img{i}.jpg", i) for i in range(30)]), label="reused")


def test_a_batch_crosses_a_shuffle_compressed_and_comes_back_equal(tmp_path):
  # The committed references of 2,000 rows, as the index sends them: their pickles, compressed.
  n = 2000
  listings = [Listed(size=1000 + i, mtime_ns=1_700_000_000_000_000_000 + 7919 * i) for i in range(n)]
  table = rows_to_table([f"/data/photos/{i % 50:03d}/{i:06d}.jpg" for i in range(n)],
                        [f"{(i * 2654435761) % (1 << 256):064x}" for i in range(n)], [1] * n, [1] * n,
                        np.zeros((n, 2), np.float32), listings=listings)
  path = str(tmp_path / "previous.parquet")
  pq.write_table(table, path)
  batches = [batch for _, batch in reuse.bucketed_index((path, "row"), "previous", buckets=4)]
  plain = sum(len(pickle.dumps(batch.values, pickle.HIGHEST_PROTOCOL)) for batch in batches)
  sent = [pickle.dumps(batch) for batch in batches]
  assert sum(map(len, sent)) < 0.7 * plain
  back = [pickle.loads(blob) for blob in sent]
  assert pickle.dumps(back[0]) == sent[0]  # moved on unread: the same bytes, not packed again
  assert back == batches
  # A small list is sent as its pickle: compressing it would cost more than it saves.
  small = reuse.Batch([reuse.Use(1, "row", "previous", "a.jpg", {}, LOCAL)])
  assert pickle.dumps(small) == pickle.dumps(reuse.Batch(blob=pickle.dumps(small.values, pickle.HIGHEST_PROTOCOL)))
  assert pickle.loads(pickle.dumps(small)) == small
  refs = sorted(ref for batch in back for chunk in batch.values for _, ref in chunk.refs())
  assert [(ref.row, ref.sha256, ref.listed) for ref in refs] == [
      (i, f"{(i * 2654435761) % (1 << 256):064x}", listings[i]) for i in range(n)]


def test_the_join_has_fewer_buckets_where_one_process_runs_it():
  # One worker has nothing to spread 512 keys over, and the local runner holds every element of a
  # shuffle with its own overhead; workers that share the job out keep 512.
  assert reuse.join_buckets(fan_out=True) == reuse.BUCKETS == 512
  assert reuse.join_buckets(fan_out=False) == reuse.ONE_PROCESS_BUCKETS == 64
