"""Engines for the fused model: TensorFlow, or the same graph converted once per process and run on OpenVINO's CPU plugin."""

import glob
import importlib.util
import logging
import os
import sys
import threading

import numpy as np

from transforms import fused, hub, model_cache
from transforms.tensorflow_import import load_tensorflow

_LOG = logging.getLogger(__name__)

ENGINES = ("tensorflow", "openvino", "auto")
INSTALL = 'pip install "embed-images[openvino]" (from a checkout: pip install ".[openvino]")'


class EngineUnavailable(ImportError):
  """`engine` openvino asked for where the package is not installed."""


class ConversionError(ValueError):
  """OpenVINO could not convert the fused model; names the backbone to blame and the converter's error."""


def openvino_installed() -> bool:
  """Whether `import openvino` would find the package, without importing it (~0.2 s)."""
  try:
    return importlib.util.find_spec("openvino") is not None
  except (ImportError, ValueError):  # a broken or blanked-out module entry
    return False


def check_engine(engine: str) -> str:
  """`engine` as `EmbedImages` and `BackbonesModelHandler` take it: ValueError naming the argument
  for an unknown one, EngineUnavailable for openvino where the package is not installed (on the
  machine that builds the pipeline: workers run what it was tested with)."""
  if engine not in ENGINES:
    raise ValueError(f"`engine` must be one of {', '.join(ENGINES)}; received: {engine!r}")
  if engine == "openvino" and not openvino_installed():
    raise EngineUnavailable(f"`engine` openvino needs the openvino package, which is not installed: {INSTALL}")
  return engine


def import_openvino():
  """The openvino module, or EngineUnavailable naming the install command."""
  try:
    import openvino
  except ImportError as e:
    raise EngineUnavailable(f"`engine` openvino needs the openvino package, which is not installed "
                            f"({type(e).__name__}): {INSTALL}") from None
  return openvino


def openvino_version():
  """OpenVINO's release (e.g. 2026.4.1) where it is installed, else None."""
  try:
    return import_openvino().get_version().split("-")[0]
  except EngineUnavailable:
    return None


# The device files a GPU driver makes on Linux (CUDA, ROCm, WSL2's GPU paravirtualization): without
# one TensorFlow finds no GPU there.
_GPU_DEVICE_FILES = ("/dev/nvidia[0-9]*", "/dev/kfd", "/dev/dxg")


def has_gpu() -> bool:
  """Whether TensorFlow sees a GPU here. On Linux with no GPU driver's device file, no, without
  importing TensorFlow (4-6 s): a launch that resolves `auto` needs no import it would not make anyway."""
  if "tensorflow" not in sys.modules and sys.platform.startswith("linux") and not any(
      glob.glob(pattern) for pattern in _GPU_DEVICE_FILES):
    return False
  tf = load_tensorflow()
  return bool(tf.config.list_physical_devices("GPU"))


def resolve_engine(engine: str, gpu=None, installed=None) -> str:
  """`auto` -> openvino on a worker with no GPU where the package is installed, else tensorflow;
  the others as they are. GPUs stay on TensorFlow."""
  if engine not in ENGINES:
    raise ValueError(f"`engine` must be one of {', '.join(ENGINES)}; received: {engine!r}")
  if engine != "auto":
    return engine
  gpu = has_gpu() if gpu is None else gpu
  installed = openvino_installed() if installed is None else installed
  return "openvino" if installed and not gpu else "tensorflow"


