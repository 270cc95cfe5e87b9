"""Weight sources for `--weights imagenet|random|DIR`: resolved at launch, loaded on workers."""

import dataclasses
import hashlib
import os
import random
import tempfile
import threading
import zlib
from typing import Optional

from apache_beam.io.filesystem import BeamIOError, CompressionTypes
from apache_beam.io.filesystems import FileSystems

from transforms.backbones import build_backbone, get_backbone, keras_weights_filename
from transforms.write import installed_version

RANDOM_SEED = 1234
_CHUNK_BYTES = 8 << 20


@dataclasses.dataclass(frozen=True)
class WeightsSource:
  kind: str  # "imagenet" | "random" | "keras_file" | "weights_h5"
  uri: Optional[str]  # the file, local path or gs://, for the file kinds
  fingerprint: str  # "imagenet:<keras file>", "random:seed=...:keras=...", "sha256:<hex of the file>"


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
  """One backbone as a run builds it: its name, square input size, where its weights come from, and
  for a layer or a user's model (transforms/models.py) what launch found out about it."""
  name: str  # as `backbones` names it: a registry name or a user model's, optionally ":LAYER"
  size: int
  weights: WeightsSource  # a registry backbone's; for a user model, its file(s)
  layer: Optional[str] = None  # None: the model's own output (a registry backbone's pooled features)
  feature_dim: Optional[int] = None  # set at launch for a layer or a user model
  preprocessing_mode: Optional[str] = None  # a user model's; a registry backbone's is in the registry
  model: Optional[object] = None  # transforms.models.ModelSource of a user model; None: the registry

  @property
  def base(self) -> str:
    """The registry backbone or user model the features come from."""
    return self.name.split(":", 1)[0]

  @property
  def dim(self) -> int:
    return self.feature_dim if self.feature_dim is not None else get_backbone(self.base).dim

  @property
  def preprocessing(self) -> str:
    return self.preprocessing_mode or get_backbone(self.base).preprocessing


def resolve_weights(spec: str, name: str, size: int) -> WeightsSource:
  """Launch-time: turns a --weights value into the source one backbone's weights will come from.

  Costs a model build per backbone for Keras's file name (cached) and, for a file, one read of it
  to fingerprint it: workers then refuse a file that changed since.
  """
  get_backbone(name)
  if spec == "imagenet":
    return WeightsSource("imagenet", None, f"imagenet:{keras_weights_filename(name, size)}")
  if spec == "random":
    return WeightsSource("random", None, f"random:seed={RANDOM_SEED}:keras={installed_version('keras')}")
  if not _is_directory(spec):
    raise ValueError(
        f"`weights` must be imagenet, random or an existing directory (local or gs://); received: {spec!r}")
  keras_name, own_name = keras_weights_filename(name, size), f"{name}.weights.h5"
  for kind, file_name in (("keras_file", keras_name), ("weights_h5", own_name)):
    uri = FileSystems.join(spec, file_name)
    if FileSystems.exists(uri):
      return WeightsSource(kind, uri, f"sha256:{file_sha256(uri)}")
  raise ValueError(
      f"`weights` {spec}: no weights for backbone {name}; looked for {keras_name} and {own_name}")


def load_backbone(name: str, size: int, pooling: str, source: WeightsSource):
  """Worker-side: the backbone's Keras model with the weights `source` names."""
  if source.kind == "imagenet":
    return build_backbone(name, size, pooling, "imagenet")
  if source.kind == "random":
    return _build_seeded(name, size, pooling)
  if source.kind == "keras_file":
    # Keras builds a different graph with weights="imagenet" (EfficientNet V1 adds a Rescaling
    # layer), so the file goes where Keras's get_file looks and Keras loads it itself.
    cached = os.path.join(keras_cache_dir(), FileSystems.split(source.uri)[1])
    if not (os.path.exists(cached) and f"sha256:{file_sha256(cached)}" == source.fingerprint):
      _copy_verified(source, cached)
    return build_backbone(name, size, pooling, "imagenet")
  if source.kind == "weights_h5":
    with tempfile.TemporaryDirectory() as tmp:
      local = os.path.join(tmp, FileSystems.split(source.uri)[1])
      _copy_verified(source, local)
      model = build_backbone(name, size, pooling, None)
      model.load_weights(local)
      return model
  raise ValueError(
      f"Unknown weights kind {source.kind!r}; expected imagenet, random, keras_file or weights_h5")


