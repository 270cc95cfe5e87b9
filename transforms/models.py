"""Features of any layer, and users' own models as backbones: a .keras file or a SavedModel, local or gs://."""

import atexit
import dataclasses
import difflib
import hashlib
import importlib
import os
import re
import shutil
import tempfile
import threading
from typing import Optional

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from transforms import hub
from transforms.backbones import build_backbone
from transforms.tensorflow_import import load_tensorflow
from transforms.weights import BackboneSpec, WeightsSource, load_backbone

KERAS, SAVED_MODEL = "keras", "saved_model"
# model.export() names its endpoint "serve"; tf.saved_model.save, "serving_default".
ENDPOINTS = ("serve", "serving_default")
_CHUNK_BYTES = 8 << 20


@dataclasses.dataclass(frozen=True)
class ModelSource:
  """A user's model as launch found it; workers copy and verify it, never rediscover it."""
  kind: str  # KERAS | SAVED_MODEL
  uri: str  # the .keras file or the SavedModel directory, local or gs://
  fingerprint: str  # "sha256:<hex>": of the .keras file; of a directory, over its files' paths and digests
  endpoint: Optional[str] = None  # a SavedModel's
  output: Optional[str] = None  # the endpoint's output key, where it has several
  safe_mode: bool = True  # a .keras file's Lambda layers (Python code) are refused unless False
  modules: tuple = ()  # imported before loading: they register the model's custom Keras objects

  @property
  def sha256(self) -> str:
    return self.fingerprint.split(":", 1)[1]


# ----- files: fingerprint at launch, verified copy on workers

def model_kind(uri: str) -> str:
  """KERAS for a .keras file, SAVED_MODEL for a directory holding saved_model.pb; ValueError else."""
  if FileSystems.exists(FileSystems.join(uri.rstrip("/"), "saved_model.pb")):
    return SAVED_MODEL
  if uri.endswith(".keras") and FileSystems.exists(uri):
    return KERAS
  raise ValueError(f"`model` {uri!r} is neither a .keras file (Keras 3 model.save), a SavedModel "
                   "directory (with saved_model.pb) nor a KerasHub preset directory (config.json with metadata.json)")


def _files(uri: str, kind: str) -> list:
  """[(path relative to the model, full path)], sorted: what a copy holds and the fingerprint covers."""
  if kind == KERAS:
    return [(FileSystems.split(uri)[1], uri)]
  root = uri.rstrip("/")
  found = FileSystems.match([FileSystems.join(root, "**")])[0].metadata_list
  # Object stores may hold "folder/" placeholder objects: not files.
  return sorted((m.path[len(root) + 1:], m.path) for m in found if not m.path.endswith("/"))


def copy_model(uri: str, kind: str, dest: str, expected: Optional[str] = None) -> tuple:
  """Copies the model's files under `dest` through Beam's FileSystems; returns (local path, fingerprint).

  With `expected` (the launch fingerprint) a model whose bytes changed since is refused, as
  `--weights DIR` files are: a job never mixes two versions of one model.
  """
  entries = []
  for relative, path in _files(uri, kind):
    local = os.path.join(dest, relative)
    os.makedirs(os.path.dirname(local), exist_ok=True)
    digest = hashlib.sha256()
    with open(local, "wb") as out, FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
      for chunk in iter(lambda: f.read(_CHUNK_BYTES), b""):
        digest.update(chunk)
        out.write(chunk)
    entries.append(f"{relative}\t{digest.hexdigest()}\n")
  if not entries:
    raise ValueError(f"`model` {uri!r} holds no files")
  if kind == KERAS:
    fingerprint = "sha256:" + entries[0].split("\t")[1].strip()  # the file's own sha256sum
  else:
    fingerprint = "sha256:" + hashlib.sha256("".join(entries).encode()).hexdigest()
  if expected is not None and fingerprint != expected:
    raise ValueError(f"`model` {uri} changed after launch: its fingerprint is now {fingerprint}, "
                     f"the run was planned with {expected}")
  return os.path.join(dest, entries[0].split("\t")[0]) if kind == KERAS else dest, fingerprint


_COPIES = {}  # (uri, fingerprint) -> local path: one verified copy per worker process
_COPIES_LOCK = threading.Lock()


