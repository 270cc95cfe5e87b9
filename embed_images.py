"""The public names of embed-images, for Beam pipelines of your own: `EmbedImages`, `BackbonesModelHandler`, `Embedding`, `ImageError`, `read_embeddings`.

    import apache_beam as beam
    from embed_images import EmbedImages

    embed = EmbedImages(["vgg16", "inception_v3", "resnet50"], weights="imagenet")
    main, errors = uris | embed.with_exception_handling()

A module of its own name: `pipeline` and `transforms`, where the code lives, are names that a
user's own modules shadow. Importing it prints nothing of its dependencies': Beam's apitools
warning is dropped, and TensorFlow is loaded (and looks for GPUs) here, with its start-up lines
held back as the command line holds them (pipeline/cli.py); a level the user set in
TF_CPP_MIN_LOG_LEVEL is kept, and 0 or 1 shows everything.
"""

import contextlib
import os

import pipeline  # sets TF_CPP_MIN_LOG_LEVEL=2 unless the user chose a level
from pipeline.cli import tensorflow_noise_held_back, without_apitools_warning

with without_apitools_warning():
  from pipeline.reader import Embeddings, read_embeddings
  from transforms.embed import EmbedImages
  from transforms.handler import BackbonesModelHandler
  from transforms.results import Embedding, EmbeddingBatch, ImageError, ImageFailed, Reused
  try:
    import apache_beam.io.gcp.gcsio  # noqa: F401  (inside the filter: gs:// uris import it later)
  except ImportError:  # without the [gcp] extra: no gcsio, and no warning about it either
    pass

with (tensorflow_noise_held_back() if os.environ.get("TF_CPP_MIN_LOG_LEVEL") in ("2", "3")
      else contextlib.nullcontext()):
  import tensorflow as _tf
  _tf.config.list_physical_devices("GPU")

__all__ = ["EmbedImages", "BackbonesModelHandler", "Embedding", "EmbeddingBatch", "ImageError", "ImageFailed",
           "Reused", "Embeddings", "read_embeddings"]
