"""transforms/read.py on gs://, against the local GCS emulator: bytes, errors, one client per thread."""

import os
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import pytest
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.gcp import gcsio
from google.api_core import exceptions as api_exceptions

from tests.gcs_emulator import gcs_bucket  # noqa: F401  (pytest fixture)
from transforms import read
from transforms.read import read_bytes, sha256_hex


def _write(path, data):
  with FileSystems.create(path, compression_type="uncompressed") as f:
    f.write(data)


def _read_with_filesystems(path):
  with FileSystems.open(path, compression_type="uncompressed") as f:
    return f.read()


@pytest.fixture
def count_clients(monkeypatch):
  built = []
  real = gcsio.create_storage_client

  def counting(options, *args, **kwargs):
    built.append(options)
    return real(options, *args, **kwargs)

  monkeypatch.setattr(gcsio, "create_storage_client", counting)
  return built


def test_gcs_bytes_equal_what_was_written(gcs_bucket):
  blobs = {
      "photos/a.jpg": os.urandom(50_000),
      "photos/deep/er/b.jpg": os.urandom(3 << 20),  # several of Beam's read chunks
      "photos/empty.jpg": b"",
      "photos/name with spaces & ü.jpg": b"\xff\xd8 not really a jpeg",
  }
  for name, data in blobs.items():
    _write(f"{gcs_bucket}/{name}", data)
  for name, data in blobs.items():
    got = read_bytes(f"{gcs_bucket}/{name}")
    assert got == data, name
    assert got == _read_with_filesystems(f"{gcs_bucket}/{name}"), name
    assert sha256_hex(got) == sha256_hex(data)


def test_an_object_with_no_listed_size_is_read_up_to_the_ceiling_and_no_further(gcs_bucket, tmp_path):
  # A manifest's row has no listing: the download itself stops past max_bytes, and an object
  # within it reads whole, its checksum checked as before. The same through Beam's filesystems
  # (any other scheme; a local path here, which read_bytes itself reads with fstat).
  from transforms.decode import DecodeSpec
  from transforms.load import InProcessDecoder, LoadRequest, Loader
  big, fits = os.urandom(3 << 20), os.urandom(1 << 20)
  for root, read_at in ((gcs_bucket, read_bytes), (str(tmp_path), read._read_through_filesystems)):
    _write(f"{root}/big.jpg", big)
    _write(f"{root}/fits.jpg", fits)
    tracemalloc.start()
    with pytest.raises(read.FileTooLarge, match=r"^the file is more than 1,048,576 bytes, over the 1,048,576 allowed$"):
      read_at(f"{root}/big.jpg", max_bytes=1 << 20)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < (2 << 20), (root, peak)  # never the 3 MiB object whole
    assert read_at(f"{root}/fits.jpg", max_bytes=1 << 20) == fits  # exactly the ceiling: read
    assert read_at(f"{root}/big.jpg", max_bytes=3 << 20) == big
  spec = DecodeSpec(sizes=(32,), memory=1 << 20, option_names=(("memory", "--decode-memory"),))
  got = Loader(InProcessDecoder(), spec).load_many([LoadRequest(f"{gcs_bucket}/big.jpg")])
  assert (got[0].error["stage"], got[0].error["error_type"], got[0].sha256) == ("decode", "too_large", None)
  assert got[0].error["message"] == ("the file is more than 1,048,576 bytes, over the decode process's memory "
                                     "ceiling of 0.00 GiB (--decode-memory); it was not read")


def test_missing_object_raises_the_same_error_as_filesystems(gcs_bucket):
  with pytest.raises(api_exceptions.NotFound):
    read_bytes(f"{gcs_bucket}/photos/missing.jpg")
  # load_file records type(e).__name__ as the errors row's error_type: unchanged.
  with pytest.raises(api_exceptions.NotFound):
    _read_with_filesystems(f"{gcs_bucket}/photos/missing.jpg")


def test_missing_bucket_and_bare_bucket_raise(gcs_bucket):
  with pytest.raises(api_exceptions.NotFound):
    read_bytes("gs://no-such-bucket-here/a.jpg")
  with pytest.raises(ValueError):
    read_bytes(gcs_bucket)  # no object name: FileSystems' own error


def test_one_client_per_thread_reused_across_reads(gcs_bucket, count_clients):
  paths = [f"{gcs_bucket}/img/{i:03d}.jpg" for i in range(40)]
  blobs = [os.urandom(1000 + i) for i in range(len(paths))]
  for path, data in zip(paths, blobs):
    _write(path, data)
  count_clients.clear()

  assert [read_bytes(p) for p in paths] == blobs
  assert len(count_clients) <= 1  # this thread may already hold one from the writes' test helper

  count_clients.clear()
  with ThreadPoolExecutor(4) as pool:
    assert list(pool.map(read_bytes, paths)) == blobs
    assert list(pool.map(read_bytes, paths)) == blobs
  assert 1 <= len(count_clients) <= 4


def test_new_emulator_gets_a_new_client(gcs_bucket, count_clients):
  # The fixture of every test starts an emulator on a fresh port: a client cached
  # by an earlier test in this thread must not be reused against a dead port.
  _write(f"{gcs_bucket}/x.bin", b"x")
  assert read_bytes(f"{gcs_bucket}/x.bin") == b"x"
  cached = read._clients.entry
  assert cached[1][1] == os.environ["STORAGE_EMULATOR_HOST"]


def test_local_and_other_schemes_go_through_filesystems(tmp_path, count_clients):
  path = tmp_path / "a.bin"
  path.write_bytes(b"local bytes")
  assert read_bytes(str(path)) == b"local bytes"
  with pytest.raises(FileNotFoundError):
    read_bytes(str(tmp_path / "missing.bin"))
  assert count_clients == []
