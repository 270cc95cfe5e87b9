"""Backbone registry against keras.applications itself: every family built, every fact checked."""

import json
import os
import subprocess
import sys
from unittest import mock

import keras
import numpy as np
import pytest
import tensorflow as tf

from transforms.backbones import (BACKBONES, build_backbone, format_table, get_backbone,
                                  keras_weights_filename, preprocess)

EXPECTED_NAMES = [
    "vgg16", "vgg19", "resnet50", "resnet101", "resnet152", "resnet50_v2", "resnet101_v2",
    "resnet152_v2", "inception_v3", "inception_resnet_v2", "xception", "mobilenet", "mobilenet_v2",
    "mobilenet_v3_small", "mobilenet_v3_large", "densenet121", "densenet169", "densenet201",
    "nasnet_mobile", "nasnet_large",
    *[f"efficientnet_b{i}" for i in range(8)],
    *[f"efficientnet_v2_{s}" for s in ("b0", "b1", "b2", "b3", "s", "m", "l")],
    "convnext_tiny", "convnext_small", "convnext_base", "convnext_large", "convnext_xlarge",
]

# The no-top ImageNet file each constructor fetches at its minimum size, as keras/src/applications
# names it (the MobileNets fall back to their 224 file below their smallest own size).
KERAS_FILES = {
    **{n: f"{n}_weights_tf_dim_ordering_tf_kernels_notop.h5"
       for n in ("vgg16", "vgg19", "resnet50", "resnet101", "resnet152", "inception_v3",
                 "inception_resnet_v2", "xception", "densenet121", "densenet169", "densenet201")},
    **{f"resnet{d}_v2": f"resnet{d}v2_weights_tf_dim_ordering_tf_kernels_notop.h5" for d in (50, 101, 152)},
    "mobilenet": "mobilenet_1_0_224_tf_no_top.h5",
    "mobilenet_v2": "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
    "mobilenet_v3_small": "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5",
    "mobilenet_v3_large": "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5",
    "nasnet_mobile": "nasnet_mobile_no_top.h5",
    "nasnet_large": "nasnet_large_no_top.h5",
    **{f"efficientnet_b{i}": f"efficientnetb{i}_notop.h5" for i in range(8)},
    **{f"efficientnet_v2_{s}": f"efficientnetv2-{s}_notop.h5" for s in ("b0", "b1", "b2", "b3", "s", "m", "l")},
    **{f"convnext_{s}": f"convnext_{s}_notop.h5" for s in ("tiny", "small", "base", "large", "xlarge")},
}

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One backbone per keras.applications module: each module has its own preprocess_input.
ONE_PER_MODULE = list({getattr(keras.applications, b.constructor).__module__: b
                       for b in BACKBONES.values()}.values())


_DERIVE_ALL = """
import json
from transforms.backbones import BACKBONES, keras_weights_filename
print(json.dumps({b.name: keras_weights_filename(b.name, b.min_size) for b in BACKBONES.values()}))
"""


