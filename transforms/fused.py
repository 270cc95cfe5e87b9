"""The fused model: every backbone's preprocessing and features in one graph, uint8 batches in, one vector per image out."""

import logging
import os

import numpy as np

from transforms import hub, model_cache
from transforms.backbones import preprocess
from transforms.models import load_features
from transforms.tensorflow_import import load_tensorflow

_LOG = logging.getLogger(__name__)


def configure_tensorflow(allow_tf32=False):
  """Must run before the first TensorFlow op: GPU memory growth can't change later."""
  import tensorflow as tf
  for gpu in tf.config.list_physical_devices("GPU"):
    try:
      tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError as e:  # already initialised in this process: keep going
      _LOG.warning("could not set GPU memory growth: %s", e)
  # TF32 matmuls/convs move results by ~1e-3 on Ampere+: off unless asked for. Process-wide:
  # pipeline.main puts the previous setting back after a run.
  tf.config.experimental.enable_tensor_float_32_execution(bool(allow_tf32))


def l2_normalize(x):
  """Row-wise unit L2 norm; all-zero rows stay zero.

  Rescaled by the largest magnitude first: tf.math.l2_normalize clamps the sum of squares at
  1e-12, so rows of tiny features (norms below 1e-6, as random or dead backbones give) would
  come out short of unit length.
  """
  import tensorflow as tf
  scale = tf.reduce_max(tf.abs(x), axis=1, keepdims=True)
  x = tf.math.divide_no_nan(x, scale)
  return tf.math.l2_normalize(x, axis=1)


def batch_images(arrays, size):
  """The batch FusedModel takes for one size key: uint8 arrays stacked; full-size images (hub.FULL_IMAGE),
  which differ in size, as a list."""
  return list(arrays) if size == hub.FULL_IMAGE else np.stack(arrays)


class FusedModel:
  """uint8 batches (one per input size) in, concatenated float32 pooled features out.

  A KerasHub preset (transforms/hub.py) takes the full decoded images instead (size key
  hub.FULL_IMAGE, a list): its own converter makes its fixed-size float batch, which enters the
  graph beside the uint8 batches.
  """

  engine = "tensorflow"

  def __init__(self, backbones, pooling="avg", allow_tf32=False, mixed_precision=False, normalize="none",
               freeze=True):
    tf = load_tensorflow()
    configure_tensorflow(allow_tf32)
    self.backbones = tuple(backbones)
    is_hub = [hub.is_hub(b) for b in self.backbones]
    self.sizes = tuple(sorted({b.size for b, h in zip(self.backbones, is_hub) if not h}))
    self.dim = sum(b.dim for b in self.backbones)
    # A KerasHub preset (transforms/hub.py) takes the full decoded images (size key hub.FULL_IMAGE, a
    # list): its own converter makes its fixed-size float batch, which enters the graph after the
    # uint8 batches, in the order of the presets.
    self._converters = [hub.Converter(b) for b, h in zip(self.backbones, is_hub) if h]
    signature = [tf.TensorSpec([None, s, s, 3], tf.uint8) for s in self.sizes]
    signature += [tf.TensorSpec([None, *c.shape], tf.float32) for c in self._converters]
    # A frozen graph made before from the same specs: no Keras model, no trace, no freeze. For
    # MobileNetV2 at 224, 4.7 s of build, trace and freeze became a 1.0 s read (on the shared 2-vCPU
    # machine under load; benchmarks/startup.py --phases). transforms/model_cache.py.
    key = model_cache.model_key("tensorflow", self.backbones, pooling, normalize, bool(mixed_precision))
    cached = model_cache.read(key, lambda directory: _read_frozen(directory, signature)) if freeze else None
    if cached is not None:
      self.models, self._forward, self._frozen = None, None, cached
      return
    self._build(pooling, mixed_precision, normalize, signature)
    self._frozen = None
    if freeze:
      frozen = _freeze(self._forward, self.models)
      if frozen is not None:
        self._frozen = frozen[1]
        model_cache.write(key, lambda directory: _write_frozen(directory, frozen[0]))

  def _build(self, pooling, mixed_precision, normalize, signature):
    import keras
    import tensorflow as tf
    # Keras's dtype policy is read when layers are built, and is process-wide: set it for the
    # build only, so nothing else in this process (another run, the user's code) inherits it.
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16" if mixed_precision else "float32")
    try:
      # A registry backbone at its pooled output is keras.applications' own model; a layer or a
      # user's model is cut and pooled by transforms/models.py: either way [N, dim] out.
      self.models = [load_features(b, pooling) for b in self.backbones]
    finally:
      keras.mixed_precision.set_global_policy(policy)
    modes = [b.preprocessing for b in self.backbones]
    position = {size: i for i, size in enumerate(self.sizes)}
    # A preset's converted batch follows the uint8 batches, in the order of the presets.
    presets = [i for i, spec in enumerate(self.backbones) if hub.is_hub(spec)]
    converted = {i: len(self.sizes) + k for k, i in enumerate(presets)}

    @tf.function(input_signature=signature)
    def forward(*images):
      parts = []
      for i, (spec, mode, model) in enumerate(zip(self.backbones, modes, self.models)):
        if i in converted:
          x = images[converted[i]]
        else:
          x = preprocess(tf.cast(images[position[spec.size]], tf.float32), mode)
        part = tf.cast(model(x, training=False), tf.float32)
        # Per backbone, so backbones with different feature scales weigh alike in a search.
        parts.append(l2_normalize(part) if normalize == "l2" else part)
      return parts[0] if len(parts) == 1 else tf.concat(parts, axis=1)

    # freeze=False: for an engine that converts `forward` itself (transforms/openvino_engine.py).
    self._forward = forward

  def __call__(self, images: dict) -> np.ndarray:
    inputs = [images[s] for s in self.sizes] + [convert(images[hub.FULL_IMAGE]) for convert in self._converters]
    if self._frozen is not None:
      return self._frozen(*inputs)[0].numpy()
    return self._forward(*inputs).numpy()


