"""Weight sources: seeded random weights, a directory of weight files (local and gs://), fingerprints."""

import hashlib
import json
import os
import random
import subprocess
import sys
import threading

import h5py
import keras
import pytest
from apache_beam.io.filesystems import FileSystems
from keras.src.legacy.saving import legacy_h5_format

from tests.gcs_emulator import gcs_bucket  # noqa: F401  (pytest fixture)
from transforms.backbones import build_backbone, keras_weights_filename
from transforms.weights import (RANDOM_SEED, WeightsSource, load_backbone, resolve_weights,
                                weights_fingerprint)

# Keras's own TF-variable-to-numpy conversion, on numpy 2: noise from Keras, not from this code.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RANDOM = WeightsSource("random", None, f"random:seed={RANDOM_SEED}:keras={keras.__version__}")
NOT_A_SOURCE = "`weights` must be imagenet, random or an existing directory (local or gs://); received: {!r}"
NO_EFFICIENTNET_B0 = ("`weights` {}: no weights for backbone efficientnet_b0; "
                      "looked for efficientnetb0_notop.h5 and efficientnet_b0.weights.h5")


def _python(script, *args, **env):
  """Runs `script` in a fresh interpreter (new Keras import, new global RNG state); returns its last line."""
  done = subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, capture_output=True, text=True,
                        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **env}, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout.splitlines()[-1]


def _sha256(path):
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def random_fingerprints():
  """Seeded random weights as a first build in this process sees them."""
  return {name: weights_fingerprint(load_backbone(name, size, "avg", RANDOM))
          for name, size in (("mobilenet_v2", 32), ("efficientnet_b0", 32))}


def test_random_weights_are_identical_on_every_build_in_a_process(random_fingerprints):
  # Unseeded builds in between move Python's global RNG on, which seeded builds must not feel.
  build_backbone("mobilenet_v2", 32, "avg", None)
  random.seed(99)
  expected = random_fingerprints["mobilenet_v2"]
  assert weights_fingerprint(load_backbone("mobilenet_v2", 32, "avg", RANDOM)) == expected
  # Input size changes no weight shape, so no weight either.
  assert weights_fingerprint(load_backbone("mobilenet_v2", 64, "avg", RANDOM)) == expected
  assert random_fingerprints["mobilenet_v2"] != random_fingerprints["efficientnet_b0"]


def test_random_weights_ignore_other_threads_drawing_from_the_global_rng(random_fingerprints):
  stop = threading.Event()

  def draw():
    while not stop.is_set():
      random.randint(1, 10)

  drawer = threading.Thread(target=draw)
  drawer.start()
  try:
    fingerprint = weights_fingerprint(load_backbone("efficientnet_b0", 32, "avg", RANDOM))
  finally:
    stop.set()
    drawer.join()
  assert fingerprint == random_fingerprints["efficientnet_b0"]


def test_random_weights_are_identical_in_another_process(random_fingerprints):
  line = _python(
      "import json\n"
      "from transforms.weights import load_backbone, resolve_weights, weights_fingerprint\n"
      "print(json.dumps({n: weights_fingerprint(load_backbone(n, 32, 'avg', resolve_weights('random', n, 32)))\n"
      "                  for n in ('efficientnet_b0', 'mobilenet_v2')}))\n")
  assert json.loads(line) == random_fingerprints


def test_random_and_imagenet_fingerprints():
  assert resolve_weights("random", "mobilenet_v2", 96) == RANDOM
  assert resolve_weights("imagenet", "mobilenet_v2", 96) == WeightsSource(
      "imagenet", None, "imagenet:mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_96_no_top.h5")


def test_dir_with_a_weights_h5_file_loads_exactly_those_weights(tmp_path):
  saved = build_backbone("mobilenet_v2", 32, "avg", None)
  saved.save_weights(str(tmp_path / "mobilenet_v2.weights.h5"))

  source = resolve_weights(str(tmp_path), "mobilenet_v2", 32)
  assert source == WeightsSource("weights_h5", str(tmp_path / "mobilenet_v2.weights.h5"),
                                 f"sha256:{_sha256(tmp_path / 'mobilenet_v2.weights.h5')}")
  assert resolve_weights(str(tmp_path) + "/", "mobilenet_v2", 32).fingerprint == source.fingerprint
  # A bigger input: the same weights fit, and are the ones in the file.
  loaded = load_backbone("mobilenet_v2", 64, "avg", source)
  assert weights_fingerprint(loaded) == weights_fingerprint(saved)


