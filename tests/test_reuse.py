"""transforms/reuse.py and listing.same_object: committed rows found by reference, trusted by listing."""

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
from apache_beam.testing.util import assert_that, equal_to

from transforms import reuse
from transforms.item import Item
from transforms.listing import Listed, from_row, listing_array, same_object
from transforms.write import embedding_matrix, rows_to_table

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
  for value in reuse.decide(("a.jpg", {"items": items, "committed": refs}), **trust):
    if isinstance(value, beam.pvalue.TaggedOutput):
      out[value.tag].append(value.value)
    else:
      out["items"].append(value)
  return out


def test_decide_trusts_a_same_listing_and_reads_the_rest():
  item = Item("a.jpg", columns={"label": "x"}, listed=LOCAL)
  # The interrupted run's row first, then --previous's.
  got = _decide([item], [_ref("previous"), _ref("resume")])
  assert got == {"items": [], "gone": [], "reused": [
      ("resume.parquet", reuse.Use(0, "row", "resume", "a.jpg", {"label": "x"}, LOCAL))]}
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


def test_rows_are_fetched_back_by_position_with_todays_uri_columns_and_listing(tmp_path):
  n, dim = 20, 3
  vectors = np.arange(n * dim, dtype=np.float32).reshape(n, dim)
  table = rows_to_table([f"old{i}" for i in range(n)], [f"{i:064x}" for i in range(n)], list(range(n)), [1] * n,
                        vectors, listings=[None] * n)
  path = str(tmp_path / "previous.parquet")
  pq.write_table(table, path, row_group_size=6)  # four row groups
  index = dict(reuse.read_index((path, "row"), "previous"))
  assert index["old13"] == reuse.Ref("previous", path, 13, "row", f"{13:064x}", None)
  wanted = [3, 19, 4, 12, 0]
  uses = [(path, reuse.Use(i, "row", "previous", f"new{i}", {}, LOCAL)) for i in wanted]
  with beam.Pipeline() as p:
    tables, _ = p | beam.Create(uses) | reuse.FetchRows(())
    rows = tables | beam.FlatMap(lambda t: zip(t.column("uri").to_pylist(), t.column("sha256").to_pylist(),
                                               t.column("width").to_pylist(),
                                               map(tuple, embedding_matrix(t.column("embedding")).tolist()),
                                               map(from_row, t.column("listing").to_pylist())))
    assert_that(rows, equal_to([(f"new{i}", f"{i:064x}", i, tuple(vectors[i].tolist()), LOCAL) for i in wanted]))
