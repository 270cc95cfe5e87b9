"""Backbone registry: every keras.applications family usable headless with pooling, and how to feed it."""

import dataclasses
import functools
import threading

from transforms.tensorflow_import import load_tensorflow


@dataclasses.dataclass(frozen=True)
class Backbone:
  name: str  # registry name
  constructor: str  # attribute of keras.applications
  native_size: int  # Keras's default input size
  min_size: int  # smallest square input Keras accepts with include_top=False
  preprocessing: str  # "caffe" | "tf" | "torch" | "none" (the model rescales inside itself)
  dim: int  # pooled feature dim


# Sizes, minimums and dims as Keras 3.15 states or builds them (tests/test_backbones.py builds each).
BACKBONES = {b.name: b for b in (
    Backbone("vgg16", "VGG16", 224, 32, "caffe", 512),
    Backbone("vgg19", "VGG19", 224, 32, "caffe", 512),
    Backbone("resnet50", "ResNet50", 224, 32, "caffe", 2048),
    Backbone("resnet101", "ResNet101", 224, 32, "caffe", 2048),
    Backbone("resnet152", "ResNet152", 224, 32, "caffe", 2048),
    Backbone("resnet50_v2", "ResNet50V2", 224, 32, "tf", 2048),
    Backbone("resnet101_v2", "ResNet101V2", 224, 32, "tf", 2048),
    Backbone("resnet152_v2", "ResNet152V2", 224, 32, "tf", 2048),
    Backbone("inception_v3", "InceptionV3", 299, 75, "tf", 2048),
    Backbone("inception_resnet_v2", "InceptionResNetV2", 299, 75, "tf", 1536),
    Backbone("xception", "Xception", 299, 71, "tf", 2048),
    Backbone("mobilenet", "MobileNet", 224, 32, "tf", 1024),
    Backbone("mobilenet_v2", "MobileNetV2", 224, 32, "tf", 1280),
    Backbone("mobilenet_v3_small", "MobileNetV3Small", 224, 32, "none", 576),
    Backbone("mobilenet_v3_large", "MobileNetV3Large", 224, 32, "none", 960),
    Backbone("densenet121", "DenseNet121", 224, 32, "torch", 1024),
    Backbone("densenet169", "DenseNet169", 224, 32, "torch", 1664),
    Backbone("densenet201", "DenseNet201", 224, 32, "torch", 1920),
    Backbone("nasnet_mobile", "NASNetMobile", 224, 32, "tf", 1056),
    Backbone("nasnet_large", "NASNetLarge", 331, 32, "tf", 4032),
    Backbone("efficientnet_b0", "EfficientNetB0", 224, 32, "none", 1280),
    Backbone("efficientnet_b1", "EfficientNetB1", 240, 32, "none", 1280),
    Backbone("efficientnet_b2", "EfficientNetB2", 260, 32, "none", 1408),
    Backbone("efficientnet_b3", "EfficientNetB3", 300, 32, "none", 1536),
    Backbone("efficientnet_b4", "EfficientNetB4", 380, 32, "none", 1792),
    Backbone("efficientnet_b5", "EfficientNetB5", 456, 32, "none", 2048),
    Backbone("efficientnet_b6", "EfficientNetB6", 528, 32, "none", 2304),
    Backbone("efficientnet_b7", "EfficientNetB7", 600, 32, "none", 2560),
    Backbone("efficientnet_v2_b0", "EfficientNetV2B0", 224, 32, "none", 1280),
    Backbone("efficientnet_v2_b1", "EfficientNetV2B1", 240, 32, "none", 1280),
    Backbone("efficientnet_v2_b2", "EfficientNetV2B2", 260, 32, "none", 1408),
    Backbone("efficientnet_v2_b3", "EfficientNetV2B3", 300, 32, "none", 1536),
    Backbone("efficientnet_v2_s", "EfficientNetV2S", 384, 32, "none", 1280),
    Backbone("efficientnet_v2_m", "EfficientNetV2M", 480, 32, "none", 1280),
    Backbone("efficientnet_v2_l", "EfficientNetV2L", 480, 32, "none", 1280),
    Backbone("convnext_tiny", "ConvNeXtTiny", 224, 32, "none", 768),
    Backbone("convnext_small", "ConvNeXtSmall", 224, 32, "none", 768),
    Backbone("convnext_base", "ConvNeXtBase", 224, 32, "none", 1024),
    Backbone("convnext_large", "ConvNeXtLarge", 224, 32, "none", 1536),
    Backbone("convnext_xlarge", "ConvNeXtXLarge", 224, 32, "none", 2048),
)}

