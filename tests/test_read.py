"""Read stage: bytes and digests of local files, and the DoFn's load_file turning unreadable files into read errors."""

import hashlib
import os

import numpy as np
import pytest

from transforms import read
from transforms.decode import DecodeSpec
from transforms.load import load_file
from transforms.read import read_bytes, sha256_hex

SPEC = DecodeSpec(sizes=(32,), max_pixels=None)


def test_read_bytes_returns_the_whole_file_across_chunks(tmp_path):
  data = np.random.default_rng(0).bytes(2 * read._CHUNK + 12345)  # three reads, the last one short
  path = tmp_path / "big.bin"
  path.write_bytes(data)
  assert read_bytes(str(path)) == data
  (tmp_path / "empty.jpg").write_bytes(b"")
  assert read_bytes(str(tmp_path / "empty.jpg")) == b""


def test_read_bytes_takes_names_literally_never_as_globs(tmp_path):
  # A matched uri is read as it is: [ ], * and ? are not pattern characters here.
  for name in ("photo [1].jpg", "photo [!1].jpg", "star*.jpg", "what?.jpg", "café, \"quoted\".jpg"):
    (tmp_path / name).write_bytes(name.encode())
  (tmp_path / "photo 1.jpg").write_bytes(b"the wrong file")
  for name in ("photo [1].jpg", "photo [!1].jpg", "star*.jpg", "what?.jpg", "café, \"quoted\".jpg"):
    assert read_bytes(str(tmp_path / name)) == name.encode()


def test_read_bytes_raises_for_missing_files_and_directories(tmp_path):
  with pytest.raises(FileNotFoundError):
    read_bytes(str(tmp_path / "gone.jpg"))
  with pytest.raises(IsADirectoryError):
    read_bytes(str(tmp_path))


def test_sha256_hex_is_the_standard_digest():
  assert sha256_hex(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
  assert sha256_hex(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
  data = np.random.default_rng(1).bytes(100_000)
  assert sha256_hex(data) == hashlib.sha256(data).hexdigest()


def _assert_read_error(item, uri, error_type):
  assert item.uri == uri and item.image is None and item.sha256 is None
  assert item.error["uri"] == uri and item.error["stage"] == "read"
  assert item.error["error_type"] == error_type
  assert item.error["message"].startswith("could not read file:") and uri in item.error["message"]


def test_load_file_a_file_gone_since_listing_is_a_read_error(tmp_path):
  path = tmp_path / "vanished.jpg"
  path.write_bytes(b"listed, then deleted")
  path.unlink()
  _assert_read_error(load_file(str(path), SPEC), str(path), "FileNotFoundError")


def test_load_file_a_directory_is_a_read_error(tmp_path):
  _assert_read_error(load_file(str(tmp_path), SPEC), str(tmp_path), "IsADirectoryError")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads a chmod 000 file anyway")
def test_load_file_an_unreadable_file_is_a_read_error(tmp_path):
  path = tmp_path / "locked.jpg"
  path.write_bytes(b"\xff\xd8 not for you")
  path.chmod(0)
  try:
    _assert_read_error(load_file(str(path), SPEC), str(path), "PermissionError")
  finally:
    path.chmod(0o644)


def test_load_file_bad_bytes_are_a_decode_error_with_the_digest(tmp_path):
  path = tmp_path / "page.jpg"
  path.write_bytes(b"<html>not an image</html>")
  item = load_file(str(path), SPEC)
  assert item.error["stage"] == "decode" and item.error["error_type"] == "unidentified_image"
  assert item.sha256 == hashlib.sha256(b"<html>not an image</html>").hexdigest()
