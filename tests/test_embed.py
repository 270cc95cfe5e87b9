"""Embed stage: the fused model against the Keras recipe, and batch fault isolation."""

import hashlib

import numpy as np
import tensorflow as tf

from tests.recipe import keras_preprocess_input, relative_l2
from transforms.decode import DecodeSpec
from transforms.embed import ReadAhead, load_file, load_files
from transforms.fused import FusedModel, embed_robust
from transforms.weights import BackboneSpec, load_backbone, resolve_weights


class _Model:
  """A stand-in model with scripted faults: out of memory above a batch size, or a poisoned image."""

  def __init__(self, oom_above=None, poison=()):
    self.oom_above, self.poison, self.calls = oom_above, set(poison), []

  def __call__(self, images):
    batch = images[8]
    self.calls.append(len(batch))
    if self.oom_above and len(batch) > self.oom_above:
      raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")
    if any(int(image[0, 0, 0]) in self.poison for image in batch):
      raise ValueError("bad image")
    return batch[:, 0, 0, :1].astype(np.float32)


def _images(n):
  a = np.zeros((n, 8, 8, 3), np.uint8)
  a[:, 0, 0, 0] = np.arange(n)
  return {8: a}


def test_embed_robust_plain_batch():
  emb, ok, failures, max_batch = embed_robust(_Model(), _images(10), 4)
  assert ok == list(range(10)) and failures == [] and max_batch == 4
  np.testing.assert_array_equal(emb[:, 0], np.arange(10))


def test_out_of_memory_halves_the_batch_and_keeps_it_halved():
  model = _Model(oom_above=3)
  emb, ok, failures, max_batch = embed_robust(model, _images(16), 16)
  assert ok == list(range(16)) and not failures
  assert max_batch <= 3
  np.testing.assert_array_equal(emb[:, 0], np.arange(16))
  model.calls.clear()
  embed_robust(model, _images(6), max_batch)
  assert max(model.calls) <= 3  # the next batch starts at the size that worked


def test_bad_image_is_isolated_and_neighbours_embed():
  emb, ok, failures, _ = embed_robust(_Model(poison={5}), _images(12), 12)
  assert ok == [i for i in range(12) if i != 5]
  assert [i for i, _ in failures] == [5] and isinstance(failures[0][1], ValueError)
  np.testing.assert_array_equal(emb[:, 0], ok)


def test_fused_model_matches_keras_recipe_per_backbone_and_concatenates():
  # Two backbones, two preprocessing modes (tf for MobileNetV2, torch for
  # DenseNet) and two sizes; same seeded weights on both sides.
  specs = [BackboneSpec("mobilenet_v2", 64, resolve_weights("random", "mobilenet_v2", 64)),
           BackboneSpec("densenet121", 48, resolve_weights("random", "densenet121", 48))]
  model = FusedModel(specs)
  rng = np.random.default_rng(0)
  images = {64: rng.integers(0, 256, (5, 64, 64, 3), dtype=np.uint8),
            48: rng.integers(0, 256, (5, 48, 48, 3), dtype=np.uint8)}
  got = model(images)
  assert got.dtype == np.float32 and got.shape == (5, 1280 + 1024)
  parts = []
  for spec in specs:
    keras_model = load_backbone(spec.name, spec.size, "avg", spec.weights)
    x = keras_preprocess_input(spec.name)(images[spec.size].astype(np.float32))
    parts.append(keras_model.predict(x, verbose=0))
  want = np.concatenate(parts, axis=1)
  assert relative_l2(got, want).max() < 1e-5


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
  decoder = lambda data, spec: calls.append(data)
  item = load_file(str(tmp_path / "a.png"), DecodeSpec(sizes=(32,)), decoder, previous_sha256=sha256_hex(data))
  assert item.carried and item.sha256 == sha256_hex(data) and calls == []


def test_decoder_failures_keep_their_error_type(tmp_path):
  from transforms.decode_pool import DecodeProcessError
  (tmp_path / "x.jpg").write_bytes(b"anything")

  def crashing(data, spec):
    raise DecodeProcessError("decoder_crashed", "its decode process was killed by signal 11 (SIGSEGV)")

  item = load_file(str(tmp_path / "x.jpg"), DecodeSpec(sizes=(32,)), crashing)
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
  ahead = ReadAhead(lambda x: x * 10, executor)
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
  ahead = ReadAhead(None, executor, lambda group: [x * 10 for (x,) in group], group=2)
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

  class Counting:  # decode_many's pool as load_files finds it, counting round trips
    decode = pool.decode

    def decode_many(self, datas, spec):
      calls.append(len(datas))
      return decode_many(datas, spec)

  counting = Counting()
  try:
    paths = [str(tmp_path / n) for n in ("a.png", "gone.jpg", "b.png", "c.jpg", "a.png")]
    previous = sha256_hex((tmp_path / "a.png").read_bytes())
    requests = [(p, spec, pool.decode, previous if i == 4 else None, None) for i, p in enumerate(paths)]
    got = load_files(requests, counting.decode_many)
    assert calls == [3]  # a, b and c in one round trip; gone unread, the last a carried over
    want = [load_file(*r) for r in requests]
    for g, w in zip(got, want):
      assert (g.uri, g.sha256, g.error, g.carried) == (w.uri, w.sha256, w.error, w.carried)
      assert (g.image is None) == (w.image is None)
      if g.image is not None:
        assert (g.image.width, g.image.height) == (w.image.width, w.image.height)
        assert np.array_equal(g.image.arrays[32], w.image.arrays[32])
    assert [g.error["error_type"] for g in got if g.error] == ["FileNotFoundError", "unidentified_image"]
  finally:
    pool.close()
