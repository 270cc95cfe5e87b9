"""Models as an engine runs them (a frozen TensorFlow graph, a converted OpenVINO model), kept on local disk by what they are made of.

A process that finds its model here skips building the Keras model, tracing it and freezing or
converting it: the next worker process of a job, the next run on the machine. The key is a hash of
everything the graph is made of (each backbone's spec with its weights' and user model's
fingerprints, pooling, normalize, precision) and of the versions that made it, so a changed model
never finds a stale entry. Entries are written whole or not at all (a directory renamed into
place); one that can't be read is removed and made again.
"""

import hashlib
import json
import logging
import os
import shutil
import tempfile

from transforms.write import TENSORFLOW_DISTRIBUTIONS, installed_version

_LOG = logging.getLogger(__name__)

CACHE_ENV = "EMBED_IMAGES_MODEL_CACHE"  # a directory; "" or "off": no cache
_FORMAT = 1  # bump when what is saved, or how, changes
# Each package by the distributions that install it: tensorflow-cpu is TensorFlow too, and an
# upgrade of it must not find the old graph.
_VERSIONED = (TENSORFLOW_DISTRIBUTIONS, ("keras",), ("openvino",))


def cache_root():
  """$EMBED_IMAGES_MODEL_CACHE, or ~/.cache/embed-images/models; None where it is "" or "off"."""
  value = os.environ.get(CACHE_ENV)
  if value is None:
    return os.path.join(os.path.expanduser("~"), ".cache", "embed-images", "models")
  return None if value.strip().lower() in ("", "off", "none", "0") else value


def model_key(engine: str, *parts) -> str:
  """`engine`-HASH of `parts` (repr'd: BackboneSpecs and plain values) and the package versions."""
  versions = tuple(installed_version(*distributions) for distributions in _VERSIONED)
  text = repr((_FORMAT, engine, parts, versions))
  return f"{engine}-{hashlib.sha256(text.encode()).hexdigest()[:32]}"


def holds(key: str) -> bool:
  """Whether there is an entry under `key` (not whether it reads: `read` says that)."""
  root = cache_root()
  return bool(root) and os.path.isdir(os.path.join(root, key))


def read(key: str, load):
  """`load(directory)` of the entry under `key`, or None where there is none (or no cache)."""
  root = cache_root()
  if not root or not os.path.isdir(os.path.join(root, key)):
    return None
  path = os.path.join(root, key)
  try:
    return load(path)
  except Exception as e:  # a damaged entry: removed, so that the model made instead is written again
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    _LOG.warning("model cache: could not read %s (%s); making the model again", path, message)
    shutil.rmtree(path, ignore_errors=True)
    return None


def write(key: str, save):
  """`save(directory)` into a fresh directory, renamed into place as the entry under `key`; a
  failure costs only the next process its build."""
  root = cache_root()
  if not root or os.path.isdir(os.path.join(root, key)):
    return
  staging = None
  try:
    os.makedirs(root, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{key}-", dir=root)
    save(staging)
    os.rename(staging, os.path.join(root, key))
    staging = None
  except OSError as e:
    if not os.path.isdir(os.path.join(root, key)):  # else another process got there first: the same model
      _LOG.warning("model cache: could not write %s under %s (%s)", key, root, e)
  except Exception as e:  # the engine's own save failed: the run goes on without an entry
    _LOG.warning("model cache: could not write %s under %s (%s: %s)", key, root, type(e).__name__, e)
  finally:
    if staging is not None:
      shutil.rmtree(staging, ignore_errors=True)


def remembered(key: str, compute):
  """compute()'s JSON value, computed once per machine and kept under `key` (a `model_key`): what
  costs a TensorFlow import to learn (Keras's weights file name) need not cost every launch one."""
  value = read(key, _read_json)
  if value is None:
    value = compute()
    write(key, lambda directory: _write_json(directory, value))
  return value


def _read_json(directory):
  with open(os.path.join(directory, "value.json")) as f:
    return json.load(f)["value"]


def _write_json(directory, value):
  with open(os.path.join(directory, "value.json"), "w") as f:
    json.dump({"value": value}, f)