def local_copy(source: ModelSource) -> str:
  """Worker side: the model's verified local copy, made once per process."""
  key = (source.uri, source.fingerprint)
  with _COPIES_LOCK:
    if key not in _COPIES:
      dest = tempfile.mkdtemp(prefix="embed-model-")
      atexit.register(shutil.rmtree, dest, True)
      _COPIES[key] = copy_model(source.uri, source.kind, dest, expected=source.fingerprint)[0]
    return _COPIES[key]


# ----- loading

def import_modules(modules) -> None:
  for module in modules:
    try:
      importlib.import_module(module)
    except Exception as e:  # ImportError, or the module's own failure
      raise ValueError(f"`modules`: cannot import {module!r}: {type(e).__name__}: {e}".splitlines()[0]) from None


def load_keras(path: str, uri: str, safe_mode=True, modules=()):
  """keras.models.load_model with safe_mode on unless asked; its failures as one line naming the cause."""
  load_tensorflow()
  import keras
  import_modules(modules)
  try:
    return keras.models.load_model(path, compile=False, safe_mode=safe_mode)
  except Exception as e:  # Keras raises ValueError/TypeError with multi-line configs: reworded
    text = str(e)
    missing = re.search(r"Could not locate (?:class|function) '([^']+)'", text)
    if missing or "custom_objects" in text or "register_keras_serializable" in text:
      what = missing.group(1) if missing else type(e).__name__
      raise ValueError(
          f"`model` {uri}: needs the custom Keras object {what!r}, which is not registered in this process: "
          "decorate it with @keras.saving.register_keras_serializable() in a module that `modules` names, "
          "importable here and on the workers") from None
    if "safe_mode" in text or "Lambda" in text:
      raise ValueError(f"`model` {uri}: holds a Lambda layer (Python code), which Keras loads only with safe "
                       "mode off; if you trust this file, allow it with `safe_mode`") from None
    raise ValueError(f"`model` {uri}: Keras cannot load it: {type(e).__name__}: {text}".splitlines()[0]) from None


def layer_choices(model) -> list:
  """[(layer name, output shape)] of the layers whose output a feature model can end at: one
  tensor, a feature map (N, H, W, C) or a vector (N, D). Layers of a nested model are not
  reachable from the outer model's input, so they are not offered."""
  import keras
  choices = []
  for layer in model.layers:
    if isinstance(layer, keras.layers.InputLayer):
      continue
    try:
      output = layer.output
    except (AttributeError, ValueError):  # a layer called more than once has no single output
      continue
    shape = getattr(output, "shape", None)
    if shape is not None and len(shape) in (2, 4):
      choices.append((layer.name, tuple(shape)))
  return choices


def format_layers(choices) -> str:
  """`embed-images --list-layers NAME`: one layer a line, its output shape beside it."""
  width = max((len(name) for name, _ in choices), default=0)
  return "\n".join(f"{name.ljust(width)}  {shape}" for name, shape in choices)


def layer_output(model, layer: str, model_name: str):
  """`layer`'s output in `model`'s graph; ValueError naming the closest valid layers otherwise."""
  choices = [name for name, _ in layer_choices(model)]
  if layer in choices:
    return model.get_layer(layer).output
  closest = difflib.get_close_matches(layer, choices, n=3, cutoff=0.5) or choices[-3:]
  try:
    shape = tuple(model.get_layer(layer).output.shape)
    why = f"its output {shape} is not a feature map (N, H, W, C) or a vector (N, D)"
  except (ValueError, AttributeError):
    why = f"{model_name} has no such layer"
  raise ValueError(f"`layer` {layer!r}: {why}; closest valid layers: {', '.join(closest)}")


def pooled(x, pooling: str):
  """A 4-D output pooled over its spatial axes as keras.applications' `pooling` does; 2-D as is."""
  import keras
  if len(x.shape) == 2:
    return x
  if len(x.shape) != 4:
    raise ValueError(f"`model` output {tuple(x.shape)} is not a feature map (N, H, W, C) or a vector (N, D)")
  pool = keras.layers.GlobalAveragePooling2D if pooling == "avg" else keras.layers.GlobalMaxPooling2D
  return pool(name=f"embed_images_{pooling}_pool")(x)


