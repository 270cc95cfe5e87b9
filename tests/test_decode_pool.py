"""Decode isolation: hostile files cost their own decode process and nothing else."""

import pathlib
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from tests import hostile
from tests.corpus import SAMPLES
from transforms import decode_pool
from transforms.decode import PIL_MAX_PIXELS, DecodeError, DecodeSpec, decode_and_resize
from transforms.decode_pool import DecodePool, DecodeProcessError, default_memory_ceiling

NAMES = (("max_pixels", "--max-pixels"), ("timeout", "--decode-timeout"), ("memory", "--decode-memory"))


def spec(max_pixels=PIL_MAX_PIXELS, timeout=60.0, memory=None):
  memory = memory or default_memory_ceiling(max_pixels)
  return DecodeSpec(sizes=(32, 48), max_pixels=max_pixels, timeout=timeout, memory=memory, option_names=NAMES)


class FakeClock:
  """Monotonic seconds that move only when the test says so."""

  def __init__(self):
    self.now = 1000.0

  def __call__(self):
    return self.now


@pytest.fixture
def plugin_env(monkeypatch, tmp_path):
  """Decode processes load the misbehaving test plugin and report blocking decodes in `markers`."""
  markers = tmp_path / "markers"
  markers.mkdir()
  monkeypatch.setenv(decode_pool.PLUGINS_ENV, hostile.PLUGIN_MODULE)
  monkeypatch.setenv("EMBEDTEST_MARKER_DIR", str(markers))
  return markers


def wait_for(condition, what, limit=60.0):
  """Waits on an event another process makes happen; `limit` only bounds a broken run."""
  deadline = time.monotonic() + limit
  while not condition():
    if time.monotonic() > deadline:
      raise AssertionError(f"timed out waiting for {what}")
    time.sleep(0.01)


def alive(pid):
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


GOOD = (SAMPLES / "astronaut.jpg").read_bytes()


def test_a_decode_process_gives_the_in_process_arrays_bit_for_bit():
  pool = DecodePool(1, default_memory_ceiling(PIL_MAX_PIXELS))
  try:
    for path in sorted(SAMPLES.glob("*.jpg")):
      data = path.read_bytes()
      got, want = pool.decode(data, spec()), decode_and_resize(data, (32, 48))
      assert (got.width, got.height) == (want.width, want.height)
      assert all(np.array_equal(got.arrays[s], want.arrays[s]) for s in (32, 48)), path.name
    assert pool.started == 1 and pool.replaced == 0
  finally:
    pool.close()