# Freezing holds the weights in graph protos many times over (RSS grows by ~20x the weights'
# bytes: +190 MB for MobileNetV2's 8.6 MiB, +1.8 GB for ResNet50's 90 MiB): worth it for the
# small backbones, where folding gains most, not for ResNet50's ~10%.
_FREEZE_MAX_WEIGHT_BYTES = 16 << 20


def _freeze(forward, models):
  """(the frozen ConcreteFunction, `forward` with the weights as constants), or None where that
  gains nothing, costs too much memory, or fails.

  With constant weights Grappler folds each inference-mode BatchNormalization into the
  convolution before it, which it cannot do through variables: on CPU, MobileNetV2 needs ~25%
  less time per image, EfficientNetB0 ~20% (relative L2 change ~3e-7; benchmarks/README.md).
  Backbones without BatchNormalization (VGG, ConvNeXt) gain nothing and would only pay the
  freeze at start-up.
  """
  import keras
  if not any(isinstance(layer, keras.layers.BatchNormalization) for m in models for layer in _all_layers(m)):
    return None
  size = sum(int(np.prod(w.shape)) * np.dtype(w.dtype).itemsize for m in models for w in m.weights)
  if size > _FREEZE_MAX_WEIGHT_BYTES:
    return None
  try:
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2
    frozen = convert_variables_to_constants_v2(forward.get_concrete_function())
    # The frozen function has no structured signature: called directly, every call first fails to
    # bind its arguments to one and formats the whole batch into that error's text before it falls
    # back to the flat signature (~2.4 ms a batch of 32 at 32 px, ~20% of a near-free model's
    # forward). Called from inside a function of its own signature, that happens once, at tracing.
    return frozen, _called_by_signature(frozen, forward.input_signature)
  except Exception as e:  # an internal API; the variables' graph computes the same
    _LOG.warning("running the model with variables, could not freeze its weights: %s", e)
    return None


def _called_by_signature(function, signature):
  import tensorflow as tf
  return tf.function(function, input_signature=signature, autograph=False).get_concrete_function()


def _write_frozen(directory, frozen):
  """The frozen function's graph and the names of its inputs and output, for _read_frozen."""
  import json
  with open(os.path.join(directory, "graph.pb"), "wb") as f:
    f.write(frozen.graph.as_graph_def().SerializeToString())
  with open(os.path.join(directory, "signature.json"), "w") as f:
    json.dump({"inputs": [t.name for t in frozen.inputs], "outputs": [t.name for t in frozen.outputs]}, f)


def _read_frozen(directory, signature):
  """The frozen graph _write_frozen wrote, callable as _freeze's is."""
  import json
  import tensorflow as tf
  with open(os.path.join(directory, "signature.json")) as f:
    names = json.load(f)
  if len(names["inputs"]) != len(signature):
    raise ValueError(f"{len(names['inputs'])} inputs, the model has {len(signature)}")
  with open(os.path.join(directory, "graph.pb"), "rb") as f:
    graph_def = tf.compat.v1.GraphDef.FromString(f.read())
  imported = tf.compat.v1.wrap_function(lambda: tf.compat.v1.import_graph_def(graph_def, name=""), [])
  graph = imported.graph
  pruned = imported.prune([graph.as_graph_element(n) for n in names["inputs"]],
                          [graph.as_graph_element(n) for n in names["outputs"]])
  return _called_by_signature(pruned, signature)


def _all_layers(model):
  """A model's layers, those of nested models (a fine-tuned model's backbone) included."""
  for layer in getattr(model, "layers", ()):
    yield layer
    yield from _all_layers(layer)


def is_out_of_memory(error: BaseException) -> bool:
  try:
    import tensorflow as tf
    if isinstance(error, tf.errors.ResourceExhaustedError):
      return True
  except ImportError:
    pass
  return isinstance(error, MemoryError) or "out of memory" in str(error).lower()


def embed_robust(model, images: dict, max_batch: int):
  """Runs `model` over the batch in chunks of at most `max_batch`.

  An out-of-memory error halves the chunk and retries; any other error splits
  the chunk until the one image to blame is found. Returns (embeddings of the
  images that worked, their indices, [(index, exception)] of those that failed,
  the chunk size that worked), so one bad image never takes its neighbours down.
  """
  n = len(next(iter(images.values())))
  results, failures = {}, []
  stack = [(start, min(start + max_batch, n)) for start in range(0, n, max_batch)][::-1]
  while stack:
    start, stop = stack.pop()
    chunk = {s: a[start:stop] for s, a in images.items()}
    try:
      out = model(chunk)
    except Exception as e:  # classified below; a chunk of one is the image to blame
      if stop - start == 1:
        failures.append((start, e))
        continue
      if is_out_of_memory(e):
        max_batch = max(1, (stop - start) // 2)
        _LOG.warning("out of memory on a batch of %d: retrying in batches of %d", stop - start, max_batch)
      middle = (start + stop) // 2
      stack.extend([(middle, stop), (start, middle)])
      continue
    for i in range(start, stop):
      results[i] = out[i - start]
  order = sorted(results)
  dim = len(results[order[0]]) if order else 0
  embeddings = np.stack([results[i] for i in order]) if order else np.zeros((0, dim), np.float32)
  return embeddings, order, failures, max_batch