@pytest.fixture(scope="module", autouse=True)
def _derivation_child(tmp_path_factory):
  # Deriving a file name is a full model build (about 70 s for all of them): a child process
  # does them while this one runs the build tests, so the two share the 2 cores instead of queueing.
  stderr = open(tmp_path_factory.mktemp("derive") / "stderr", "w+")
  child = subprocess.Popen([sys.executable, "-c", _DERIVE_ALL], stdout=subprocess.PIPE, stderr=stderr,
                           text=True, cwd=REPO, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
  yield child, stderr
  if child.poll() is None:
    child.kill()
  child.communicate()
  stderr.close()


@pytest.fixture(scope="module")
def derived_file_names(_derivation_child):
  child, stderr = _derivation_child
  out, _ = child.communicate(timeout=600)
  stderr.seek(0)
  assert child.returncode == 0, stderr.read()[-3000:]
  return json.loads(out.splitlines()[-1])


def test_registry_holds_every_keras_application_in_order():
  constructors = {name for name in dir(keras.applications) if name[:1].isupper()}
  assert {b.constructor for b in BACKBONES.values()} == constructors
  assert list(BACKBONES) == EXPECTED_NAMES
  assert all(key == b.name for key, b in BACKBONES.items())


@pytest.mark.parametrize("backbone", BACKBONES.values(), ids=lambda b: b.name)
def test_name_is_the_constructor_in_snake_case(backbone):
  # The underscores only split off version and size suffixes: drop them and the constructor's
  # name, lowercased, is what remains.
  assert backbone.name.replace("_", "") == backbone.constructor.lower()
  assert backbone.name == backbone.name.lower()


@pytest.mark.parametrize("backbone", BACKBONES.values(), ids=lambda b: b.name)
def test_builds_headless_at_its_minimum_size_with_the_stated_dim(backbone):
  constructor = getattr(keras.applications, backbone.constructor)
  small = backbone.min_size - 1
  with pytest.raises(ValueError):  # min_size is Keras's own minimum, not a guess above it
    constructor(include_top=False, weights=None, input_shape=(small, small, 3), pooling="avg")
  try:
    model = build_backbone(backbone.name, backbone.min_size, "avg", None)
    features = model(np.zeros((1, backbone.min_size, backbone.min_size, 3), np.float32), training=False)
    assert tuple(features.shape) == (1, backbone.dim)
  finally:
    keras.backend.clear_session()


def test_build_below_the_minimum_names_the_backbone_and_its_minimum():
  with pytest.raises(ValueError, match=r"inception_v3.*75x75.*size=74"):
    build_backbone("inception_v3", 74, "avg", None)


@pytest.mark.parametrize("backbone", BACKBONES.values(), ids=lambda b: b.name)
def test_native_size_is_the_one_keras_states(backbone):
  from keras.src.utils import file_utils
  constructor = getattr(keras.applications, backbone.constructor)
  native = backbone.native_size
  # No download may start: Keras must refuse the size before it fetches anything.
  with mock.patch.object(file_utils, "get_file", side_effect=AssertionError("tried to fetch weights")):
    if backbone.constructor.startswith("MobileNetV3"):
      # MobileNetV3 takes any size with ImageNet weights and only warns that they are for 224.
      with pytest.warns(UserWarning, match=rf"`rows` is not {native}"), \
          pytest.raises(AssertionError, match="tried to fetch"):
        constructor(include_top=False, weights="imagenet", input_shape=(33, 33, 3))
    else:
      with pytest.raises(ValueError, match=rf"should be \({native}, {native}, 3\)"):
        constructor(include_top=True, weights="imagenet", input_shape=(33, 33, 3))


@pytest.mark.parametrize("backbone", ONE_PER_MODULE, ids=lambda b: b.name)
def test_preprocess_matches_the_family_preprocess_input(backbone):
  module = sys.modules[getattr(keras.applications, backbone.constructor).__module__]
  keras_preprocess = module.preprocess_input
  # Every 8-bit value in every channel, in both images of the batch (the second one reversed).
  ramp = np.stack([np.arange(256), np.arange(256)[::-1], np.roll(np.arange(256), 85)], axis=-1)
  pixels = np.stack([ramp, ramp[::-1]]).reshape(2, 16, 16, 3).astype(np.float32)
  expected = keras_preprocess(pixels.copy())

  in_graph = tf.function(lambda x: preprocess(x, backbone.preprocessing))
  got = in_graph(tf.constant(pixels)).numpy()
  assert got.dtype == np.float32
  # Exact, not close: Grappler would turn a division by a constant into a multiplication.
  np.testing.assert_array_equal(got, expected)
  np.testing.assert_array_equal(preprocess(tf.constant(pixels), backbone.preprocessing).numpy(), expected)
  # uint8 input is cast inside: same numbers.
  np.testing.assert_array_equal(in_graph(tf.constant(pixels.astype(np.uint8))).numpy(), expected)


def test_preprocess_rejects_an_unknown_mode():
  with pytest.raises(ValueError, match=r"'bgr'.*caffe, tf, torch, none"):
    preprocess(tf.zeros((1, 2, 2, 3)), "bgr")


@pytest.mark.parametrize("backbone", BACKBONES.values(), ids=lambda b: b.name)
def test_keras_weights_filename_is_what_keras_fetches(backbone, derived_file_names):
  assert derived_file_names[backbone.name] == KERAS_FILES[backbone.name]


def test_keras_weights_filenames_are_distinct_and_keras_own(derived_file_names):
  from keras.src.applications import densenet, inception_v3, nasnet, vgg16
  assert len(set(derived_file_names.values())) == len(BACKBONES)
  assert derived_file_names["vgg16"] == vgg16.WEIGHTS_PATH_NO_TOP.rsplit("/", 1)[1]
  assert derived_file_names["inception_v3"] == inception_v3.WEIGHTS_PATH_NO_TOP.rsplit("/", 1)[1]
  assert derived_file_names["densenet121"] == densenet.DENSENET121_WEIGHT_PATH_NO_TOP.rsplit("/", 1)[1]
  # NASNet is cached under another name than its download's: the cache name is the one to use.
  assert nasnet.NASNET_MOBILE_WEIGHT_PATH_NO_TOP.endswith("/NASNet-mobile-no-top.h5")
  assert derived_file_names["nasnet_mobile"] == "nasnet_mobile_no_top.h5"


def test_mobilenet_v1_and_v2_weights_files_depend_on_size():
  assert keras_weights_filename("mobilenet", 128) == "mobilenet_1_0_128_tf_no_top.h5"
  assert keras_weights_filename("mobilenet", 224) == "mobilenet_1_0_224_tf_no_top.h5"
  # Sizes without their own file get Keras's 224 file, as Keras itself falls back.
  assert keras_weights_filename("mobilenet", 100) == "mobilenet_1_0_224_tf_no_top.h5"
  assert keras_weights_filename("mobilenet_v2", 96) == (
      "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_96_no_top.h5")
  assert keras_weights_filename("mobilenet_v2", 224) == KERAS_FILES["mobilenet_v2"]
  assert keras_weights_filename("resnet50", 64) == keras_weights_filename("resnet50", 224) == KERAS_FILES["resnet50"]


def test_get_backbone_names_the_value_and_the_valid_names():
  assert get_backbone("vgg16").constructor == "VGG16"
  with pytest.raises(ValueError) as error:
    get_backbone("resnet-50")
  assert str(error.value) == f"Unknown backbone 'resnet-50'; valid names: {', '.join(EXPECTED_NAMES)}"


def test_format_table_lists_every_backbone_with_its_facts():
  lines = format_table().splitlines()
  assert lines[0].split() == ["name", "native", "size", "min", "size", "preprocessing", "dim"]
  assert len(lines) == 1 + len(BACKBONES)
  for line, backbone in zip(lines[1:], BACKBONES.values()):
    assert line.split() == [backbone.name, str(backbone.native_size), str(backbone.min_size),
                            backbone.preprocessing, str(backbone.dim)]