def supports_bf16(core) -> bool:
  return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def compile_config(core, bf16: bool) -> dict:
  """The CPU plugin's settings: precision always explicit, throughput streams.

  Without INFERENCE_PRECISION_HINT, a CPU with AVX512-BF16 or AMX runs bf16 silently (rows ~1e-2
  off); f32 is what keeps rows within 1e-5 of TensorFlow's. THROUGHPUT gives one stream per core
  pair or so (2 on 2 vCPUs), and OpenVINOModel splits each batch over them: on 2 vCPUs that is
  ~1.25x the LATENCY hint's one stream, while THROUGHPUT with one synchronous request per batch was
  ~0.6x it (MobileNetV2 at 224, batches of 32, bare forward; benchmarks/README.md).
  """
  if bf16 and not supports_bf16(core):
    _LOG.warning("mixed precision: this CPU has no bf16 support (OpenVINO's capabilities: %s); running f32",
                 ", ".join(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")))
    bf16 = False
  return {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32"}


def model_key(backbones, pooling, normalize) -> str:
  """The cache key of a converted model (precision is the compiler's: one entry serves f32 and bf16)."""
  return model_cache.model_key("openvino", tuple(backbones), pooling, normalize, _CONVERSION)


# Part of the converted model's cache key: 2 since the conversion keeps only the function's own
# outputs (_function_outputs_only); entries converted before hold the extra outputs, and are not read.
_CONVERSION = 2


def _read_converted(directory):
  return import_openvino().Core().read_model(os.path.join(directory, "model.xml"))


def _save_converted(converted):
  # f32 as converted: save_model's default would store the weights in fp16.
  return lambda directory: import_openvino().save_model(converted, os.path.join(directory, "model.xml"),
                                                       compress_to_fp16=False)


# Where the model cache is off: the models converted in this process, by key, so that the launch's
# conversion (engine_here) is the build's too on the local runner (one conversion, not two).
_CONVERTED_HERE = {}


def read_cached(key):
  """The converted model cached under `key` (with the model cache off, converted earlier in this
  process), or None."""
  if not model_cache.cache_root():
    return _CONVERTED_HERE.get(key)
  return model_cache.read(key, _read_converted)


def write_cached(key, converted):
  if not model_cache.cache_root():
    _CONVERTED_HERE[key] = converted
    return
  model_cache.write(key, _save_converted(converted))


def holds_converted(key) -> bool:
  """Whether read_cached(key) would find an entry (not whether it reads)."""
  return key in _CONVERTED_HERE if not model_cache.cache_root() else model_cache.holds(key)


def convert_fused(model: "fused.FusedModel", converter=None):
  """The fused model's graph converted for OpenVINO; ConversionError naming the backbone to blame."""
  converter = converter or import_openvino().convert_model
  try:
    function = model._forward.get_concrete_function()
    converted = converter(function)
  except Exception as e:  # the converter's own errors are many kinds: reworded, naming the backbone
    raise ConversionError(f"OpenVINO cannot convert {_culprit(model, converter)}: "
                          f"{type(e).__name__}: {e}".splitlines()[0]) from None
  return _function_outputs_only(converted, [t.name for t in function.outputs])


def _function_outputs_only(converted, names):
  """The converted model with only the function's own outputs (`names`, in order).

  OpenVINO's TensorFlow frontend (2026.4) also makes a model output of each Keras activation's
  `Identity` in some graphs: EfficientNet's swish layers gave 49 extra outputs. Each is computed,
  transposed back to NHWC and copied out on every call. That came to ~45% of EfficientNetB0's time
  (Transpose and Reorder nodes), which put it at 0.64x TensorFlow (benchmarks/README.md)."""
  outputs = list(getattr(converted, "outputs", ()))
  if len(outputs) <= len(names):
    return converted
  by_name = {name: output for output in outputs for name in output.get_names()}
  if not all(name in by_name for name in names):
    return converted  # not the layout this was written for: left as converted
  ov = import_openvino()
  return ov.Model([by_name[name] for name in names], converted.get_parameters(), converted.get_friendly_name())


class OpenVINOModel:
  """A FusedModel's graph on OpenVINO's CPU plugin; the same call: {size: uint8 NHWC} -> float32 [N, dim].

  `model` is the FusedModel (its graph is converted) or an already converted model (`backbones`
  then says what it holds)."""

  engine = "openvino"

  def __init__(self, model, bf16=False, convert=None, core=None, backbones=None):
    ov = import_openvino()
    if isinstance(model, fused.FusedModel):
      self.backbones, converted = model.backbones, convert_fused(model, convert)
    else:
      self.backbones, converted = tuple(backbones), model
    self.sizes = tuple(sorted({b.size for b in self.backbones}))
    self.dim = sum(b.dim for b in self.backbones)
    self._core = core or ov.Core()
    self.config = compile_config(self._core, bf16)
    self._compiled = self._core.compile_model(converted, "CPU", self.config)
    self.precision = self._compiled.get_property("INFERENCE_PRECISION_HINT").to_string()  # f32 | bf16
    streams = int(self._compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
    self._requests = [self._compiled.create_infer_request() for _ in range(max(1, streams))]
    # One batch at a time uses every stream already; callers on other threads wait their turn.
    self._lock = threading.Lock()

  def __call__(self, images: dict) -> np.ndarray:
    arrays = [np.ascontiguousarray(images[s]) for s in self.sizes]
    n = len(arrays[0])
    parts = min(len(self._requests), n)
    bounds = np.linspace(0, n, parts + 1).astype(int)
    with self._lock:
      started = []
      for request, start, stop in zip(self._requests, bounds[:-1], bounds[1:]):
        request.start_async({i: a[start:stop] for i, a in enumerate(arrays)})
        started.append(request)
      outputs = []
      for request in started:
        request.wait()
        outputs.append(np.array(request.get_output_tensor(0).data, dtype=np.float32, copy=True))
    return outputs[0] if len(outputs) == 1 else np.concatenate(outputs, axis=0)


def _culprit(model, convert) -> str:
  """The first backbone whose own features OpenVINO cannot convert; all of them where none fails alone."""
  import tensorflow as tf
  for spec, features in zip(model.backbones, model.models):
    single = tf.function(lambda x, features=features: features(x, training=False),
                         input_signature=[tf.TensorSpec([None, spec.size, spec.size, 3], tf.float32)])
    try:
      convert(single.get_concrete_function())
    except Exception:  # this one is to blame
      return f"backbone {spec.name}"
  return "the backbones " + ", ".join(spec.name for spec in model.backbones)


def build(spec) -> "fused.FusedModel | OpenVINOModel":
  """The fused model of a ModelSpec (transforms/specs.py) on its engine."""
  return make_engine(spec.engine, spec.backbones, spec.pooling, spec.allow_tf32, spec.mixed_precision,
                     spec.normalize)


def _engine_for(engine, backbones) -> str:
  """`engine` resolved for these backbones: KerasHub presets stay on TensorFlow (ConversionError under
  `openvino`, one warning line under `auto`)."""
  chosen = resolve_engine(engine)
  presets = [b.name for b in backbones if hub.is_hub(b)]
  if chosen != "tensorflow" and presets:
    # A preset's ImageConverter runs beside the graph, on TensorFlow: not converted here.
    if engine == "openvino":
      raise ConversionError(f"OpenVINO does not run KerasHub presets here ({', '.join(presets)}): "
                            f"use --engine tensorflow")
    _LOG.warning("engine auto: KerasHub presets (%s) run on TensorFlow", ", ".join(presets))
    chosen = "tensorflow"
  return chosen


def _converted(backbones, pooling, allow_tf32, normalize, convert=None):
  """The converted model: from the model cache (read_cached), else converted (and kept); ConversionError."""
  import_openvino()
  # A converter of the caller's own (tests) bypasses the cache both ways.
  key = model_key(backbones, pooling, normalize) if convert is None else None
  cached = read_cached(key) if key else None
  if cached is not None:  # no Keras model, no trace, no conversion
    return cached
  # Not frozen: OpenVINO takes the variables' graph and folds the weights itself.
  base = fused.FusedModel(backbones, pooling, allow_tf32, False, normalize, freeze=False)
  converted = convert_fused(base, convert)
  if key:
    write_cached(key, converted)
  return converted


def engine_here(engine, backbones, pooling="avg", allow_tf32=False, normalize="none", convert=True) -> str:
  """The engine a build of this model on this machine runs, decided where the conversion happens:
  `engine` resolved (`_engine_for`), and for openvino the model converted into the model cache now
  (or found there), so that the build reads it back instead of converting again. A model OpenVINO
  cannot convert is ConversionError under `openvino`, and under `auto` TensorFlow, with one warning
  line. `convert` False (a dry run): the engine as resolved, nothing converted."""
  chosen = _engine_for(engine, backbones)
  if chosen == "tensorflow" or not convert:
    return chosen
  key = model_key(backbones, pooling, normalize)
  if holds_converted(key):
    return chosen
  try:
    _converted(backbones, pooling, allow_tf32, normalize)
  except ConversionError as e:
    if engine == "openvino":
      raise
    _LOG.warning("engine auto: %s; running on TensorFlow", e)
    return "tensorflow"
  return chosen


def make_engine(engine, backbones, pooling="avg", allow_tf32=False, mixed_precision=False, normalize="none",
                convert=None):
  """The fused model on the engine asked for: FusedModel (TensorFlow) or OpenVINOModel.

  `auto` falls back to TensorFlow, with one warning line, where OpenVINO cannot convert the model;
  `openvino` raises ConversionError there. With OpenVINO, `mixed_precision` means bf16 where the CPU
  has it (the Keras graph stays float32: OpenVINO lowers the precision itself).
  """
  if _engine_for(engine, backbones) == "openvino":
    try:
      converted = _converted(backbones, pooling, allow_tf32, normalize, convert)
      return OpenVINOModel(converted, bf16=mixed_precision, backbones=backbones)
    except ConversionError as e:
      if engine == "openvino":
        raise
      _LOG.warning("engine auto: %s; running on TensorFlow", e)
  return fused.FusedModel(backbones, pooling, allow_tf32, mixed_precision, normalize)