def weights_fingerprint(model) -> str:
  """sha256 over the model's weight arrays, in order, shapes and dtypes included."""
  import numpy as np
  digest = hashlib.sha256()
  for array in model.get_weights():
    array = np.ascontiguousarray(array)
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


def file_sha256(uri: str) -> str:
  digest = hashlib.sha256()
  with FileSystems.open(uri, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    for chunk in iter(lambda: f.read(_CHUNK_BYTES), b""):
      digest.update(chunk)
  return digest.hexdigest()


def keras_cache_dir() -> str:
  """The folder keras.utils.get_file reads applications' weights from, computed the way it does.

  The base is Keras's home: $KERAS_HOME as it was when keras was imported (Keras reads it once,
  at import), else ~/.keras; get_file falls back to /tmp/.keras when that isn't writable, and
  keras.applications pass cache_subdir="models".
  """
  from keras.src.backend.config import keras_home
  base = os.path.expanduser(keras_home())
  if not os.access(base, os.W_OK):
    base = os.path.join("/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir(), ".keras")
  return os.path.join(base, "models")


def _is_directory(path: str) -> bool:
  if not path:
    return False
  # Object stores have prefixes, not directories: there, a directory is a prefix with files under it.
  try:
    if FileSystems.match([FileSystems.join(path, "*")])[0].metadata_list:
      return True
  except ValueError:  # a scheme Beam has no filesystem for
    return False
  except BeamIOError as e:  # e.g. no such bucket, no credentials: say so rather than "not a directory"
    raise ValueError(f"`weights` {path}: cannot list it: {e}".replace("\n", " ")) from None
  return FileSystems.get_scheme(path) is None and os.path.isdir(path)


def _copy_verified(source: WeightsSource, dest: str) -> None:
  """Copies the file to `dest` atomically, failing if its bytes are not the ones fingerprinted at launch."""
  os.makedirs(os.path.dirname(dest), exist_ok=True)
  digest = hashlib.sha256()
  fd, partial = tempfile.mkstemp(dir=os.path.dirname(dest), prefix=".partial-")
  try:
    with os.fdopen(fd, "wb") as out, \
        FileSystems.open(source.uri, compression_type=CompressionTypes.UNCOMPRESSED) as f:
      for chunk in iter(lambda: f.read(_CHUNK_BYTES), b""):
        digest.update(chunk)
        out.write(chunk)
    if f"sha256:{digest.hexdigest()}" != source.fingerprint:
      raise ValueError(f"{source.uri} changed after launch: its sha256 is now {digest.hexdigest()}, "
                       f"the run was planned with {source.fingerprint}")
    # Other worker processes on this machine may stage the same file: they see it whole or not at all.
    os.replace(partial, dest)
  finally:
    if os.path.exists(partial):
      os.remove(partial)


class _ThreadLocalStream:
  """Stands in for the `random` module inside Keras's make_default_seed while one thread builds.

  Every Keras initializer and SeedGenerator built without a seed draws one from Python's global
  `random`. Reseeding that (keras.utils.set_random_seed) makes builds repeatable only while no
  other thread draws from it meanwhile, and reseeds the whole process as a side effect. Here the
  building thread draws from its own seeded stream; other threads keep the global one.
  """

  def __init__(self, seed: int):
    self._owner = threading.get_ident()
    self._stream = random.Random(seed)

  def __getattr__(self, attr):
    return getattr(self._stream if threading.get_ident() == self._owner else random, attr)


_SEEDED_BUILD_LOCK = threading.Lock()


def _build_seeded(name: str, size: int, pooling: str):
  from keras.src.random import seed_generator
  # crc32, not hash(): str hashes are salted per process.
  seed = RANDOM_SEED + zlib.crc32(name.encode("utf-8"))
  with _SEEDED_BUILD_LOCK:
    global_stream = seed_generator.python_random
    seed_generator.python_random = _ThreadLocalStream(seed)
    try:
      return build_backbone(name, size, pooling, None)
    finally:
      seed_generator.python_random = global_stream
