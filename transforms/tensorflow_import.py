"""TensorFlow and Keras, imported at their first use, not at start-up.

A run that needs no model (an unchanged refresh, a resume with nothing left, `--dry_run`) never
pays TensorFlow's import (4-6 s here); one that does pays it where the model is first built: on a
local in-process run from scratch in a thread started at launch, beside the job's first stages
(pipeline/main.py), else on the worker at its first batch.

    from transforms.tensorflow_import import load_tensorflow
    tf = load_tensorflow()  # imports TensorFlow and Keras once, looks for GPUs

The command line (pipeline/cli.py) sets `on_first_import`: a context manager the first import runs
under, which holds TensorFlow's start-up lines back and pauses the cyclic GC. Code that imports
TensorFlow itself before this is called gets it without that wrapper: nothing breaks, the lines are
only not held back.
"""

import contextlib
import sys
import threading

_first_import = [contextlib.nullcontext]
_lock = threading.Lock()
_loaded = []


def on_first_import(wrapper) -> None:
  """`wrapper()`: the context manager TensorFlow's first import runs under (None: none)."""
  _first_import[0] = wrapper or contextlib.nullcontext


def loaded():
  """`tensorflow` if it has been imported (here or by the caller's own code), else None: also while
  another thread is importing it, when `sys.modules` holds a module not yet initialized."""
  if _loaded:
    return _loaded[0]
  tf = sys.modules.get("tensorflow")
  initializing = getattr(getattr(tf, "__spec__", None), "_initializing", False)
  return None if tf is None or initializing else tf


def load_tensorflow():
  """TensorFlow, with Keras imported and the GPUs looked for (once per process); returns `tensorflow`."""
  if not _loaded:
    with _lock:
      if not _loaded:
        with _first_import[0]():
          import keras  # noqa: F401
          import tensorflow as tf
          # Inside the wrapper: otherwise the first model build looks for GPUs, and prints, after it.
          tf.config.list_physical_devices("GPU")
        _loaded.append(tf)
  return _loaded[0]
