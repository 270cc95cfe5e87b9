"""The fused model against the Keras recipe, and batch fault isolation."""

import numpy as np
import tensorflow as tf

from tests.recipe import keras_preprocess_input, relative_l2
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