def test_bad_data_comes_back_as_its_decode_error():
  pool = DecodePool(1, None)
  try:
    with pytest.raises(DecodeError) as e:
      pool.decode(GOOD[: len(GOOD) // 2], spec())
    assert e.value.error_type == "truncated_image"
    assert pool.decode(GOOD, spec()).width == 500 and pool.replaced == 0
  finally:
    pool.close()


def test_a_crashing_codec_costs_its_file_and_the_process_is_replaced(plugin_env):
  pool = DecodePool(1, None)
  try:
    first = next(iter(pool._children)).pid
    with pytest.raises(DecodeProcessError) as e:
      pool.decode(hostile.plugin_file(hostile.ABORT_MAGIC), spec())
    assert e.value.error_type == "decoder_crashed" and "SIGABRT" in str(e.value)
    assert not alive(first)
    assert pool.decode(GOOD, spec()).width == 500  # the replacement decodes the next file
    assert (pool.started, pool.replaced) == (2, 1)
  finally:
    pool.close()


def test_a_group_in_one_round_trip_gives_each_file_its_own_result(plugin_env):
  # One request of five files; the crash in the middle costs its own file only: those after it
  # go to the replacement process, and every result is that of the file in its position.
  pool = DecodePool(1, None)
  try:
    truncated = GOOD[: len(GOOD) // 2]
    datas = [GOOD, truncated, hostile.plugin_file(hostile.ABORT_MAGIC), (SAMPLES / "coffee.jpg").read_bytes(), GOOD]
    results = pool.decode_many(datas, spec())
    assert [type(r).__name__ for r in results] == [
        "DecodedImage", "DecodeError", "DecodeProcessError", "DecodedImage", "DecodedImage"]
    assert results[1].error_type == "truncated_image" and results[2].error_type == "decoder_crashed"
    for data, result in zip(datas, results):
      if not isinstance(result, Exception):
        want = decode_and_resize(data, (32, 48))
        assert all(np.array_equal(result.arrays[s], want.arrays[s]) for s in (32, 48))
    assert (pool.started, pool.replaced) == (2, 1)
  finally:
    pool.close()


def test_a_reply_out_of_protocol_costs_its_file_and_the_process_not_a_hang(monkeypatch):
  pool = DecodePool(1, None)
  parse = decode_pool._parse_reply
  replies = []

  def garbled_once(reply):
    replies.append(1)
    if len(replies) == 2:
      raise ValueError("not a reply")
    return parse(reply)

  monkeypatch.setattr(decode_pool, "_parse_reply", garbled_once)
  try:
    first = next(iter(pool._children)).pid
    results = pool.decode_many([GOOD, GOOD, GOOD], spec())
    assert [type(r).__name__ for r in results] == ["DecodedImage", "DecodeProcessError", "DecodedImage"]
    assert results[1].error_type == "decoder_crashed" and not alive(first) and pool.replaced == 1
  finally:
    pool.close()


def test_a_group_larger_than_the_request_bound_is_split(monkeypatch):
  monkeypatch.setattr(decode_pool, "_GROUP_BYTES", len(GOOD) + 1)  # one file a request
  pool = DecodePool(1, None)
  sent = []
  original = decode_pool._Child.send
  monkeypatch.setattr(decode_pool._Child, "send", lambda child, payload: sent.append(1) or original(child, payload))
  try:
    assert [r.width for r in pool.decode_many([GOOD] * 3, spec())] == [500] * 3
    assert len(sent) == 3
  finally:
    pool.close()


def test_a_decode_past_its_deadline_is_killed_on_the_injected_clock(plugin_env):
  clock = FakeClock()
  pool = DecodePool(1, None, clock=clock)
  try:
    blocked = next(iter(pool._children)).pid
    outcome = {}

    def decode_blocking_file():
      try:
        pool.decode(hostile.plugin_file(hostile.BLOCK_MAGIC), spec(timeout=5))
      except DecodeProcessError as e:
        outcome["error"] = e

    thread = threading.Thread(target=decode_blocking_file)
    thread.start()
    wait_for(lambda: any(plugin_env.iterdir()), "the decode to block")
    clock.now += 4.9
    assert thread.is_alive() and alive(blocked)  # not yet at its deadline
    clock.now += 0.2
    thread.join(60)
    assert outcome["error"].error_type == "decode_timeout"
    assert "--decode-timeout=5s" in str(outcome["error"])
    assert not alive(blocked)  # stopped, not left decoding in the background
    assert pool.decode(GOOD, spec()).width == 500 and pool.replaced == 1
  finally:
    pool.close()


def test_in_a_group_each_file_has_its_own_deadline_from_the_reply_before_it(plugin_env, monkeypatch):
  clock = FakeClock()
  pool = DecodePool(1, None, clock=clock)
  deadlines = []
  receive = decode_pool._Child.receive
  monkeypatch.setattr(decode_pool._Child, "receive",
                      lambda child, deadline, clock: deadlines.append(deadline) or receive(child, deadline, clock))
  try:
    outcome = {}

    def decode_group():
      outcome["results"] = pool.decode_many([GOOD, hostile.plugin_file(hostile.BLOCK_MAGIC), GOOD], spec(timeout=5))

    thread = threading.Thread(target=decode_group)
    thread.start()
    wait_for(lambda: any(plugin_env.iterdir()), "the second file's decode to block")
    wait_for(lambda: len(deadlines) >= 3, "the second file's deadline")  # ready, first file, second
    clock.now += 4.9
    assert thread.is_alive()
    clock.now += 0.2
    thread.join(60)
    first, blocked, last = outcome["results"]
    assert first.width == 500 and last.width == 500  # the last one decoded by the replacement
    assert blocked.error_type == "decode_timeout" and pool.replaced == 1
  finally:
    pool.close()


def test_pillow_guard_stays_on_inside_the_decode_process():
  # The header says 256x256; the inner PNG is 100 megapixels, over the limit but under Pillow's
  # hard refusal at twice it: only DecompressionBombWarning, raised as an error, stops it.
  icns = hostile.icns_with_inner_png(hostile.blank_png(10_000, 10_000, complete=False))
  with Image.open(__import__("io").BytesIO(icns)) as img:
    assert img.size == (256, 256)
  pool = DecodePool(1, default_memory_ceiling(PIL_MAX_PIXELS))
  try:
    with pytest.raises(DecodeError) as e:
      pool.decode(icns, spec())
    assert e.value.error_type == "decompression_bomb" and "100000000 pixels" in str(e.value)
    assert Image.MAX_IMAGE_PIXELS == PIL_MAX_PIXELS  # this process's Pillow is untouched
  finally:
    pool.close()


def test_the_memory_ceiling_holds_without_a_pixel_limit():
  # 2.5 gigapixels behind a 256x256 header: 10 GB if Pillow were let to allocate it.
  icns = hostile.icns_with_inner_png(hostile.blank_png(50_000, 50_000, complete=False))
  pool = DecodePool(1, 512 << 20)
  try:
    with pytest.raises(DecodeError) as e:
      pool.decode(icns, spec(max_pixels=None, memory=512 << 20))
    assert e.value.error_type == "too_large" and "0.50 GiB (--decode-memory)" in str(e.value)
    assert pool.decode(GOOD, spec(max_pixels=None, memory=512 << 20)).width == 500
    assert pool.replaced == 0  # a MemoryError is an answer, not a crash
    assert pool.peak_rss()["max"] < (512 << 20) + (256 << 20)
  finally:
    pool.close()


def test_close_stops_busy_processes_and_waiting_calls(plugin_env):
  pool = DecodePool(1, None)
  pid = next(iter(pool._children)).pid
  errors = []

  def decode(data):
    try:
      pool.decode(data, spec(timeout=3600))
    except DecodeProcessError as e:
      errors.append(e.error_type)

  threads = [threading.Thread(target=decode, args=(hostile.plugin_file(hostile.BLOCK_MAGIC),)),
             threading.Thread(target=decode, args=(GOOD,))]
  threads[0].start()
  wait_for(lambda: any(plugin_env.iterdir()), "the decode to block")
  threads[1].start()  # waits for the only process
  pool.close()
  for thread in threads:
    thread.join(60)
  assert errors == ["decoder_stopped", "decoder_stopped"] and not alive(pid)


def test_decode_processes_die_with_their_worker_process(tmp_path):
  # A worker process killed outright (SIGKILL, the OOM killer) must not leave decoders behind.
  script = ("import sys\nfrom transforms.decode_pool import DecodePool\n"
            "pool = DecodePool(2, None)\nprint(*[c.pid for c in pool._children], flush=True)\n"
            "sys.stdin.read()\n")
  worker = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            cwd=pathlib.Path(__file__).parent.parent, text=True)
  children = [int(p) for p in worker.stdout.readline().split()]
  assert len(children) == 2 and all(alive(p) for p in children)
  worker.send_signal(signal.SIGKILL)
  worker.wait(60)
  wait_for(lambda: not any(alive(p) for p in children), "the decode processes to die")


def test_one_pool_per_worker_process_shared_by_its_dofns():
  a = decode_pool.acquire_pool(1, None)
  b = decode_pool.acquire_pool(1, None)
  assert a is b
  decode_pool.release_pool(a)
  assert a.decode(GOOD, spec()).width == 500  # still held by the other user
  decode_pool.release_pool(b)
  with pytest.raises(DecodeProcessError):
    a.decode(GOOD, spec())


def test_a_pool_when_needed_starts_processes_at_its_first_decode_and_never_after_its_release():
  key = (1, 123 << 20)  # a memory ceiling no other test's pool has
  lazy = decode_pool.PoolWhenNeeded(*key)
  assert key not in decode_pool._pools  # nothing started yet: an unchanged refresh never decodes
  [image] = lazy.decode_many([GOOD], spec())
  assert image.width == 500 and decode_pool._pools[key][0].started == 1
  lazy.release()
  assert key not in decode_pool._pools  # its one user gone: closed
  [late] = lazy.decode_many([GOOD], spec())
  assert isinstance(late, DecodeProcessError) and late.error_type == "decoder_stopped"
  unused = decode_pool.PoolWhenNeeded(*key)
  unused.release()
  [late] = unused.decode_many([GOOD], spec())
  assert isinstance(late, DecodeProcessError) and key not in decode_pool._pools  # none started after release


@pytest.mark.parametrize("max_pixels,want", [(PIL_MAX_PIXELS, 24 * PIL_MAX_PIXELS), (None, 2 << 30),
                                             (1_000_000, 1 << 30)])
def test_default_memory_ceiling(max_pixels, want):
  assert default_memory_ceiling(max_pixels) == want


def test_a_multi_frame_file_is_judged_by_its_first_frame():
  # Page 1 is a 64x64 picture, page 2 declares 144 megapixels (over the default limit): the
  # first frame is the one embedded, so only it is checked and decoded.
  import io
  out = io.BytesIO()
  first = Image.new("RGB", (64, 64), (200, 30, 30))
  first.save(out, "TIFF", save_all=True, compression="tiff_deflate",
             append_images=[Image.new("L", (12_000, 12_000))])
  data = out.getvalue()
  with Image.open(io.BytesIO(data)) as img:
    assert img.n_frames == 2
    img.seek(1)
    assert img.size[0] * img.size[1] > PIL_MAX_PIXELS
  pool = DecodePool(1, default_memory_ceiling(PIL_MAX_PIXELS))
  try:
    got = pool.decode(data, spec())
    assert (got.width, got.height) == (64, 64) and (got.arrays[32] == (200, 30, 30)).all()
  finally:
    pool.close()
