"""KerasHub presets as backbones: resolved at launch, copied and verified on workers, fed through their own ImageConverter in float."""

import atexit
import dataclasses
import difflib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from typing import Optional

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from transforms.decode import FULL
from transforms.tensorflow_import import load_tensorflow
from transforms.weights import BackboneSpec, WeightsSource

_LOG = logging.getLogger(__name__)

PREFIX = "hub:"
KIND = "keras_hub"  # ModelSource.kind and WeightsSource.kind of a preset
# The decode size key of the full decoded image, unresized: a preset's converter resizes it in float.
FULL_IMAGE = FULL
CHOICES = ("cls", "mean")
INSTALL_HINT = 'pip install "embed-images[hub]" (from a checkout: pip install -c constraints.txt ".[hub]")'
# What Backbone.from_preset and ImageConverter.from_preset read: what is fingerprinted, staged and verified.
# A task preset's head (task.json, task.weights.h5) and a tokenizer's assets are not.
CONFIG_FILE, CONVERTER_FILE, METADATA_FILE = "config.json", "image_converter.json", "metadata.json"
_WEIGHTS_FILE, _SHARDED_INDEX = "model.weights.h5", "model.weights.json"
_CHUNK_BYTES = 8 << 20
# Converter settings that decide its output; the rest (name, dtype, box format) does not.
_CONVERTER_KEYS = ("image_size", "interpolation", "antialias", "crop_to_aspect_ratio", "pad_to_aspect_ratio",
                   "scale", "offset")
# Vision transformers by class: how many tokens come before the patch tokens (class, registers,
# distillation); the class token is the first where there is one.
_PREFIX_TOKENS = {
    "DINOV2Backbone": lambda b: 1 + int(b.num_register_tokens),
    "DINOV3Backbone": lambda b: 1 + int(b.num_register_tokens),
    "ViTBackbone": lambda b: int(b.use_class_token),
    "DeiTBackbone": lambda b: 2,
}

FAMILIES = (
    ("image-text (CLIP, SigLIP, SigLIP 2, MetaCLIP 2)", "get_vision_embeddings(images): the projected image "
     "embedding, not normalised (--normalize l2 does that); :cls and :mean do not apply"),
    ("vision transformers (DINOv2/v3, ViT, DeiT)", "the class token of the final sequence, after the final norm "
     "(:cls, the default); :mean is the mean of the patch tokens, without class, register and distillation tokens"),
    ("convolutional (ResNet, EfficientNet, ... in KerasHub)", "the final feature map pooled as --pooling says"),
)


def format_families() -> str:
  """The KerasHub part of `embed-images --list-backbones`."""
  lines = ["KerasHub presets: --backbones hub:PRESET[:cls|:mean], or --model NAME=PRESET_DIR and NAME[:cls|:mean]",
           f"  (needs {INSTALL_HINT})",
           "  preprocessing: the preset's own ImageConverter, in float, on the full decoded image",
           "  (--image-size, --resize, --fast-decode and --weights do not apply to presets)",
           "  the vector:"]
  lines += [f"    {family}: {vector}" for family, vector in FAMILIES]
  return "\n".join(lines)


def keras_hub():
  """The keras_hub module; ValueError saying what to install where it is missing."""
  load_tensorflow()
  try:
    import keras_hub as module
  except ImportError:
    raise ValueError(f"`backbones`: KerasHub presets need the keras-hub package, not installed here: "
                     f"{INSTALL_HINT}") from None
  return module


def is_hub(spec: BackboneSpec) -> bool:
  return spec.model is not None and getattr(spec.model, "kind", None) == KIND


def split_entry(entry: str) -> tuple:
  """'hub:PRESET[:cls|:mean]' -> (PRESET, choice or None)."""
  rest = entry[len(PREFIX):]
  preset, colon, choice = rest.partition(":")
  return preset, (choice if colon else None)


def is_preset_dir(uri: str) -> bool:
  """A KerasHub preset directory (local or gs://): config.json beside metadata.json, as save_to_preset writes."""
  root = uri.rstrip("/")
  try:
    return all(FileSystems.exists(FileSystems.join(root, f)) for f in (CONFIG_FILE, METADATA_FILE))
  except Exception:  # a scheme Beam has no filesystem for, an unreadable bucket: not a preset we can use
    return False


# ----- files: fingerprint at launch, verified copy on workers