def test_a_file_changed_after_launch_is_refused(tmp_path):
  build_backbone("mobilenet_v2", 32, "avg", None).save_weights(str(tmp_path / "mobilenet_v2.weights.h5"))
  source = resolve_weights(str(tmp_path), "mobilenet_v2", 32)
  build_backbone("mobilenet_v2", 32, "avg", None).save_weights(str(tmp_path / "mobilenet_v2.weights.h5"))
  with pytest.raises(ValueError) as error:
    load_backbone("mobilenet_v2", 32, "avg", source)
  now = _sha256(tmp_path / "mobilenet_v2.weights.h5")
  assert now != source.fingerprint[len("sha256:"):]
  assert str(error.value) == (f"{tmp_path / 'mobilenet_v2.weights.h5'} changed after launch: its sha256 is now "
                              f"{now}, the run was planned with {source.fingerprint}")


def test_dir_on_gcs_works_like_a_local_one(gcs_bucket, tmp_path):  # noqa: F811
  saved = build_backbone("mobilenet_v2", 32, "avg", None)
  saved.save_weights(str(tmp_path / "mobilenet_v2.weights.h5"))
  uri = f"{gcs_bucket}/weights/mobilenet_v2.weights.h5"
  with open(tmp_path / "mobilenet_v2.weights.h5", "rb") as f, FileSystems.create(uri) as out:
    out.write(f.read())

  source = resolve_weights(f"{gcs_bucket}/weights", "mobilenet_v2", 32)
  assert source == WeightsSource("weights_h5", uri, f"sha256:{_sha256(tmp_path / 'mobilenet_v2.weights.h5')}")
  assert weights_fingerprint(load_backbone("mobilenet_v2", 32, "avg", source)) == weights_fingerprint(saved)
  with pytest.raises(ValueError) as error:
    resolve_weights(f"{gcs_bucket}/weights", "efficientnet_b0", 32)
  assert str(error.value) == NO_EFFICIENTNET_B0.format(f"{gcs_bucket}/weights")
  with pytest.raises(ValueError) as error:
    resolve_weights(f"{gcs_bucket}/no-such-folder", "mobilenet_v2", 32)
  assert str(error.value) == NOT_A_SOURCE.format(f"{gcs_bucket}/no-such-folder")


def _write_keras_file(model, path):
  # keras.applications' ImageNet files are legacy HDF5 weight files, one group per layer, which
  # Keras 3 reads back in layer order: this is the writer of that format Keras 3 still ships.
  with h5py.File(path, "w") as f:
    legacy_h5_format.save_weights_to_hdf5_group(f, model)


_LOAD_FROM_KERAS_CACHE = """
import json, os, sys
from unittest import mock
from keras.src.utils import file_utils
from transforms.weights import keras_cache_dir, load_backbone, resolve_weights, weights_fingerprint

weights_dir, stale = sys.argv[1], sys.argv[2]
cache = keras_cache_dir()
os.makedirs(cache, exist_ok=True)
with open(os.path.join(cache, stale), "wb") as f:
  f.write(b"a stale download")
result = {"cache": cache}
# Keras checks its cached ImageNet files against their published hashes, and no file a test can
# write has those. Only that comparison is bypassed: staging, the graph Keras builds for
# weights="imagenet" and its loading of the file run as they do with the real files. Any
# download attempt fails the test.
with mock.patch.object(file_utils, "validate_file", return_value=True), \\
    mock.patch.object(file_utils, "urlretrieve", side_effect=AssertionError("Keras tried to download")):
  for name, size in (("efficientnet_b0", 32), ("mobilenet_v2", 96)):
    source = resolve_weights(weights_dir, name, size)
    model = load_backbone(name, size, "avg", source)
    result[name] = {
        "source": [source.kind, source.uri, source.fingerprint],
        "weights": weights_fingerprint(model),
        "rescaling_layers": sum(type(layer).__name__ == "Rescaling" for layer in model.layers),
    }
  # A second load finds the staged file in place.
  load_backbone("mobilenet_v2", 96, "avg", resolve_weights(weights_dir, "mobilenet_v2", 96))
result["cached_files"] = sorted(os.listdir(cache))
print(json.dumps(result))
"""


