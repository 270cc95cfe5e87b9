"""transforms/listing.py: globs matched as Beam matches them, with what the listing said; gs:// in pages."""

import os

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.testing.util import assert_that, equal_to

from transforms.listing import PAGE_SIZE, Listed, ListInputs, match_pattern

NAMES = ["a/x.jpg", "a/b/y.jpg", "a/b/c/z.jpg", "a/b/c/z.png", "top.jpg"]


def _beam(pattern):
  return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)


def _ours(pattern):
  return sorted(uri for uri, _ in match_pattern(pattern))


def test_local_listing_matches_as_beam_does_with_size_and_mtime_ns(tmp_path):
  for i, name in enumerate(NAMES):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * (i + 1))
  for pattern in ("**/*.jpg", "a/**/*.jpg", "**", "a/*.jpg", "a/b/c/z.*", "a/b/?/z.jpg", "top.jpg", "nothing/*"):
    assert _ours(f"{tmp_path}/{pattern}") == _beam(f"{tmp_path}/{pattern}"), pattern
  listed = dict(match_pattern(f"{tmp_path}/a/b/y.jpg"))
  stat = os.stat(tmp_path / "a/b/y.jpg")
  assert listed == {f"{tmp_path}/a/b/y.jpg": Listed(size=2, mtime_ns=stat.st_mtime_ns)}
  os.utime(tmp_path / "a/b/y.jpg", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # 1 ns later: another listing
  assert dict(match_pattern(f"{tmp_path}/a/b/y.jpg")) != listed


def test_list_inputs_gives_each_object_once(tmp_path):
  for name in NAMES:
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_bytes(b"x")
  with beam.Pipeline() as p:
    uris = p | ListInputs([f"{tmp_path}/**/*.jpg", f"{tmp_path}/a/*.jpg"]) | beam.Keys()
    assert_that(uris, equal_to([f"{tmp_path}/{n}" for n in ("a/x.jpg", "a/b/y.jpg", "a/b/c/z.jpg")]))


def test_gcs_listing_carries_generation_crc32c_md5_in_one_request_a_page(gcs_proxy):
  bucket = gcs_proxy.bucket
  for name in NAMES:
    with FileSystems.create(f"{bucket}/{name}") as f:
      f.write(name.encode())
  for pattern in ("**/*.jpg", "a/**/*.jpg", "**", "a/*.jpg", "a/b/c/z.*", "top.jpg"):
    assert _ours(f"{bucket}/{pattern}") == _beam(f"{bucket}/{pattern}"), pattern

  from google.cloud import storage
  blob = storage.Client(project="test").bucket("test-bucket").get_blob("a/b/y.jpg")
  gcs_proxy.reset_counts()
  listed = dict(match_pattern(f"{bucket}/a/b/y.*"))
  assert listed == {f"{bucket}/a/b/y.jpg": Listed(size=len(b"a/b/y.jpg"), generation=int(blob.generation),
                                                   crc32c=blob.crc32c, md5=blob.md5_hash)}
  assert listed[f"{bucket}/a/b/y.jpg"].crc32c and listed[f"{bucket}/a/b/y.jpg"].generation
  assert gcs_proxy.counts["list"] == 1 and gcs_proxy.counts["read"] + gcs_proxy.counts["metadata"] == 0


def test_gcs_listing_is_one_request_and_retries_under_faults(gcs_proxy):
  # The emulator answers a listing in one page whatever maxResults asks, so paging itself (PAGE_SIZE,
  # 1,000 objects a request on GCS) is google-cloud-storage's iterator, not exercised here.
  bucket = gcs_proxy.bucket
  for i in range(25):
    with FileSystems.create(f"{bucket}/many/{i:02d}.jpg") as f:
      f.write(b"x")
  gcs_proxy.reset_counts()
  assert len(_ours(f"{bucket}/many/*.jpg")) == 25
  # nothing per object (a "bucket" GET may come from Beam's GcsIO of the writes, in the background)
  assert gcs_proxy.counts["list"] == 1 and gcs_proxy.counts["read"] + gcs_proxy.counts["metadata"] == 0
  gcs_proxy.once("list", "503")
  gcs_proxy.once("list", "reset")
  gcs_proxy.reset_counts()
  assert len(_ours(f"{bucket}/many/*.jpg")) == 25
  assert gcs_proxy.counts["list"] == 3
  assert gcs_proxy.outcomes[("list", "503")] == gcs_proxy.outcomes[("list", "reset")] == 1
  assert PAGE_SIZE == 1000


# Names of every shape a split point must fall between: digits, ASCII letters on both sides of the
# digits, a folder, accented and CJK characters, one outside the BMP, a name equal to the prefix's
# folder and one just past the prefix.
_MANY = ([f"photos/{i:05d}.jpg" for i in range(240)] + [f"photos/{c}{i:02d}.png" for c in "AZaz~" for i in range(12)]
         + [f"photos/sub/{i}.jpg" for i in range(30)]
         + ["photos/\u00e9t\u00e9.jpg", "photos/\u4e2d.jpg", "photos/\U0001F600.jpg", "photos/\U0010FFFF.jpg"])
_OUTSIDE = ["photos0.jpg", "photor.jpg", "other/1.jpg"]


def _upload(bucket, names):
  import concurrent.futures

  def one(name):
    with FileSystems.create(f"{bucket}/{name}") as f:
      f.write(name.encode())
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    list(pool.map(one, names))


def test_a_gcs_listing_past_one_page_splits_by_name_across_threads_and_lists_each_object_once(gcs_proxy,
                                                                                              monkeypatch):
  import math
  from urllib.parse import parse_qs, urlsplit

  from transforms import listing
  bucket = gcs_proxy.bucket
  _upload(bucket, _MANY + _OUTSIDE)
  # GCS's pages hold 1,000 and a listing splits after 32: 10 and 4 here, so 324 objects are 33 pages and split.
  monkeypatch.setattr(listing, "PAGE_SIZE", 10)
  monkeypatch.setattr(listing, "_SPLIT_AFTER_PAGES", 4)
  gcs_proxy.reset_counts()
  listed = [uri for uri, _ in match_pattern(f"{bucket}/photos/**")]
  assert sorted(listed) == sorted(f"{bucket}/{n}" for n in _MANY) and len(set(listed)) == len(listed)
  queries = [parse_qs(urlsplit(path).query) for kind, path in gcs_proxy.paths if kind == "list"]
  starts = {q["startOffset"][0] for q in queries if "startOffset" in q}
  assert len(starts) >= listing.LIST_THREADS - 1  # split until the threads were busy
  # Each range costs at most one page more than its objects fill: the requests stay near one per page.
  pages = math.ceil(len(_MANY) / 10)
  assert pages <= len(queries) <= pages + len(starts) + 1, (len(queries), pages, len(starts))
  # A listing of one page is one request, as before; one of up to listing._SPLIT_AFTER_PAGES pages is not split.
  gcs_proxy.reset_counts()
  assert _ours(f"{bucket}/photos/0000*.jpg") == [f"{bucket}/photos/{i:05d}.jpg" for i in range(10)]
  assert gcs_proxy.counts["list"] == 1
  monkeypatch.setattr(listing, "PAGE_SIZE", 3)
  gcs_proxy.reset_counts()
  assert _ours(f"{bucket}/photos/A*.png") == [f"{bucket}/photos/A{i:02d}.png" for i in range(12)]
  assert gcs_proxy.counts["list"] == 4 == listing._SPLIT_AFTER_PAGES


def test_a_split_gcs_listing_under_faults_still_lists_each_object_once(gcs_proxy, monkeypatch):
  from transforms import listing
  bucket = gcs_proxy.bucket
  _upload(bucket, _MANY)
  monkeypatch.setattr(listing, "PAGE_SIZE", 10)
  monkeypatch.setattr(listing, "_SPLIT_AFTER_PAGES", 4)
  gcs_proxy.faults(p503=0.15, p429=0.05, p_reset=0.05, kinds=["list"])
  listed = [uri for uri, _ in match_pattern(f"{bucket}/photos/**")]
  assert sorted(listed) == sorted(f"{bucket}/{n}" for n in _MANY)
  assert gcs_proxy.injected() > 0


def test_a_range_that_fails_fails_the_listing_and_a_listing_stopped_early_ends_its_threads(gcs_proxy, monkeypatch):
  import threading

  import pytest
  from google.api_core import exceptions

  from transforms import listing
  bucket = gcs_proxy.bucket
  _upload(bucket, _MANY)
  monkeypatch.setattr(listing, "PAGE_SIZE", 10)
  monkeypatch.setattr(listing, "_SPLIT_AFTER_PAGES", 4)
  # A permanent error on a later range's request (not retried) must fail the listing, not drop its objects.
  gcs_proxy.down("list", status=403, after=6)
  with pytest.raises(exceptions.Forbidden):
    list(match_pattern(f"{bucket}/photos/**"))
  gcs_proxy.up()
  # A consumer that stops after the first object: the listing threads stop too.
  listed = match_pattern(f"{bucket}/photos/**")
  next(listed)
  listed.close()
  for thread in threading.enumerate():
    if thread.name.startswith("list_"):
      thread.join(timeout=60)
      assert not thread.is_alive(), thread.name