def _preset_files(root: str) -> list:
  """[(name, full path)] of the files a backbone and its converter load from, sorted."""
  names = [CONFIG_FILE, CONVERTER_FILE, METADATA_FILE, _WEIGHTS_FILE, _SHARDED_INDEX]
  found = [n for n in names if FileSystems.exists(FileSystems.join(root, n))]
  shards = FileSystems.match([FileSystems.join(root, "model_*.weights.h5")])[0].metadata_list
  found += [FileSystems.split(m.path)[1] for m in shards]
  return sorted((n, FileSystems.join(root, n)) for n in set(found))


def copy_preset(root: str, dest: str, expected: Optional[str] = None) -> str:
  """Copies the preset's model files under `dest`; returns their fingerprint, "sha256:" over each
  file's name and sha256. With `expected`, a preset whose files changed since launch is refused."""
  entries = []
  os.makedirs(dest, exist_ok=True)
  for name, path in _preset_files(root.rstrip("/")):
    digest = hashlib.sha256()
    local = os.path.join(dest, name)
    with open(local, "wb") as out, FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
      for chunk in iter(lambda: f.read(_CHUNK_BYTES), b""):
        digest.update(chunk)
        out.write(chunk)
    entries.append(f"{name}\t{digest.hexdigest()}\n")
  fingerprint = "sha256:" + hashlib.sha256("".join(entries).encode()).hexdigest()
  if expected is not None and fingerprint != expected:
    raise ValueError(f"`model` {root} changed after launch: its fingerprint is now {fingerprint}, "
                     f"the run was planned with {expected}")
  return fingerprint


def _download(preset: str) -> str:
  """A built-in preset's local directory, downloaded into KerasHub's cache (kagglehub's) if need be."""
  from keras_hub.src.utils import preset_utils
  try:
    local = os.path.dirname(preset_utils.get_file(preset, CONFIG_FILE))
    for name in (CONVERTER_FILE, METADATA_FILE, _WEIGHTS_FILE):
      try:
        preset_utils.get_file(preset, name)
      except FileNotFoundError:  # checked with the others once local
        pass
    if os.path.exists(os.path.join(local, _SHARDED_INDEX)) or not os.path.exists(os.path.join(local, _WEIGHTS_FILE)):
      _download_shards(preset, local)
  except (FileNotFoundError, ValueError):
    raise
  except Exception as e:  # requests' ConnectionError, kagglehub's HTTP errors, no credentials
    raise ValueError(
        f"`backbones` hub:{preset}: cannot download the preset ({type(e).__name__}: {e}); offline or air-gapped, "
        f"copy its directory (e.g. saved with keras_hub.models.Backbone.from_preset({preset!r}).save_to_preset(DIR) "
        "and the converter's save_to_preset(DIR), on a machine online) and pass --model NAME=DIR".splitlines()[0]
    ) from None
  return local


def _download_shards(preset, local):
  from keras_hub.src.utils import preset_utils
  index = os.path.join(local, _SHARDED_INDEX)
  if not os.path.exists(index):
    preset_utils.get_file(preset, _SHARDED_INDEX)
  with open(index) as f:
    for name in sorted(set(json.load(f).get("weight_map", {}).values())):
      preset_utils.get_file(preset, name)


_COPIES = {}  # (uri, fingerprint) -> local directory: one verified copy per worker process
_COPIES_LOCK = threading.Lock()


def local_preset(source) -> str:
  """Worker side: a local directory holding the preset's files, verified against the launch fingerprint."""
  key = (source.uri, source.fingerprint)
  with _COPIES_LOCK:
    if key not in _COPIES:
      dest = tempfile.mkdtemp(prefix="embed-preset-")
      atexit.register(shutil.rmtree, dest, True)
      root = source.uri if source.endpoint == "directory" else _download(source.uri)
      copy_preset(root, dest, expected=source.fingerprint)
      _COPIES[key] = dest
    return _COPIES[key]


# ----- the model: converter settings, vector choice, features

def converter_settings(converter) -> dict:
  """What the layout records of a converter: its class and every setting that changes its output."""
  config = converter.get_config()
  settings = {"class": type(converter).__name__}
  settings.update({k: config.get(k) for k in _CONVERTER_KEYS})
  return json.loads(json.dumps(settings))  # tuples as lists, as they read back from JSON