def test_dir_with_keras_own_files_stages_them_into_the_keras_cache(tmp_path, random_fingerprints):
  weights_dir, keras_home = tmp_path / "weights", tmp_path / "keras-home"
  weights_dir.mkdir()
  files = {}
  for name, size in (("efficientnet_b0", 32), ("mobilenet_v2", 96)):
    files[name] = keras_weights_filename(name, size)
    _write_keras_file(load_backbone(name, size, "avg", RANDOM), weights_dir / files[name])
  # Both kinds of file for one backbone: Keras's own wins.
  build_backbone("mobilenet_v2", 32, "avg", None).save_weights(str(weights_dir / "mobilenet_v2.weights.h5"))

  # KERAS_HOME is read once, when keras is imported: hence a fresh process.
  result = json.loads(_python(_LOAD_FROM_KERAS_CACHE, str(weights_dir), files["mobilenet_v2"],
                              KERAS_HOME=str(keras_home)))

  assert result["cache"] == str(keras_home / "models")
  assert result["cached_files"] == sorted(files.values())
  for name, file_name in files.items():
    assert result[name]["source"] == [
        "keras_file", str(weights_dir / file_name), f"sha256:{_sha256(weights_dir / file_name)}"]
    assert _sha256(keras_home / "models" / file_name) == _sha256(weights_dir / file_name)
    assert result[name]["weights"] == random_fingerprints[name]
  # Built as with weights="imagenet": EfficientNet's extra ImageNet-only Rescaling is there.
  assert result["efficientnet_b0"]["rescaling_layers"] == 2
  assert sum(type(layer).__name__ == "Rescaling"
             for layer in build_backbone("efficientnet_b0", 32, "avg", None).layers) == 1


def test_dir_without_the_files_names_the_backbone_and_both_file_names(tmp_path):
  with pytest.raises(ValueError) as error:
    resolve_weights(str(tmp_path), "efficientnet_b0", 32)
  assert str(error.value) == NO_EFFICIENTNET_B0.format(tmp_path)


@pytest.mark.parametrize("spec", ["imagenett", "", "/no/such/dir", "gopher://host/dir"])
def test_a_value_that_is_no_source_names_the_argument_and_the_value(spec):
  with pytest.raises(ValueError) as error:
    resolve_weights(spec, "mobilenet_v2", 32)
  assert str(error.value) == NOT_A_SOURCE.format(spec)


def test_a_file_is_not_a_directory(tmp_path):
  (tmp_path / "mobilenet_v2.weights.h5").write_bytes(b"x")
  with pytest.raises(ValueError) as error:
    resolve_weights(str(tmp_path / "mobilenet_v2.weights.h5"), "mobilenet_v2", 32)
  assert str(error.value) == NOT_A_SOURCE.format(str(tmp_path / "mobilenet_v2.weights.h5"))


def test_weights_fingerprint_tracks_every_weight():
  model = build_backbone("mobilenet_v2", 32, "avg", None)
  before = weights_fingerprint(model)
  assert before == weights_fingerprint(model)
  weights = model.get_weights()
  weights[-1] = weights[-1] + 1.0
  model.set_weights(weights)
  assert weights_fingerprint(model) != before


def test_backbone_spec_takes_dim_and_preprocessing_from_the_registry_unless_launch_set_them():
  from transforms.weights import BackboneSpec
  whole = BackboneSpec("resnet50", 224, RANDOM)
  assert (whole.base, whole.dim, whole.preprocessing, whole.layer, whole.model) == ("resnet50", 2048, "caffe", None, None)
  layer = BackboneSpec("resnet50:conv4_block6_out", 224, RANDOM, layer="conv4_block6_out", feature_dim=1024)
  assert (layer.base, layer.dim, layer.preprocessing) == ("resnet50", 1024, "caffe")
