"""Embed stage: one fused Keras model per worker process, and the DoFn that reads, decodes and embeds files."""

import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import threading
import time
from typing import Optional

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.transforms import window
from apache_beam.utils import shared

from transforms import decode
from transforms.backbones import get_backbone, preprocess
from transforms.read import read_bytes, sha256_hex
from transforms.weights import load_backbone
from transforms.write import error_row, rows_to_table

_LOG = logging.getLogger(__name__)
ERRORS_TAG = "errors"
CARRIED_TAG = "carried"


def configure_tensorflow(allow_tf32=False, mixed_precision=False):
  """Must run before the first TensorFlow op: GPU memory growth and precision can't change later."""
  import tensorflow as tf
  for gpu in tf.config.list_physical_devices("GPU"):
    try:
      tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError as e:  # already initialised in this process: keep going
      _LOG.warning("could not set GPU memory growth: %s", e)
  # TF32 matmuls/convs move results by ~1e-3 on Ampere+: off unless asked for.
  tf.config.experimental.enable_tensor_float_32_execution(bool(allow_tf32))
  if mixed_precision:
    import keras
    keras.mixed_precision.set_global_policy("mixed_float16")


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


class FusedModel:
  """uint8 batches (one per input size) in, concatenated float32 pooled features out."""

  def __init__(self, backbones, pooling="avg", allow_tf32=False, mixed_precision=False, normalize="none"):
    import tensorflow as tf
    configure_tensorflow(allow_tf32, mixed_precision)
    self.backbones = tuple(backbones)
    self.sizes = tuple(sorted({b.size for b in self.backbones}))
    self.models = [load_backbone(b.name, b.size, pooling, b.weights) for b in self.backbones]
    self.dim = sum(get_backbone(b.name).dim for b in self.backbones)
    modes = [get_backbone(b.name).preprocessing for b in self.backbones]
    position = {size: i for i, size in enumerate(self.sizes)}

    @tf.function(input_signature=[tf.TensorSpec([None, s, s, 3], tf.uint8) for s in self.sizes])
    def forward(*images):
      parts = []
      for spec, mode, model in zip(self.backbones, modes, self.models):
        x = preprocess(tf.cast(images[position[spec.size]], tf.float32), mode)
        part = tf.cast(model(x, training=False), tf.float32)
        # Per backbone, so backbones with different feature scales weigh alike in a search.
        parts.append(l2_normalize(part) if normalize == "l2" else part)
      return parts[0] if len(parts) == 1 else tf.concat(parts, axis=1)

    self._forward = forward
    self._frozen = _freeze(forward, self.models)

  def __call__(self, images: dict) -> np.ndarray:
    if self._frozen is not None:
      import tensorflow as tf
      return self._frozen(*[tf.convert_to_tensor(images[s]) for s in self.sizes])[0].numpy()
    return self._forward(*[images[s] for s in self.sizes]).numpy()


# Freezing holds the weights in graph protos many times over (RSS grows by ~20x the weights'
# bytes: +190 MB for MobileNetV2's 8.6 MiB, +1.8 GB for ResNet50's 90 MiB): worth it for the
# small backbones, where folding gains most, not for ResNet50's ~10%.
_FREEZE_MAX_WEIGHT_BYTES = 16 << 20


def _freeze(forward, models):
  """`forward` with the weights as constants, or None where that gains nothing, costs too much
  memory, or fails.

  With constant weights Grappler folds each inference-mode BatchNormalization into the
  convolution before it, which it cannot do through variables: on CPU, MobileNetV2 needs ~25%
  less time per image, EfficientNetB0 ~20% (relative L2 change ~3e-7; benchmarks/README.md).
  Backbones without BatchNormalization (VGG, ConvNeXt) gain nothing and would only pay the
  freeze at start-up.
  """
  import keras
  if not any(isinstance(layer, keras.layers.BatchNormalization) for m in models for layer in m.layers):
    return None
  size = sum(int(np.prod(w.shape)) * np.dtype(w.dtype).itemsize for m in models for w in m.weights)
  if size > _FREEZE_MAX_WEIGHT_BYTES:
    return None
  try:
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2
    return convert_variables_to_constants_v2(forward.get_concrete_function())
  except Exception as e:  # an internal API; the variables' graph computes the same
    _LOG.warning("running the model with variables, could not freeze its weights: %s", e)
    return None


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


@dataclasses.dataclass
class Loaded:
  uri: str
  sha256: Optional[str] = None
  image: Optional[decode.DecodedImage] = None
  error: Optional[dict] = None
  carried: bool = False  # bytes unchanged since the previous run: its row is reused
  info: Optional[dict] = None  # the item's extra columns, previous digest, duplicates


