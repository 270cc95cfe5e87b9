"""Image embeddings at batch scale: a Beam pipeline over frozen keras.applications backbones."""

import os

# TensorFlow's C++ start-up banner (oneDNN, CPU features) is noise on every run and in
# every worker process; real errors still come through Python. A level the user set is kept;
# remembered so that pipeline.cli's --verbose unsets only this default.
USER_TF_LOG_LEVEL = os.environ.get("TF_CPP_MIN_LOG_LEVEL")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__all__ = ["Embeddings", "read_embeddings"]


def __getattr__(name):
  # Lazily: the reader imports Beam and pyarrow, and the console script (pipeline.cli) must be
  # able to start before any heavy import (it pauses the GC over them).
  if name in __all__:
    from pipeline import reader
    return getattr(reader, name)
  raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
