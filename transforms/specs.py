"""Backbones as a run builds them: names and keyword arguments resolved into specs, and the layout a reader of the vector needs."""

import dataclasses
from typing import Optional

from transforms import hub
from transforms import models as model_files
from transforms.backbones import BACKBONES, PREPROCESSING_MODES, get_backbone
from transforms.weights import BackboneSpec, resolve_weights
from transforms.write import package_versions


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Everything the fused model is built from; equal specs build the same model, so one is
  shared per process (`repr` is its key)."""
  backbones: tuple  # of BackboneSpec, in vector order
  pooling: str = "avg"
  normalize: str = "none"
  allow_tf32: bool = False
  mixed_precision: bool = False
  engine: str = "tensorflow"  # tensorflow | openvino | auto (transforms/openvino_engine.py)

  @property
  def sizes(self) -> tuple:
    return tuple(sorted({b.size for b in self.backbones}))

  @property
  def dim(self) -> int:
    return sum(b.dim for b in self.backbones)


def backbone_entries(backbones) -> list:
  """A list of names, or one comma string, as the list of entries."""
  if isinstance(backbones, str):
    return [n.strip() for n in backbones.split(",") if n.strip()]
  return [str(n).strip() for n in (backbones or ())]


def parse_backbones(backbones, models=(), image_size=None) -> list:
  """The entries as (entry, registry or `models` name or hub:PRESET, layer or None), each size
  checked against its backbone's minimum; ValueError naming `backbones` and the value received.

  `hub:PRESET[:cls|:mean]` is a KerasHub preset (its converter sets its size; resolving checks the
  name): split at its second ':', as a preset name holds none. Elsewhere `:X` is a layer name, or
  for a `models` preset directory its vector choice.
  """
  entries = backbone_entries(backbones)
  if not entries or len(set(entries)) != len(entries):
    raise ValueError(f"`backbones` must name one or more backbones, each once; received: {backbones!r}")
  parsed = []
  for entry in entries:
    if entry.startswith(hub.PREFIX):
      preset, choice = hub.split_entry(entry)
      if not preset or choice == "":
        raise ValueError(f"`backbones`: {entry!r} must be hub:PRESET, hub:PRESET:cls or hub:PRESET:mean")
      parsed.append((entry, f"{hub.PREFIX}{preset}", choice))
      continue
    name, colon, layer = entry.partition(":")
    if name not in BACKBONES and name not in models:
      raise ValueError(f"`backbones`: unknown backbone {name!r}; valid names: {', '.join([*BACKBONES, *models])}")
    if colon and not layer:
      raise ValueError(f"`backbones`: {entry!r} names no layer after ':'")
    minimum = get_backbone(name).min_size if name in BACKBONES else 1
    size = image_size or (get_backbone(name).native_size if name in BACKBONES else minimum)
    if size < minimum:
      raise ValueError(f"`image_size` {size} is too small for {name}: its minimum is {minimum}")
    parsed.append((entry, name, layer or None))
  unused = [name for name in models if name not in {n for _, n, _ in parsed}]
  if unused:
    raise ValueError(f"`model` {unused[0]} is registered but `backbones` does not name it")
  return parsed


def resolve_backbone(entry: str, name: str, layer: Optional[str], *, weights: str, image_size: Optional[int],
                     pooling: str, model: Optional[dict] = None, modules: tuple = ()) -> BackboneSpec:
  """One entry resolved: a registry backbone's weights fingerprinted, or a user model (`model`:
  {path, preprocessing, output, safe_mode}) copied, loaded and fingerprinted; a layer's dim read
  off the model. A KerasHub preset (hub:PRESET, or a `model` path that is a preset directory) is
  fetched, fingerprinted and loaded once (transforms/hub.py); `layer` is then its vector choice."""
  if name.startswith(hub.PREFIX):
    return hub.resolve_preset(name, name[len(hub.PREFIX):], layer, pooling, directory=False)
  if model is not None and hub.is_preset_dir(model["path"]):
    return hub.resolve_preset(name, model["path"], layer, pooling, directory=True)
  if model is not None:
    return model_files.resolve_model(name, model["path"], layer, image_size, pooling, model.get("preprocessing", "none"),
                                model.get("output"), model.get("safe_mode", True), modules)
  size = image_size or get_backbone(name).native_size
  source = resolve_weights(weights, name, size)
  if layer is None:
    return BackboneSpec(name, size, source)
  dim = model_files.inspect_registry_layer(name, size, layer)
  return BackboneSpec(entry, size, source, layer=layer, feature_dim=dim)


def resolve_backbones(backbones, *, weights="imagenet", image_size=None, pooling="avg", models=None,
                      model_preprocessing=None, model_outputs=None, unsafe_models=(), modules=()) -> tuple:
  """`EmbedImages`'s model arguments as BackboneSpecs; ValueError naming the argument otherwise.
  Already resolved specs (a tuple of BackboneSpec) are returned as they are."""
  entries = list(backbones) if not isinstance(backbones, str) else None
  if entries and all(isinstance(b, BackboneSpec) for b in entries):
    return tuple(entries)
  if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
    raise ValueError(f"`image_size` must be a positive integer; received: {image_size!r}")
  registered = dict(models or {})
  for option, named in (("model_preprocessing", model_preprocessing or {}), ("model_outputs", model_outputs or {}),
                        ("unsafe_models", {n: True for n in unsafe_models})):
    for name in named:
      if name not in registered:
        raise ValueError(f"`{option}` names {name!r}, which `models` does not register; registered: "
                         f"{', '.join(registered) or 'none'}")
  for name, mode in (model_preprocessing or {}).items():
    if mode not in PREPROCESSING_MODES:
      raise ValueError(f"`model_preprocessing` {name}={mode!r}: valid modes are {', '.join(PREPROCESSING_MODES)}")
  clash = [name for name in registered if name in BACKBONES]
  if clash:
    raise ValueError(f"`models` {clash[0]}: a registry backbone has that name; give your model another")
  specs = []
  for entry, name, layer in parse_backbones(backbones, registered, image_size):
    model = None
    if name in registered:
      model = {"path": registered[name], "preprocessing": (model_preprocessing or {}).get(name, "none"),
               "output": (model_outputs or {}).get(name), "safe_mode": name not in set(unsafe_models)}
    specs.append(resolve_backbone(entry, name, layer, weights=weights, image_size=image_size, pooling=pooling,
                                  model=model, modules=tuple(modules)))
  return tuple(specs)


def model_layout(model: ModelSpec, resize: str = "squash", fast_decode: bool = False,
                 engine_requested: Optional[str] = None) -> dict:
  """What a reader needs to interpret the vector, in Parquet metadata and _SUCCESS.json.

  `engine` is the model's: the one that ran where it was decided before the job (a local run's
  launch), else the one asked for (`auto`: each worker decides); `engine_requested` (None: the
  same) is the one asked for."""
  entries, offset = [], 0
  for spec in model.backbones:
    entries.append({
        "name": spec.name,
        "offset": offset,
        "dim": spec.dim,
        "input_size": spec.size,
        "preprocessing": spec.preprocessing,
        "weights": spec.weights.kind,
        "weights_fingerprint": spec.weights.fingerprint,
        "source": spec.model.uri if spec.model else spec.base,  # a model's path, or the registry name
        "layer": spec.layer,
        "model_sha256": spec.model.sha256 if spec.model else None,
        "model_output": spec.model.output if spec.model else None,
    })
    offset += spec.dim
  return {
      "dim": offset,
      "backbones": entries,
      "pooling": model.pooling,
      "normalize": model.normalize,
      "resize": resize,
      "fast_decode": fast_decode,
      "mixed_precision": model.mixed_precision,
      "allow_tf32": model.allow_tf32,
      "engine": model.engine,  # its version: "versions" (tensorflow, openvino)
      "engine_requested": engine_requested or model.engine,
      "versions": package_versions(),
  }
