"""The cache of models as engines run them: a frozen TensorFlow graph read back computes what a fresh build does, without building; keys; damaged entries."""

import dataclasses
import logging
import os

import numpy as np
import pytest

from tests.recipe import relative_l2
from transforms import fused, model_cache
from transforms.weights import BackboneSpec, resolve_weights


def _spec(name, size):
  return BackboneSpec(name, size, resolve_weights("random", name, size))


def _images(sizes, n=5):
  rng = np.random.RandomState(3)
  return {s: rng.randint(0, 256, (n, s, s, 3), dtype=np.uint8) for s in sizes}


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
  monkeypatch.setenv(model_cache.CACHE_ENV, str(tmp_path / "cache"))
  return tmp_path / "cache"


def _no_build(*args, **kwargs):
  raise AssertionError("a cached model must not be built again")


def test_a_frozen_graph_is_read_back_without_building_and_gives_the_same_rows(cache_dir, monkeypatch):
  specs = [_spec("mobilenet_v3_small", 32), _spec("mobilenet_v2", 40)]
  images = _images((32, 40))
  built = fused.FusedModel(specs, normalize="l2")
  want = built(images)
  assert built.models is not None and built._frozen is not None
  (entry,) = cache_dir.iterdir()
  assert entry.name.startswith("tensorflow-") and sorted(os.listdir(entry)) == ["graph.pb", "signature.json"]
  monkeypatch.setattr(fused, "load_features", _no_build)
  cached = fused.FusedModel(specs, normalize="l2")
  assert cached.models is None and cached.dim == 576 + 1280 and cached.sizes == (32, 40)
  got = cached(images)
  assert got.dtype == np.float32 and got.shape == want.shape
  np.testing.assert_array_equal(got, want)  # the same graph, the same Grappler passes
  assert relative_l2(cached({s: a[:1] for s, a in images.items()}), want[:1]).max() < 1e-5  # any batch size
  # what changes the graph is another model: pooling, normalize, a size, mixed precision
  for other in (dict(pooling="max"), dict(normalize="none"), dict(mixed_precision=True)):
    with pytest.raises(AssertionError, match="must not be built"):
      fused.FusedModel(specs, **{"normalize": "l2", **other})
  with pytest.raises(AssertionError, match="must not be built"):
    fused.FusedModel([_spec("mobilenet_v3_small", 48), specs[1]], normalize="l2")


def test_unfrozen_models_and_an_engine_that_converts_the_graph_itself_are_not_cached(cache_dir):
  fused.FusedModel([_spec("vgg16", 32)])  # no BatchNormalization: never frozen, nothing to keep
  fused.FusedModel([_spec("mobilenet_v3_small", 32)], freeze=False)
  assert not cache_dir.exists() or not list(cache_dir.iterdir())


def test_no_cache_when_off_and_a_damaged_entry_is_made_again(cache_dir, monkeypatch, caplog):
  specs = [_spec("mobilenet_v3_small", 32)]
  images = _images((32,))
  monkeypatch.setenv(model_cache.CACHE_ENV, "off")
  want = fused.FusedModel(specs)(images)
  assert not cache_dir.exists()
  monkeypatch.setenv(model_cache.CACHE_ENV, str(cache_dir))
  fused.FusedModel(specs)
  (entry,) = cache_dir.iterdir()
  (entry / "graph.pb").write_bytes(b"\x00 not a graph")
  with caplog.at_level(logging.WARNING, logger="transforms.model_cache"):
    got = fused.FusedModel(specs)(images)
  lines = [r.getMessage() for r in caplog.records]
  assert len(lines) == 1 and "could not read" in lines[0] and "\n" not in lines[0]
  np.testing.assert_array_equal(got, want)
  assert (entry / "graph.pb").stat().st_size > 1000  # written again


def test_keys_name_the_engine_and_change_with_what_the_model_is_made_of():
  specs = (_spec("mobilenet_v2", 32),)
  key = model_cache.model_key("tensorflow", specs, "avg")
  assert key.startswith("tensorflow-") and key == model_cache.model_key("tensorflow", specs, "avg")
  assert len({key, model_cache.model_key("openvino", specs, "avg"), model_cache.model_key("tensorflow", specs, "max"),
              model_cache.model_key("tensorflow", (_spec("mobilenet_v2", 40),), "avg")}) == 4
  weights = dataclasses.replace(specs[0].weights, fingerprint="sha256:" + "0" * 64)
  assert model_cache.model_key("tensorflow", (dataclasses.replace(specs[0], weights=weights),), "avg") != key


def test_keys_change_with_the_tensorflow_distribution_installed_whatever_its_name(monkeypatch):
  # tensorflow-cpu (as on this machine and CPU workers) is TensorFlow too: its upgrade is a new key.
  from transforms import write
  specs = (_spec("mobilenet_v2", 32),)
  installed = {"tensorflow-cpu": "2.20.0", "keras": "3.12.0"}
  monkeypatch.setattr(model_cache, "installed_version",
                      lambda *names: next((installed[n] for n in names if n in installed), None))
  key = model_cache.model_key("tensorflow", specs, "avg")
  installed["tensorflow-cpu"] = "2.21.0"
  assert model_cache.model_key("tensorflow", specs, "avg") != key
  assert "tensorflow-cpu" in write.TENSORFLOW_DISTRIBUTIONS


def test_keras_weights_file_name_is_learned_once_then_known_without_tensorflow(cache_dir):
  # A nightly --weights imagenet launch: the first process derives the name from Keras (importing
  # TensorFlow); the next finds it in the cache and imports no TensorFlow at all.
  import json
  import subprocess
  import sys
  code = ("import json, sys\nfrom transforms.weights import resolve_weights\n"
          "source = resolve_weights('imagenet', 'mobilenet_v2', 96)\n"
          "print(json.dumps([source.fingerprint, 'tensorflow' in sys.modules]))\n")
  env = dict(os.environ, **{model_cache.CACHE_ENV: str(cache_dir)})
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  runs = [json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                    cwd=repo, env=env, timeout=300).stdout.strip().splitlines()[-1])
          for _ in range(2)]
  want = "imagenet:mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_96_no_top.h5"
  assert runs == [[want, True], [want, False]]