def feature_model(model, layer: Optional[str], pooling: str, model_name: str):
  """`model` cut at `layer` (None: its output), pooled: a Keras model from its input to [N, D]."""
  import keras
  if layer is None:
    if len(model.outputs) != 1:
      raise ValueError(f"`model` {model_name} has {len(model.outputs)} outputs; name one layer as {model_name}:LAYER")
    output = model.outputs[0]
  else:
    output = layer_output(model, layer, model_name)
  return keras.Model(model.inputs, pooled(output, pooling), name=f"embed_images_{model_name}")


def _endpoint_layer_class():
  import keras
  import tensorflow as tf

  class EndpointLayer(keras.layers.TFSMLayer):
    """TFSMLayer whose call also serves signatures (keyword-only input) and casts to the input's dtype."""

    def __init__(self, filepath, call_endpoint):
      super().__init__(filepath, call_endpoint=call_endpoint, trainable=False)
      self.input_keyword, self.input_spec_ = endpoint_input(self.call_endpoint_fn)

    def call(self, inputs, training=False):
      x = tf.cast(inputs, self.input_spec_.dtype)
      return self.call_endpoint_fn(**{self.input_keyword: x}) if self.input_keyword else self.call_endpoint_fn(x)

  return EndpointLayer


def endpoint_input(fn):
  """(keyword or None, TensorSpec) of an endpoint's one input; ValueError for any other signature."""
  signature = getattr(fn, "structured_input_signature", None)
  if signature is None and getattr(fn, "concrete_functions", None):
    signature = fn.concrete_functions[0].structured_input_signature
  if signature is None and getattr(fn, "input_signature", None) is not None:
    signature = (tuple(fn.input_signature), {})
  args, kwargs = signature or ((), {})
  if len(args) == 1 and not kwargs and hasattr(args[0], "shape"):
    return None, args[0]
  if not args and len(kwargs) == 1 and hasattr(next(iter(kwargs.values())), "shape"):
    return next(iter(kwargs.items()))
  raise ValueError(f"`model` endpoint takes {signature!r}; an image model's endpoint takes one (N, H, W, 3) tensor")


def open_saved_model(path: str, uri: str, endpoint: Optional[str] = None):
  """The SavedModel's endpoint as a Keras layer: `endpoint`, else serve, else serving_default."""
  tf = load_tensorflow()
  if endpoint is None:
    loaded = tf.saved_model.load(path)
    found = [e for e in ENDPOINTS if hasattr(loaded, e) or e in loaded.signatures]
    if not found:
      raise ValueError(f"`model` {uri}: SavedModel has no {' or '.join(ENDPOINTS)} endpoint; its signatures: "
                       f"{', '.join(loaded.signatures) or 'none'}")
    endpoint = found[0]
  return _endpoint_layer_class()(path, endpoint)


def saved_model_features(layer, size: int, output: Optional[str], pooling: str, uri: str):
  """Input (size, size, 3) -> the endpoint -> its output (`output` where several) -> pooled."""
  import keras
  inputs = keras.Input((size, size, 3))
  try:
    result = layer(inputs)
  except Exception as e:  # the endpoint's own shape check
    raise ValueError(f"`model` {uri}: its endpoint does not take {size}x{size} images: {e}".splitlines()[0]) from None
  if isinstance(result, dict):
    keys = sorted(result)
    if output is None and len(keys) == 1:
      output = keys[0]
    if output is None:
      raise ValueError(f"`output` is needed: the SavedModel {uri} has outputs {', '.join(keys)}; name one")
    if output not in result:
      raise ValueError(f"`output` {output!r}: the SavedModel {uri} has outputs {', '.join(keys)}; name one")
    result = result[output]
  elif output is not None:
    raise ValueError(f"`output` {output!r}: the SavedModel {uri} has one unnamed output")
  return keras.Model(inputs, pooled(result, pooling))


# ----- launch and workers

def inspect_registry_layer(name: str, size: int, layer: str) -> int:
  """Launch: the pooled dim of a registry backbone's layer, from a build without weights."""
  return int(layer_output(build_backbone(name, size, None, None), layer, name).shape[-1])


