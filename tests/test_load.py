"""Load stage: read, hash and decode ahead, every failure a verdict."""

import hashlib

import numpy as np

from transforms.decode import DecodeSpec
from transforms.load import Loader, LoadRequest, ReadAhead, load_file


def test_load_file_turns_a_missing_file_into_a_read_error(tmp_path):
  spec = DecodeSpec(sizes=(32,), max_pixels=None)
  item = load_file(str(tmp_path / "gone.jpg"), spec)
  assert item.image is None and item.error["stage"] == "read" and item.error["error_type"] == "FileNotFoundError"
  (tmp_path / "text.jpg").write_text("<html>not an image</html>")
  item = load_file(str(tmp_path / "text.jpg"), spec)
  assert (item.error["stage"], item.error["error_type"]) == ("decode", "unidentified_image")
  assert item.sha256 == hashlib.sha256(b"<html>not an image</html>").hexdigest()


def test_load_file_skips_the_decode_of_unchanged_bytes(tmp_path):
  from PIL import Image
  from transforms.read import sha256_hex
  Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "a.png")
  data = (tmp_path / "a.png").read_bytes()
  calls = []

  class Recording:
    def decode_many(self, datas, spec):
      calls.append(datas)

  item = load_file(str(tmp_path / "a.png"), DecodeSpec(sizes=(32,)), Recording(), known=[sha256_hex(data)])
  assert item.reused and item.sha256 == sha256_hex(data) and calls == []


def test_decoder_failures_keep_their_error_type(tmp_path):
  from transforms.decode_pool import DecodeProcessError
  (tmp_path / "x.jpg").write_bytes(b"anything")

  class Crashing:
    def decode_many(self, datas, spec):
      return [DecodeProcessError("decoder_crashed", "its decode process was killed by signal 11 (SIGSEGV)")]

  item = load_file(str(tmp_path / "x.jpg"), DecodeSpec(sizes=(32,)), Crashing())
  assert (item.error["stage"], item.error["error_type"]) == ("decode", "decoder_crashed")
  assert "SIGSEGV" in item.error["message"]


class _ManualExecutor:
  """Runs submitted work only when the test says so, in the order the test chooses."""

  def __init__(self):
    import concurrent.futures
    self._futures = concurrent.futures
    self.queued = []

  def submit(self, fn, *args):
    future = self._futures.Future()
    self.queued.append((future, fn, args))
    return future

  def run(self, index):
    future, fn, args = self.queued[index]
    future.set_result(fn(*args))


def test_read_ahead_hands_items_back_in_submission_order_whatever_finishes_first():
  executor = _ManualExecutor()
  ahead = ReadAhead(lambda group: [x * 10 for x in group], executor)
  for i in range(3):
    ahead.submit(f"item{i}", i)
  assert len(ahead) == 3
  executor.run(2)
  executor.run(0)  # the third finished first; the first is still handed back first
  assert ahead.next() == ("item0", 0)
  executor.run(1)
  assert [ahead.next(), ahead.next()] == [("item1", 10), ("item2", 20)]
  assert len(ahead) == 0


def test_read_ahead_in_groups_sends_full_groups_and_the_rest_when_wanted():
  executor = _ManualExecutor()
  ahead = ReadAhead(lambda group: [x * 10 for x in group], executor, group=2)
  for i in range(3):
    ahead.submit(f"item{i}", i)
  assert len(ahead) == 3 and len(executor.queued) == 1  # the third waits for a partner
  executor.run(0)
  assert [ahead.next(), ahead.next()] == [("item0", 0), ("item1", 10)]
  assert len(executor.queued) == 1
  executor.submit = lambda fn, *args: _done(fn(*args))
  assert ahead.next() == ("item2", 20)  # wanted: sent alone
  assert len(ahead) == 0


def _done(value):
  import concurrent.futures
  future = concurrent.futures.Future()
  future.set_result(value)
  return future