class _Clock:
  """When this file's decode started; read by the waiter to enforce --decode-timeout."""
  __slots__ = ("decode_started",)

  def __init__(self):
    self.decode_started = None


def load_file(uri, config, clock=None, previous_sha256=None, decode_slots=None) -> Loaded:
  """Read + hash + decode one file; every failure becomes an error row, never an exception.

  A file whose digest equals `previous_sha256` is not decoded: the previous run's row stands.
  """
  try:
    data = read_bytes(uri)
  except Exception as e:  # vanished, unreadable, permission: the file's own fault
    return Loaded(uri, error=error_row(uri, "read", type(e).__name__, f"could not read file: {e}"))
  digest = sha256_hex(data)
  if previous_sha256 is not None and digest == previous_sha256:
    return Loaded(uri, digest, carried=True)
  # --decode-threads bounds decodes in flight (and so decoded images in memory), however many
  # reads are; the timeout clock starts once a slot is held.
  with decode_slots or contextlib.nullcontext():
    if clock is not None:
      clock.decode_started = time.monotonic()
    try:
      image = decode.decode_and_resize(
          data, config.sizes, resize=config.resize, max_pixels=config.max_pixels, fast=config.fast_decode)
    except decode.DecodeError as e:
      return Loaded(uri, digest, error=error_row(uri, "decode", e.error_type, str(e)))
    except Exception as e:  # decode_and_resize maps bad data itself; this is a last guard
      return Loaded(uri, digest, error=error_row(uri, "decode", type(e).__name__, str(e)))
  return Loaded(uri, digest, image=image)


def item_parts(element):
  """An element is a path, or (path, info) with info's optional keys `columns` (extra output
  columns), `previous_sha256` (the previous run's digest) and `duplicates` ([(path, columns)]
  of files with the same bytes, which get this file's row)."""
  if isinstance(element, str):
    return element, {}
  return element[0], element[1] or {}


def _rows_for(items, embeddings, config):
  """Expands duplicates and lays out extra columns; one table for the batch."""
  uris, shas, widths, heights, index, extra = [], [], [], [], [], {f.name: [] for f in config.extra_fields}
  for i, item in enumerate(items):
    for uri, columns in [(item.uri, item.info.get("columns") or {})] + list(item.info.get("duplicates") or ()):
      uris.append(uri)
      shas.append(item.sha256)
      widths.append(item.image.width)
      heights.append(item.image.height)
      index.append(i)
      for name in extra:
        extra[name].append(columns.get(name))
  if len(index) != len(items):
    embeddings = embeddings[index]
  return rows_to_table(uris, shas, widths, heights, embeddings, extra, config.extra_fields)


