"""Beam's gs:// filesystem and file sinks against the local GCS emulator."""

import os
import time
from concurrent.futures import ThreadPoolExecutor

import apache_beam as beam
import pyarrow as pa
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.parquetio import ReadFromParquet
from apache_beam.io.parquetio import WriteToParquetBatched
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that
from apache_beam.testing.util import equal_to

from tests.gcs_emulator import gcs_bucket  # noqa: F401  (pytest fixture)


def _write(path, data):
  with FileSystems.create(path) as f:
    f.write(data)


def _read(path):
  with FileSystems.open(path, compression_type="uncompressed") as f:
    return f.read()


def test_filesystems_round_trip(gcs_bucket):
  names = ["a/x.jpg", "a/b/y.jpg", "a/b/c/z.jpg", "a/b/c/z.png", "top.jpg"]
  for name in names:
    _write("%s/%s" % (gcs_bucket, name), name.encode() * 100)

  def match(pattern):
    return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)

  assert match(gcs_bucket + "/a/**/*.jpg") == [
      gcs_bucket + "/a/b/c/z.jpg", gcs_bucket + "/a/b/y.jpg"]
  # Beam turns `**/` into `.*/`, so it needs at least one folder: a top-level
  # file is not matched by `bucket/**/*.jpg` (the same holds on local paths).
  assert match(gcs_bucket + "/**/*.jpg") == [
      gcs_bucket + "/a/b/c/z.jpg", gcs_bucket + "/a/b/y.jpg", gcs_bucket + "/a/x.jpg"]
  assert match(gcs_bucket + "/**") == sorted("%s/%s" % (gcs_bucket, n) for n in names)
  assert match(gcs_bucket + "/a/*.jpg") == [gcs_bucket + "/a/x.jpg"]
  assert FileSystems.match([gcs_bucket + "/a/b/c/z.*"])[0].metadata_list[0].size_in_bytes == 1100

  assert _read(gcs_bucket + "/a/b/y.jpg") == b"a/b/y.jpg" * 100
  with FileSystems.open(gcs_bucket + "/a/b/y.jpg") as f:
    f.seek(9)
    assert f.read(5) == b"a/b/y"

  assert FileSystems.exists(gcs_bucket + "/top.jpg")
  assert not FileSystems.exists(gcs_bucket + "/nope.jpg")
  # rename = rewrite/copy + delete on GCS; both go through the emulator's batch API.
  FileSystems.rename([gcs_bucket + "/top.jpg"], [gcs_bucket + "/moved/top.jpg"])
  assert not FileSystems.exists(gcs_bucket + "/top.jpg")
  assert _read(gcs_bucket + "/moved/top.jpg") == b"top.jpg" * 100
  FileSystems.delete([gcs_bucket + "/a/"])
  assert match(gcs_bucket + "/**") == [gcs_bucket + "/moved/top.jpg"]


def _parquet_round_trip(bucket, extra_args):
  # Built inside the function so cloudpickle ships them by value: multi_processing
  # workers cannot import this test module by name.
  schema = pa.schema([("k", pa.int64()), ("s", pa.string())])

  def to_table(keys):
    return pa.Table.from_pydict({"k": keys, "s": [str(k) for k in keys]}, schema=schema)

  options = PipelineOptions(["--runner=DirectRunner", *extra_args])
  with beam.Pipeline(options=options) as p:
    _ = (
        p
        | beam.Create([[0, 1], [2], [3, 4, 5]])
        | beam.Reshuffle()
        | beam.Map(to_table)
        | WriteToParquetBatched(
            bucket + "/out/part", schema=schema, file_name_suffix=".parquet",
            num_shards=2))

  written = sorted(m.path for m in FileSystems.match([bucket + "/out/**"])[0].metadata_list)
  assert written == [
      bucket + "/out/part-00000-of-00002.parquet",
      bucket + "/out/part-00001-of-00002.parquet"]

  with beam.Pipeline(options=options) as p:
    rows = p | ReadFromParquet(bucket + "/out/*.parquet") | beam.Map(lambda r: (r["k"], r["s"]))
    assert_that(rows, equal_to([(k, str(k)) for k in range(6)]))
    sizes = (
        p
        | fileio.MatchFiles(bucket + "/out/**")
        | fileio.ReadMatches()
        | beam.Map(lambda f: len(f.read()) > 0))
    assert_that(sizes, equal_to([True, True]), label="MatchFiles")


def test_parquet_pipeline_round_trip(gcs_bucket):
  _parquet_round_trip(gcs_bucket, [])


def test_parquet_pipeline_multi_processing(gcs_bucket):
  # SDK workers are fresh interpreters: only what is in os.environ reaches them.
  _parquet_round_trip(
      gcs_bucket, ["--direct_running_mode=multi_processing", "--direct_num_workers=2"])


def test_concurrent_reads(gcs_bucket):
  paths = ["%s/img/%04d.jpg" % (gcs_bucket, i) for i in range(200)]
  blobs = [os.urandom(50_000) for _ in paths]
  for path, data in zip(paths, blobs):
    _write(path, data)

  t0 = time.perf_counter()
  sequential = [_read(p) for p in paths]
  t1 = time.perf_counter()
  with ThreadPoolExecutor(16) as pool:
    threaded = list(pool.map(_read, paths))
  t2 = time.perf_counter()

  assert sequential == blobs
  assert threaded == blobs
  # Figures only (pytest -s): the emulator serves one request at a time, so this
  # says nothing about real GCS, where per-request latency dominates.
  print("\n200 x 50 KB via FileSystems.open: sequential %.2f s, 16 threads %.2f s"
        % (t1 - t0, t2 - t1))


def test_the_emulator_lists_in_pages_as_gcs_does(gcs_bucket):
  # GCS answers a listing a page of at most 1,000 objects at a time; the emulator as installed answers
  # all of them at once, which made a listing's memory and requests unlike GCS's. tests/gcs_emulator.py
  # pages it.
  from transforms import listing, read
  names = [f"paged/{i:02d}.jpg" for i in range(7)]
  for name in names:
    with FileSystems.create(f"{gcs_bucket}/{name}") as f:
      f.write(b"x")
  client, _ = read._gcs_client()
  bucket = gcs_bucket[len("gs://"):]
  pages = [[blob.name for blob in page] for page in client.list_blobs(bucket, prefix="paged/", page_size=3).pages]
  assert pages == [names[0:3], names[3:6], names[6:]]
  # startOffset (inclusive) and endOffset (exclusive) bound the names, as GCS's do (listing.py splits by them).
  ranged = client.list_blobs(bucket, prefix="paged/", page_size=3, start_offset="paged/02", end_offset="paged/05.jpg")
  assert [[blob.name for blob in page] for page in ranged.pages] == [names[2:5]]
  # Our own listing's pages (listing.PAGE_SIZE, the most GCS sends) see every object once.
  assert [uri for uri, _ in listing.match_gcs(f"{gcs_bucket}/paged/*.jpg")] == [f"{gcs_bucket}/{n}" for n in names]