def test_load_files_decodes_a_pools_files_in_one_call_and_matches_load_file(tmp_path):
  from PIL import Image
  from transforms.decode_pool import DecodePool
  from transforms.read import sha256_hex
  Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "a.png")
  Image.new("L", (20, 50), 90).save(tmp_path / "b.png")
  (tmp_path / "c.jpg").write_text("<html>not an image</html>")
  spec = DecodeSpec(sizes=(32,))
  pool = DecodePool(1, None)
  calls = []
  decode_many = pool.decode_many

  class Counting:  # the pool, counting round trips
    def decode_many(self, datas, spec):
      calls.append(len(datas))
      return decode_many(datas, spec)

  try:
    paths = [str(tmp_path / n) for n in ("a.png", "gone.jpg", "b.png", "c.jpg", "a.png")]
    previous = sha256_hex((tmp_path / "a.png").read_bytes())
    requests = [LoadRequest(p, known=(previous,) if i == 4 else ()) for i, p in enumerate(paths)]
    got = Loader(Counting(), spec).load_many(requests)
    assert calls == [3]  # a, b and c in one round trip; gone unread, the last a carried over
    want = [load_file(r.uri, spec, pool, r.known) for r in requests]
    for g, w in zip(got, want):
      assert (g.uri, g.sha256, g.error, g.reused) == (w.uri, w.sha256, w.error, w.reused)
      assert (g.image is None) == (w.image is None)
      if g.image is not None:
        assert (g.image.width, g.image.height) == (w.image.width, w.image.height)
        assert np.array_equal(g.image.arrays[32], w.image.arrays[32])
    assert [g.error["error_type"] for g in got if g.error] == ["FileNotFoundError", "unidentified_image"]
  finally:
    pool.close()


def test_a_fifo_a_device_a_folder_and_a_file_over_the_ceiling_cost_their_own_rows_unread(tmp_path):
  import os
  import threading

  from PIL import Image
  from transforms.load import InProcessDecoder
  Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "a.png")
  os.mkfifo(tmp_path / "fifo.jpg")  # read, it would wait for a writer for good
  (tmp_path / "zero.jpg").symlink_to("/dev/zero")  # read, it would never end
  (tmp_path / "folder.jpg").mkdir()
  with open(tmp_path / "big.jpg", "wb") as f:
    f.truncate(64 << 20)  # sparse: 64 MiB to read, nothing on disk
  spec = DecodeSpec(sizes=(32,), memory=32 << 20, option_names=(("memory", "--decode-memory"),))
  names = ["fifo.jpg", "zero.jpg", "folder.jpg", "big.jpg", "a.png"]
  got = []
  loading = threading.Thread(target=lambda: got.extend(
      Loader(InProcessDecoder(), spec).load_many([LoadRequest(str(tmp_path / n)) for n in names])), daemon=True)
  loading.start()
  loading.join(120)  # bounds only a broken build, which would wait on the FIFO forever
  assert not loading.is_alive(), "a read is still waiting"
  assert [(g.error["stage"], g.error["error_type"]) if g.error else None for g in got] == [
      ("read", "NotARegularFile"), ("read", "NotARegularFile"), ("read", "IsADirectoryError"),
      ("decode", "too_large"), None]
  assert got[0].error["message"].startswith("could not read file: not a regular file (a FIFO, a socket or a device)")
  assert got[2].error["message"] == f"could not read file: [Errno 21] Is a directory: '{tmp_path / 'folder.jpg'}'"
  assert got[3].error["message"] == (f"the file is {64 << 20:,} bytes, over the decode process's memory ceiling of "
                                     "0.03 GiB (--decode-memory); it was not read")
  assert got[3].sha256 is None and got[4].image.width == 40


def test_an_object_listed_over_the_ceiling_is_too_large_unread_on_any_filesystem():
  # The store is never asked: no bucket exists, so a read would fail otherwise.
  from transforms.load import InProcessDecoder
  spec = DecodeSpec(sizes=(32,), memory=32 << 20, option_names=(("memory", "--decode-memory"),))
  requests = [LoadRequest("gs://no-such-bucket/huge.jpg", size=20 << 30),
              LoadRequest("mem://nowhere/huge.jpg", size=(32 << 20) + 1)]
  got = Loader(InProcessDecoder(), spec).load_many(requests)
  assert [(g.error["stage"], g.error["error_type"], g.sha256) for g in got] == [("decode", "too_large", None)] * 2
  assert got[0].error["message"] == (f"the file is {20 << 30:,} bytes, over the decode process's memory ceiling of "
                                     "0.03 GiB (--decode-memory); it was not read")