class EmbedFilesDoFn(beam.DoFn):
  """Paths in; Arrow tables of embeddings out (main), error rows (tagged `errors`) and the
  paths whose bytes are unchanged since the previous run (tagged `carried`).

  Reading and decoding run in a thread pool ahead of the model, so the CPU
  decodes the next batch while TensorFlow runs this one; only paths cross the
  shuffle into this stage.
  """

  def __init__(self, config):
    self._config = config
    self._shared = shared.Shared()
    self._embedded = Metrics.counter("embed", "num_embedded")
    self._carried = Metrics.counter("embed", "num_carried_over")
    self._inferences = Metrics.counter("embed", "num_inferences")
    self._failed = {s: Metrics.counter("embed", f"num_failed_{s}") for s in ("read", "decode", "embed")}
    self._latency = Metrics.distribution("embed", "inference_batch_latency_micro_secs")

  def setup(self):
    config = self._config
    self._model = None  # built at the first batch to embed: a refresh may need none
    self._executor = self._new_executor()
    self._decode_slots = threading.Semaphore(config.decode_threads)
    # Our header check (--max-pixels, before decoding) is the one limit: Pillow's own refusal
    # at twice its default would otherwise cap --max-pixels and warn below it.
    from PIL import Image
    Image.MAX_IMAGE_PIXELS = None
    self._max_batch = config.batch_size
    self._progress = None
    if config.progress:
      from transforms.progress import progress_bar
      self._progress = progress_bar("embedded")

  def _fused_model(self):
    if self._model is None:
      config = self._config
      key = repr((config.backbones, config.pooling, config.allow_tf32, config.mixed_precision,
                  config.normalize))
      self._model = self._shared.acquire(
          lambda: FusedModel(config.backbones, config.pooling, config.allow_tf32, config.mixed_precision,
                             config.normalize),
          tag=key)
    return self._model

  def _new_executor(self):
    config = self._config
    return concurrent.futures.ThreadPoolExecutor(
        max_workers=max(config.read_threads, config.decode_threads), thread_name_prefix="read-decode")

  def _submit(self, uri, info, clock):
    return self._executor.submit(
        load_file, uri, self._config, clock, info.get("previous_sha256"), self._decode_slots)

  def start_bundle(self):
    self._pending = collections.deque()

  def process(self, element):
    uri, info = item_parts(element)
    clock = _Clock()
    self._pending.append((uri, info, clock, self._submit(uri, info, clock)))
    # Keep one batch decoding in the pool while the model runs the one before it.
    while len(self._pending) >= 2 * self._config.batch_size:
      yield from self._embed_next_batch()

  def finish_bundle(self):
    while self._pending:
      for output in self._embed_next_batch():
        if isinstance(output, beam.pvalue.TaggedOutput):
          yield beam.pvalue.TaggedOutput(output.tag, window.GlobalWindows.windowed_value(output.value))
        else:
          yield window.GlobalWindows.windowed_value(output)

  def teardown(self):
    executor = getattr(self, "_executor", None)
    if executor is not None:
      executor.shutdown(wait=False, cancel_futures=True)

  def _wait(self, uri, clock, future) -> Loaded:
    timeout = self._config.decode_timeout
    while True:
      try:
        return future.result(timeout=min(timeout, 1.0))
      except concurrent.futures.TimeoutError:
        started = clock.decode_started
        if started is not None and time.monotonic() - started > timeout:
          # The stuck thread can't be killed; leave it to finish in the old pool
          # and give the rest of the run a fresh one.
          self._executor.shutdown(wait=False)
          self._executor = self._new_executor()
          # The stuck decode keeps its slot in the old semaphore; new work gets a full set.
          self._decode_slots = threading.Semaphore(self._config.decode_threads)
          self._resubmit_pending()
          return Loaded(uri, error=error_row(
              uri, "decode", "decode_timeout",
              f"decoding took longer than --decode-timeout={timeout:g}s; skipped"))

  def _resubmit_pending(self):
    # Work queued in the abandoned pool would never run: hand it to the new one.
    pending = collections.deque()
    for uri, info, clock, future in self._pending:
      if future.cancel():
        future = self._submit(uri, info, clock)
      pending.append((uri, info, clock, future))
    self._pending = pending

  def _failures(self, uri, info, error):
    for path in [uri] + [dup for dup, _ in info.get("duplicates") or ()]:
      self._failed[error["stage"]].inc()
      yield beam.pvalue.TaggedOutput(ERRORS_TAG, dict(error, uri=path))

  def _embed_next_batch(self):
    config = self._config
    loaded = []
    while self._pending and len(loaded) < config.batch_size:
      uri, info, clock, future = self._pending.popleft()
      item = self._wait(uri, clock, future)
      item.info = info
      if item.error is not None:
        yield from self._failures(uri, info, item.error)
      elif item.carried:
        for path, columns in [(uri, info.get("columns"))] + list(info.get("duplicates") or ()):
          self._carried.inc()
          yield beam.pvalue.TaggedOutput(CARRIED_TAG, (item.sha256, (path, columns or {})))
      else:
        loaded.append(item)
    if not loaded:
      return
    images = {s: np.stack([item.image.arrays[s] for item in loaded]) for s in config.sizes}
    started = time.perf_counter()
    embeddings, ok, failures, self._max_batch = embed_robust(self._fused_model(), images, self._max_batch)
    self._latency.update(int((time.perf_counter() - started) * 1e6))
    self._inferences.inc(len(ok))
    for index, error in failures:
      item = loaded[index]
      yield from self._failures(item.uri, item.info, error_row(
          item.uri, "embed", type(error).__name__, str(error).splitlines()[0][:500]))
    if ok:
      table = _rows_for([loaded[i] for i in ok], embeddings, config)
      self._embedded.inc(table.num_rows)
      if self._progress is not None:
        self._progress.update(table.num_rows)
      yield table


class ReadDecodeEmbed(beam.PTransform):
  """The one stage that runs on accelerator workers: paths in, embeddings and errors out."""

  def __init__(self, config):
    super().__init__()
    self._config = config

  def expand(self, paths):
    return paths | "EmbedFiles" >> beam.ParDo(EmbedFilesDoFn(self._config)).with_outputs(
        ERRORS_TAG, CARRIED_TAG, main="embeddings")