def preprocessing_mode(settings: dict) -> str:
  """The layout's `preprocessing` of a preset: compared by --previous and --resume like any mode."""
  return "keras_hub:" + json.dumps(settings, sort_keys=True, separators=(",", ":"))


def vector_kind(backbone, choice: Optional[str], pooling: str, label: str) -> str:
  """"vision_embedding", "cls", "mean" or "pooled_<pooling>": what the vector is for this backbone."""
  import keras
  if choice is not None and choice not in CHOICES:
    raise ValueError(f"`backbones` {label}: {choice!r} is not a vector choice; a KerasHub transformer takes "
                     f"{' or '.join(':' + c for c in CHOICES)}")
  name = type(backbone).__name__
  if hasattr(backbone, "get_vision_embeddings"):
    if choice is not None:
      raise ValueError(f"`backbones` {label}: {name} is an image-text model, whose vector is its projected image "
                       f"embedding; :{choice} applies to vision transformers only")
    return "vision_embedding"
  if name in _PREFIX_TOKENS:
    if choice == "cls" and _PREFIX_TOKENS[name](backbone) == 0:
      raise ValueError(f"`backbones` {label}: this {name} has no class token; use :mean")
    return choice or ("cls" if _PREFIX_TOKENS[name](backbone) else "mean")
  outputs = backbone.outputs
  if len(outputs) == 1 and len(outputs[0].shape) == 4 and isinstance(backbone.input, keras.KerasTensor):
    if choice is not None:
      raise ValueError(f"`backbones` {label}: {name} is convolutional (pooled as --pooling says); "
                       f":{choice} applies to vision transformers only")
    return f"pooled_{pooling}"
  raise ValueError(f"`backbones` {label}: {name} is not an image backbone this tool can take a vector from "
                   "(image-text models, DINOv2/v3, ViT, DeiT and convolutional backbones are)")


def features_model(backbone, vector: str, size: tuple):
  """A Keras model from the converter's float output (N, H, W, 3) to the chosen vector (N, D)."""
  import keras
  from keras import ops
  from transforms.models import pooled
  inputs = keras.Input((*size, 3), name="converted")
  if vector == "vision_embedding":
    out = backbone.get_vision_embeddings(inputs)
  else:
    feed = {next(iter(backbone.input)): inputs} if isinstance(backbone.input, dict) else inputs
    out = backbone(feed, training=False)
    if vector == "cls":
      out = out[:, 0, :]
    elif vector == "mean":
      out = ops.mean(out[:, _PREFIX_TOKENS[type(backbone).__name__](backbone):, :], axis=1)
    else:
      out = pooled(out, vector.rsplit("_", 1)[1])
  return keras.Model(inputs, out, name="embed_images_hub")


def _load(local: str, label: str):
  """(backbone, converter) from a local preset directory; one-line ValueErrors naming `label`."""
  hub = keras_hub()
  if not os.path.exists(os.path.join(local, CONVERTER_FILE)):
    raise ValueError(f"`backbones` {label}: the preset has no {CONVERTER_FILE}, so its preprocessing is unknown; "
                     "save the model's ImageConverter into it (converter.save_to_preset(DIR))")
  try:
    backbone = hub.models.Backbone.from_preset(local)
  except Exception as e:  # KerasHub's own multi-line messages: one line, naming the preset
    raise ValueError(f"`backbones` {label}: KerasHub cannot load its backbone: {type(e).__name__}: {e}"
                     .splitlines()[0]) from None
  converter = hub.layers.ImageConverter.from_preset(local)
  if converter.image_size is None:
    raise ValueError(f"`backbones` {label}: its ImageConverter does not resize (image_size None), so images "
                     "of different sizes cannot be batched")
  return backbone, converter


@dataclasses.dataclass(frozen=True)
class HubSource:
  """A preset as launch found it (the `model` of its BackboneSpec); workers copy and verify it."""
  kind: str  # KIND
  uri: str  # a built-in preset name, or the preset directory (local or gs://)
  fingerprint: str  # copy_preset's, over the model files
  endpoint: str  # "builtin" | "directory": where workers get the files
  vector: str  # vector_kind's
  converter: str  # preprocessing_mode's JSON, as launch read it
  output: Optional[str] = None  # the layout's model_output: unused here

  @property
  def sha256(self) -> str:
    return self.fingerprint.split(":", 1)[1]