PREPROCESSING_MODES = ("caffe", "tf", "torch", "none")
# keras.applications.imagenet_utils' constants; caffe's mean is in BGR order.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)


def get_backbone(name: str) -> Backbone:
  try:
    return BACKBONES[name]
  except KeyError:
    raise ValueError(
        f"Unknown backbone {name!r}; valid names: {', '.join(BACKBONES)}") from None


def preprocess(x, mode: str):
  """In-graph twin of keras.applications' preprocess_input: same float32 ops in the same order.

  `x` is an NHWC RGB batch in 0..255 (any real or integer dtype; computed in float32).
  """
  import tensorflow as tf
  x = tf.cast(x, tf.float32)
  if mode == "caffe":
    return tf.reverse(x, axis=[-1]) - tf.constant(_CAFFE_MEAN_BGR, tf.float32)
  if mode == "tf":
    return _divide(x, 127.5) - 1.0
  if mode == "torch":
    return _divide(_divide(x, 255.0) - tf.constant(_TORCH_MEAN, tf.float32), _TORCH_STD)
  if mode == "none":
    return x
  raise ValueError(f"Unknown preprocessing mode {mode!r}; valid modes: {', '.join(PREPROCESSING_MODES)}")


def _divide(x, divisor):
  # In a tf.function, Grappler's constant folding turns x / const into x * (1 / const), one ulp
  # away from numpy's x / const (preprocess_input's math) for about half of all pixels. To
  # Grappler a PlaceholderWithDefault is not a constant, so the division stays a division.
  # (Under XLA, jit_compile=True, it becomes a multiplication regardless.)
  import tensorflow as tf
  divisor = tf.constant(divisor, tf.float32)
  return x / tf.raw_ops.PlaceholderWithDefault(input=divisor, shape=divisor.shape)


def build_backbone(name: str, size: int, pooling: str, weights):
  """keras.applications' own model, headless and pooled; `weights` is "imagenet" or None."""
  load_tensorflow()
  import keras
  backbone = get_backbone(name)
  if size < backbone.min_size:
    raise ValueError(
        f"{name} needs inputs of at least {backbone.min_size}x{backbone.min_size}; received: size={size}")
  constructor = getattr(keras.applications, backbone.constructor)
  return constructor(include_top=False, weights=weights, input_shape=(size, size, 3), pooling=pooling)


class _WeightsFileRequested(Exception):
  pass


# The patch below swaps a module attribute that every thread sees: one derivation at a time.
_DERIVE_LOCK = threading.Lock()


@functools.lru_cache(maxsize=None)
def keras_weights_filename(name: str, size: int) -> str:
  """The file name Keras's get_file fetches for this backbone's no-top ImageNet weights at `size`.

  Taken from Keras itself rather than restated: the constructor is run with weights="imagenet"
  and stopped at its get_file call. That costs a TensorFlow import and one model build (seconds),
  so the answer is kept, in this process and in the model cache (transforms/model_cache.py, keyed
  by the Keras and TensorFlow versions): a nightly `--weights imagenet` refresh that reuses every
  row launches without importing TensorFlow. MobileNet V1/V2 name a file per input size (and fall
  back to the 224 file for sizes without one); the other families use one file for all sizes.
  """
  from transforms import model_cache
  return model_cache.remembered(model_cache.model_key("keras-weights-file", name, size),
                                lambda: _derive_weights_filename(name, size))


def _derive_weights_filename(name: str, size: int) -> str:
  from keras.src.utils import file_utils

  def stop_at_get_file(fname, *args, **kwargs):
    raise _WeightsFileRequested(fname)

  with _DERIVE_LOCK:
    keras_get_file, file_utils.get_file = file_utils.get_file, stop_at_get_file
    try:
      build_backbone(name, size, "avg", "imagenet")
    except _WeightsFileRequested as requested:
      return requested.args[0]
    finally:
      file_utils.get_file = keras_get_file
  raise RuntimeError(f"keras.applications.{get_backbone(name).constructor} loaded ImageNet weights "
                     "without calling keras.utils.get_file; Keras has changed how it fetches them")


def format_table() -> str:
  """The registry as a text table, for `embed-images --list-backbones`."""
  header = ("name", "native size", "min size", "preprocessing", "dim")
  rows = [header] + [(b.name, str(b.native_size), str(b.min_size), b.preprocessing, str(b.dim))
                     for b in BACKBONES.values()]
  widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
  lines = ["  ".join(cell.ljust(w) if i == 0 or i == 3 else cell.rjust(w)
                     for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
           for row in rows]
  return "\n".join(lines)