def registry_layers(name: str, size: int) -> list:
  """`--list-layers` of a registry backbone, built without weights (nothing is downloaded)."""
  return layer_choices(build_backbone(name, size, None, None))


def resolve_model(name: str, uri: str, layer: Optional[str], size: Optional[int], pooling: str,
                  preprocessing: str, output: Optional[str] = None, safe_mode: bool = True,
                  modules: tuple = ()) -> BackboneSpec:
  """Launch: a user model as a BackboneSpec (its fingerprint, input size and feature dim), having
  copied and loaded it once the way workers will. `size` None: the model's own input size."""
  with tempfile.TemporaryDirectory(prefix="embed-model-") as tmp:
    kind = model_kind(uri)
    if kind == SAVED_MODEL and layer is not None:
      raise ValueError(f"`layer` {layer!r}: {name} is a SavedModel, used whole through its endpoint (it keeps "
                       "no Keras layers); save the model as .keras to pick a layer")
    if kind == KERAS and output is not None:
      raise ValueError(f"`output` {output!r}: {name} is a .keras model; pick a layer as {name}:LAYER instead")
    local, fingerprint = copy_model(uri, kind, tmp)
    if kind == KERAS:
      model = load_keras(local, uri, safe_mode, modules)
      own = tuple(model.inputs[0].shape) if len(model.inputs) == 1 else None
      features = feature_model(model, layer, pooling, name)
    else:
      endpoint = open_saved_model(local, uri)
      own = tuple(endpoint.input_spec_.shape)
      features = None
    if own is None or len(own) != 4 or own[-1] != 3:
      raise ValueError(f"`model` {name}: takes inputs {own}; an image model takes (N, H, W, 3)")
    if size is None:
      if own[1] is None or own[2] is None or own[1] != own[2]:
        raise ValueError(f"`image_size`: {name} takes images of shape {own[1:3]}; give one square size")
      size = int(own[1])
    if kind == KERAS:
      try:
        shape = features.compute_output_spec(_spec((1, size, size, 3))).shape
      except Exception as e:
        raise ValueError(f"`image_size` {size}: {name} does not take {size}x{size} images: {e}".splitlines()[0]) from None
    else:
      features = saved_model_features(endpoint, size, output, pooling, uri)
      shape = features.outputs[0].shape
    source = ModelSource(kind, uri, fingerprint, endpoint=endpoint.call_endpoint if kind == SAVED_MODEL else None,
                         output=output, safe_mode=safe_mode, modules=tuple(modules))
  return BackboneSpec(f"{name}:{layer}" if layer else name, size, WeightsSource("model", uri, fingerprint),
                      layer=layer, feature_dim=int(shape[-1]), preprocessing_mode=preprocessing, model=source)


def _spec(shape):
  import keras
  return keras.KerasTensor(shape, dtype="float32")


def load_features(spec: BackboneSpec, pooling: str):
  """Worker side: the Keras model from a preprocessed float batch to the spec's [N, dim] features."""
  if spec.model is None:
    if spec.layer is None:
      return load_backbone(spec.name, spec.size, pooling, spec.weights)
    base = load_backbone(spec.base, spec.size, None, spec.weights)
    return feature_model(base, spec.layer, pooling, spec.base)
  source = spec.model
  if source.kind == hub.KIND:
    return hub.load_features(spec)
  local = local_copy(source)
  if source.kind == KERAS:
    return feature_model(load_keras(local, source.uri, source.safe_mode, source.modules), spec.layer, pooling,
                         spec.base)
  return saved_model_features(open_saved_model(local, source.uri, source.endpoint), spec.size, source.output,
                              pooling, source.uri)


def user_model_layers(uri: str, safe_mode=True, modules=()) -> list:
  """`--list-layers` of a user's .keras model (a SavedModel has none to pick)."""
  with tempfile.TemporaryDirectory(prefix="embed-model-") as tmp:
    kind = model_kind(uri)
    if kind == SAVED_MODEL:
      raise ValueError(f"`model` {uri} is a SavedModel, used whole through its endpoint: it has no layers to pick")
    local, _ = copy_model(uri, kind, tmp)
    return layer_choices(load_keras(local, uri, safe_mode, modules))
