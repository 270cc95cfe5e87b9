"""The plain Keras recipe that the pipeline's rows must equal: load_img -> img_to_array -> preprocess_input -> predict."""

import importlib

import keras
import numpy as np

from transforms.backbones import get_backbone
from transforms.weights import load_backbone


def keras_preprocess_input(name):
  """The family's own preprocess_input, found through the constructor's module."""
  constructor = getattr(keras.applications, get_backbone(name).constructor)
  return importlib.import_module(constructor.__module__).preprocess_input


def recipe_embeddings(paths, specs, pooling="avg", batch_size=8):
  """specs: BackboneSpec-like (name, size, weights); returns float32 [len(paths), D]."""
  parts = []
  for spec in specs:
    model = load_backbone(spec.name, spec.size, pooling, spec.weights)
    images = np.stack([
        keras.utils.img_to_array(keras.utils.load_img(
            str(p), target_size=(spec.size, spec.size), interpolation="bilinear"))
        for p in paths])
    x = keras_preprocess_input(spec.name)(images)
    parts.append(model.predict(x, batch_size=batch_size, verbose=0).astype(np.float32))
  return np.concatenate(parts, axis=1)


def relative_l2(a, b):
  """Per-row ||a-b|| / ||b||."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b, axis=-1) / np.maximum(np.linalg.norm(b, axis=-1), 1e-30)
