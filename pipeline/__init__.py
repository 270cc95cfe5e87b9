"""Image embeddings at batch scale: a Beam pipeline over frozen keras.applications backbones."""

import os

# TensorFlow's C++ start-up banner (oneDNN, CPU features) is noise on every run and in
# every worker process; real errors still come through Python.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pipeline.reader import Embeddings, read_embeddings  # noqa: E402  (after the env var)

__all__ = ["Embeddings", "read_embeddings"]