def resolve_preset(name: str, preset: str, choice: Optional[str], pooling: str, directory: bool) -> BackboneSpec:
  """Launch: a preset as a BackboneSpec, having fetched (built-in), fingerprinted and loaded it once as
  workers will. `name` is the --backbones entry's name (hub:PRESET, or the --model name of a directory)."""
  hub = keras_hub()
  label = f"hub:{preset}" if not directory else f"{name} ({preset})"
  if directory:
    root, endpoint = preset.rstrip("/"), "directory"
    if not is_preset_dir(root):
      raise ValueError(f"`model` {preset!r} is not a KerasHub preset directory (no {CONFIG_FILE} with "
                       f"{METADATA_FILE}, as save_to_preset writes)")
  else:
    known = sorted(hub.models.Backbone.presets)
    if preset not in known:
      nearest = difflib.get_close_matches(preset, known, n=3, cutoff=0.5)
      raise ValueError(f"`backbones` hub:{preset}: KerasHub has no such preset; nearest: "
                       f"{', '.join(nearest) or 'none'} (python -c 'import keras_hub; "
                       "print(sorted(keras_hub.models.Backbone.presets))' lists them)")
    root, endpoint = _download(preset), "builtin"
  with tempfile.TemporaryDirectory(prefix="embed-preset-") as tmp:
    fingerprint = copy_preset(root, tmp)
    if not os.path.exists(os.path.join(tmp, CONFIG_FILE)):
      raise ValueError(f"`model` {preset!r} has no {CONFIG_FILE}: not a KerasHub preset")
    if FileSystems.exists(FileSystems.join(root, "task.json")):
      # A task preset (an image classifier, ...) holds its backbone's preset whole: that is what
      # an embedding needs; its head and preprocessor are left out.
      _LOG.warning("%s is a task preset: its backbone is used, its task head is not", label)
    backbone, converter = _load(tmp, label)
    vector = vector_kind(backbone, choice, pooling, label)
    settings = converter_settings(converter)
    try:
      dim = int(features_model(backbone, vector, tuple(converter.image_size)).outputs[0].shape[-1])
    except Exception as e:  # e.g. a converter size the backbone's input does not take
      raise ValueError(f"`backbones` {label}: its converter's {tuple(converter.image_size)} images do not fit its "
                       f"backbone: {type(e).__name__}: {e}".splitlines()[0]) from None
  mode = preprocessing_mode(settings)
  source = HubSource(KIND, root if directory else preset, fingerprint, endpoint, vector, mode)
  entry = f"{name}:{choice}" if choice else name
  return BackboneSpec(entry, FULL_IMAGE, WeightsSource(KIND, source.uri, fingerprint), layer=vector,
                      feature_dim=dim, preprocessing_mode=mode, model=source)


# ----- workers

def load_features(spec: BackboneSpec):
  """Worker side: the Keras model from the converter's float output to the spec's [N, dim] vector."""
  local = local_preset(spec.model)
  backbone, converter = _load(local, spec.name)
  return features_model(backbone, spec.model.vector, tuple(converter.image_size))


class Converter:
  """The preset's own ImageConverter in float over full decoded uint8 images of any size, run once
  per distinct image size on the images of that size stacked (a batch of photos from one camera or
  one dataset is one call), its fixed-size float32 outputs put back in input order.

  Stacking changes nothing: the converter resizes each image of a batch on its own (bit-identical
  to one image at a time); what it saves is a call and its dispatch per image.
  """

  def __init__(self, spec: BackboneSpec):
    import tensorflow as tf
    layer = keras_hub().layers.ImageConverter.from_preset(local_preset(spec.model))
    if preprocessing_mode(converter_settings(layer)) != spec.model.converter:
      raise ValueError(f"`backbones` {spec.name}: the preset's ImageConverter settings changed after launch")
    self.shape = (*layer.image_size, 3)

    # One trace for every image size and batch: all three dimensions are dynamic.
    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])
    def convert(images):
      return layer(tf.cast(images, tf.float32))

    self._convert = convert

  def __call__(self, images):
    import numpy as np
    groups = {}
    for i, image in enumerate(images):
      groups.setdefault(image.shape, []).append(i)
    if len(groups) == 1:
      return self._convert(np.stack(images)).numpy()
    out = np.empty((len(images), *self.shape), np.float32)
    for indices in groups.values():
      out[indices] = self._convert(np.stack([images[i] for i in indices])).numpy()
    return out
