"""The library's transform: `EmbedImages`, images in (uris or bytes, keyed or not), one vector each out, in their own windows."""

import concurrent.futures
import copy
import dataclasses
import logging
import os
import threading
import time
from typing import Any, Callable, Optional

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.utils import shared
from apache_beam.utils.windowed_value import WindowedValue

from transforms import decode, decode_pool, fused, openvino_engine
from transforms.load import LoadRequest, Loader, ReadAhead
from transforms.results import Embedding, EmbeddingBatch, ImageError, ImageFailed, Reused
from transforms.specs import ModelSpec, model_layout, resolve_backbones
from transforms.write import error_row

_LOG = logging.getLogger(__name__)
MAIN_TAG, ERRORS_TAG, REUSED_TAG = "embeddings", "errors", "reused"
# Files a read-ahead task reads and sends to a decode process at once. Per file, a task and a
# decode round trip cost the worker's GIL ~0.1 ms, the model's thread's time with a small model;
# per 8 files, an eighth of that. A batch of 32 still spans four tasks, so two decode processes
# stay busy while the model runs.
DECODE_GROUP = 8
METRICS_NAMESPACE = "embed"


def worker_cores() -> int:
  """CPU cores this process may run on (a container's or taskset's limit, not the host's)."""
  try:
    return len(os.sched_getaffinity(0))
  except (AttributeError, OSError):
    return os.cpu_count() or 1


def _check(argument, value, ok, want):
  if not ok:
    raise ValueError(f"`{argument}` must be {want}; received: {value!r}")


class EmbedImages(beam.PTransform):
  """Images in, one `Embedding` each out: the pooled features of frozen Keras backbones, concatenated.

  Elements are a uri `str` (local, gs://, any Beam filesystem), encoded image `bytes`, or a
  `(key, str | bytes)` pair, which comes out as `(key, Embedding)`. Every output keeps its input's
  window and timestamp.

      embed = EmbedImages(["vgg16", "inception_v3", "resnet50"], weights="imagenet")
      main, errors = uris | embed.with_exception_handling()

  Keyword arguments mean what the command-line options of the same names mean (README.md):
  `weights` imagenet | random | a directory; `pooling` avg | max; `image_size` one square size for
  all (None: each backbone's own); `resize` squash | center-crop | pad; `models` {NAME: path of a
  .keras file, a SavedModel or a KerasHub preset directory} that `backbones` may then name, with
  `model_preprocessing` {NAME: mode}, `model_outputs` {NAME: output key}, `unsafe_models` (names
  whose Lambda layers may load) and `model_modules` (imported first: they register custom
  objects); `normalize` none | l2; `engine` tensorflow | openvino (OpenVINO's CPU plugin, f32;
  `mixed_precision` is bf16 there) | auto (openvino on workers without a GPU where it is
  installed). `backbones` may also name KerasHub presets, `hub:PRESET[:cls|:mean]` (and a preset
  directory's NAME[:cls|:mean]): each takes the full decoded image through its own
  ImageConverter (transforms/hub.py), on TensorFlow whatever the engine.

  Decoding runs in isolated processes (`decode_processes`, 0: one per core) under a memory
  ceiling (`decode_memory` bytes; None: what `max_pixels` needs) and a timeout
  (`decode_timeout` seconds): a hostile file costs its own error and nothing else. Batches hold
  at most `batch_size` images and are sent when full, when the oldest image in them has waited
  `max_batch_duration_secs` (checked as elements arrive), and at the end of every bundle.

  `known_digests(key)`, for keyed input, gives sha256 digests of rows already made for that key:
  an image whose bytes hash to one is not decoded, and comes out as `(key, Reused(sha256))` on the
  `reused` output of `with_outputs()`.

  `shared_model` is the `apache_beam.utils.shared.Shared` handle the model is acquired through on
  the worker (None: a fresh one); a caller that starts the build ahead (`BuildAhead`) in the
  process the DoFn will run in passes the same handle.
  """

  def __init__(self, backbones, *, weights="imagenet", pooling="avg", image_size=None, resize="squash",
               batch_size=32, models=None, model_preprocessing=None, model_outputs=None, unsafe_models=(),
               model_modules=(), normalize="none", fast_decode=False, max_pixels=decode.PIL_MAX_PIXELS,
               decode_timeout=60.0, decode_memory=None, decode_processes=0, read_threads=16,
               max_batch_duration_secs=None, allow_tf32=False, mixed_precision=False, engine="tensorflow",
               known_digests: Optional[Callable[[Any], tuple]] = None, option_names=(),
               shared_model: Optional[shared.Shared] = None, clock: Callable[[], float] = time.monotonic):
    super().__init__()
    _check("pooling", pooling, pooling in ("avg", "max"), "avg or max")
    _check("resize", resize, resize in decode.RESIZE_POLICIES, " or ".join(decode.RESIZE_POLICIES))
    _check("normalize", normalize, normalize in ("none", "l2"), "none or l2")
    _check("batch_size", batch_size, isinstance(batch_size, int) and batch_size >= 1, "a positive integer")
    _check("read_threads", read_threads, isinstance(read_threads, int) and read_threads >= 1, "a positive integer")
    _check("decode_processes", decode_processes, isinstance(decode_processes, int) and decode_processes >= 0,
           "0 (one per core) or a positive integer")
    _check("decode_timeout", decode_timeout, isinstance(decode_timeout, (int, float)) and decode_timeout > 0,
           "a positive number of seconds")
    _check("max_batch_duration_secs", max_batch_duration_secs,
           max_batch_duration_secs is None or (isinstance(max_batch_duration_secs, (int, float))
                                               and max_batch_duration_secs >= 0), "None or seconds")
    openvino_engine.check_engine(engine)
    specs = resolve_backbones(backbones, weights=weights, image_size=image_size, pooling=pooling, models=models,
                              model_preprocessing=model_preprocessing, model_outputs=model_outputs,
                              unsafe_models=unsafe_models, modules=tuple(model_modules))
    self.model = ModelSpec(specs, pooling, normalize, bool(allow_tf32), bool(mixed_precision), engine)
    if decode_memory is None:
      decode_memory = decode_pool.default_memory_ceiling(max_pixels)
    self.decode_spec = decode.DecodeSpec(
        sizes=self.model.sizes, resize=resize, max_pixels=max_pixels or None, fast=bool(fast_decode),
        timeout=float(decode_timeout), memory=decode_memory, option_names=tuple(option_names))
    self.layout = model_layout(self.model, resize, bool(fast_decode))
    self._batch_size = batch_size
    self._max_batch_duration_secs = max_batch_duration_secs
    self._read_threads = read_threads
    self._decode_processes = decode_processes
    self._known_digests = known_digests
    self._clock = clock
    self._shared_model = shared_model or shared.Shared()
    self._outputs = "main"  # main | errors (with_exception_handling) | all (with_outputs) | one
    self._batches = False

  def with_exception_handling(self) -> "EmbedImages":
    """This transform giving `(main, errors)`: bad images as `ImageError`s (keyed as their input)
    instead of failing the pipeline."""
    return self._copy(_outputs="errors")

  def with_outputs(self) -> "EmbedImages":
    """This transform giving a tagged tuple: `embeddings`, `errors` and `reused`."""
    return self._copy(_outputs="all")

  def as_one_output(self) -> "EmbedImages":
    """This transform giving embeddings, `(key, ImageError)`s and `(key, Reused)`s in one
    PCollection: for a step after it that takes them all in the same fused stage (the local
    runner materializes a Flatten, which would cut the stage in two)."""
    return self._copy(_outputs="one")

  def batches(self) -> "EmbedImages":
    """This transform giving `EmbeddingBatch`es (a model batch's rows as columns, per window)
    instead of an `Embedding` per image: for sinks that write columns."""
    return self._copy(_batches=True)

  def _copy(self, **changes):
    clone = copy.copy(self)
    clone.__dict__.update(changes)
    return clone

  def _dofn(self):
    return _EmbedDoFn(self.model, self.decode_spec, self._batch_size, self._max_batch_duration_secs,
                      self._read_threads, self._decode_processes, self._known_digests, self._batches,
                      self._outputs == "main", self._outputs == "one", self._shared_model, self._clock)

  def expand(self, images):
    results = images | "ReadDecodeEmbed" >> beam.ParDo(self._dofn()).with_outputs(
        ERRORS_TAG, REUSED_TAG, main=MAIN_TAG)
    if self._outputs == "all":
      return results
    if self._outputs == "one":
      return results[MAIN_TAG]
    if self._outputs == "errors":
      return results[MAIN_TAG], results[ERRORS_TAG]
    return results[MAIN_TAG]


def acquire_model(handle: shared.Shared, spec: ModelSpec):
  """The model of `spec` through `handle`: built once per process, by the first thread to ask."""
  return handle.acquire(lambda: openvino_engine.build(spec), tag=repr(spec))


class BuildAhead:
  """Builds the model of `spec` in a daemon thread through `handle`, the Shared handle an
  `EmbedImages` in this process acquires it through: started at launch, the build (TensorFlow's
  import, the Keras build, trace and freeze, or OpenVINO's cache read and compile) overlaps the
  job's first stages, and the first batch finds the model made, or waits for it (Shared's acquire
  blocks while another thread constructs the same key) instead of starting a second build.

  `model` holds the built model while the run lasts: Shared keeps only a weak reference. A build
  that raises leaves nothing in the handle: the DoFn builds again and raises the same error where
  it always has, at its first batch."""

  def __init__(self, handle: shared.Shared, spec: ModelSpec):
    self.model = None
    self.error = None
    self._thread = threading.Thread(target=self._build, args=(handle, spec), name="build-model-ahead", daemon=True)
    self._thread.start()

  def _build(self, handle, spec):
    try:
      self.model = acquire_model(handle, spec)
    except Exception as e:  # raised again by the DoFn's own build, if a batch needs the model
      self.error = e

  def join(self):
    self._thread.join()


@dataclasses.dataclass
class _Pending:
  """An input on its way through the stage: what its outputs need (key, window, timestamp)."""
  keyed: bool
  key: Any
  window: Any
  timestamp: Any
  arrived: float


def _request(element, known_digests):
  """(keyed, key, LoadRequest) of an input element."""
  keyed = isinstance(element, tuple) and len(element) == 2
  key, payload = element if keyed else (None, element)
  known = tuple(d for d in known_digests(key) if d) if (known_digests and keyed) else ()
  if isinstance(payload, str):
    return keyed, key, LoadRequest(payload, known=known)
  if isinstance(payload, (bytes, bytearray, memoryview)):
    return keyed, key, LoadRequest(None, data=bytes(payload), known=known)
  if isinstance(payload, LoadRequest):
    return keyed, key, dataclasses.replace(payload, known=payload.known or known)
  raise TypeError(f"EmbedImages takes a uri str, image bytes or a (key, str | bytes) pair; received: "
                  f"{type(element).__name__}" + (f" of ({type(key).__name__}, {type(payload).__name__})" if keyed else ""))


class _EmbedDoFn(beam.DoFn):
  """Reads and decodes ahead (threads, isolated decode processes) while the model runs, batches
  across windows, and emits each input in its own window at its own timestamp."""

  def __init__(self, model: ModelSpec, spec, batch_size, max_batch_duration_secs, read_threads, decode_processes,
               known_digests, as_batches, raise_errors, one_output, shared_model, clock):
    self._model_spec, self._spec = model, spec
    self._batch_size, self._max_wait = batch_size, max_batch_duration_secs
    self._read_threads, self._decode_processes = read_threads, decode_processes
    self._known_digests, self._as_batches, self._raise_errors = known_digests, as_batches, raise_errors
    self._clock = clock
    self._tags = {ERRORS_TAG: None, REUSED_TAG: None} if one_output else {ERRORS_TAG: ERRORS_TAG, REUSED_TAG: REUSED_TAG}
    self._shared = shared_model
    self._embedded = Metrics.counter(METRICS_NAMESPACE, "num_embedded")
    self._inferences = Metrics.counter(METRICS_NAMESPACE, "num_inferences")
    self._failed = {s: Metrics.counter(METRICS_NAMESPACE, f"num_failed_{s}") for s in ("read", "decode", "embed")}
    self._latency = Metrics.distribution(METRICS_NAMESPACE, "inference_batch_latency_micro_secs")
    self._batch_sizes = Metrics.distribution(METRICS_NAMESPACE, "inference_request_batch_size")
    self._load_latency = Metrics.distribution(METRICS_NAMESPACE, "load_model_latency_milli_secs")

  def setup(self):
    processes = self._decode_processes or worker_cores()  # counted on the worker, not the launcher
    self._decoders = decode_pool.PoolWhenNeeded(processes, self._spec.memory)
    self._loader = Loader(self._decoders, self._spec)
    self._executor = concurrent.futures.ThreadPoolExecutor(
        max_workers=max(self._read_threads, processes), thread_name_prefix="read-decode")
    self._model = None  # built at the first batch to embed: a run that reuses every row needs none
    self._max_batch = self._batch_size

  def start_bundle(self):
    self._ahead = ReadAhead(self._loader.load_many, self._executor, DECODE_GROUP)
    self._ready = []  # (_Pending, Loaded) decoded, waiting for the model

  def process(self, element, window=beam.DoFn.WindowParam, timestamp=beam.DoFn.TimestampParam):
    keyed, key, request = _request(element, self._known_digests)
    self._ahead.submit(_Pending(keyed, key, window, timestamp, self._clock()), request)
    yield from self._drain(everything=self._waited_too_long())

  def finish_bundle(self):
    yield from self._drain(everything=True)

  def teardown(self):
    executor = getattr(self, "_executor", None)
    if executor is not None:
      executor.shutdown(wait=False, cancel_futures=True)
    decoders = getattr(self, "_decoders", None)
    if decoders is not None:
      decoders.release()

  def _waited_too_long(self) -> bool:
    if self._max_wait is None:
      return False
    oldest = self._ready[0][0] if self._ready else self._ahead.oldest()
    return oldest is not None and self._clock() - oldest.arrived >= self._max_wait

  def _drain(self, everything):
    # Keep one batch loading while the model runs the one before it; no more: the inputs still to
    # come wait upstream (a shard's images in the shard), not in memory.
    while len(self._ahead) >= 2 * self._batch_size or (everything and len(self._ahead)):
      pending, loaded = self._ahead.next()
      if loaded.error is not None:
        yield from self._error(pending, loaded.error, loaded.sha256)
      elif loaded.reused:
        yield self._output(pending, (pending.key, Reused(loaded.sha256)), self._tags[REUSED_TAG], keyed=False)
      else:
        self._ready.append((pending, loaded))
        if len(self._ready) >= self._batch_size:
          yield from self._embed()
    if everything and self._ready:
      yield from self._embed()

  def _fused_model(self):
    if self._model is None:
      spec = self._model_spec
      started = time.perf_counter()
      # The engine is in the spec, so in the key: two engines' models are two shared models. A
      # BuildAhead of the same handle and spec still building: Shared waits for it.
      self._model = acquire_model(self._shared, spec)
      self._load_latency.update(int((time.perf_counter() - started) * 1e3))
    return self._model

  def _embed(self):
    ready, self._ready = self._ready, []
    images = {s: fused.batch_images([loaded.image.arrays[s] for _, loaded in ready], s) for s in self._spec.sizes}
    started = time.perf_counter()
    embeddings, ok, failures, self._max_batch = fused.embed_robust(self._fused_model(), images, self._max_batch)
    self._latency.update(int((time.perf_counter() - started) * 1e6))
    self._batch_sizes.update(len(ready))
    self._inferences.inc(len(ok))
    self._embedded.inc(len(ok))
    for index, error in failures:
      pending, loaded = ready[index]
      yield from self._error(pending, error_row(loaded.uri, "embed", type(error).__name__,
                                                str(error).splitlines()[0][:500]), loaded.sha256)
    if not ok:
      return
    if not self._as_batches:
      for row, index in enumerate(ok):
        pending, loaded = ready[index]
        image = loaded.image
        yield self._output(pending, Embedding(loaded.uri, loaded.sha256, image.width, image.height, embeddings[row]))
      return
    # One batch per window: a window's rows must not ride in another's.
    by_window = {}
    for row, index in enumerate(ok):
      by_window.setdefault(ready[index][0].window, []).append((row, index))
    for window, rows in by_window.items():
      picked = [ready[index] for _, index in rows]
      batch = EmbeddingBatch(
          tuple(p.key for p, _ in picked), tuple(l.uri for _, l in picked), tuple(l.sha256 for _, l in picked),
          tuple(l.image.width for _, l in picked), tuple(l.image.height for _, l in picked),
          embeddings[[row for row, _ in rows]] if len(rows) != len(embeddings) else embeddings)
      timestamp = min(p.timestamp for p, _ in picked)
      yield WindowedValue(batch, timestamp, (window,))

  def _error(self, pending, row, sha256=None):
    self._failed[row["stage"]].inc()
    if self._raise_errors:
      name = row["uri"] if row["uri"] is not None else f"the image of key {pending.key!r}"
      raise ImageFailed(f"EmbedImages: {name}: {row['stage']} failed ({row['error_type']}): {row['message']} "
                        "(use .with_exception_handling() to get bad images as errors instead)")
    yield self._output(pending, ImageError.from_row(row, sha256), self._tags[ERRORS_TAG])

  @staticmethod
  def _output(pending, value, tag=None, keyed=None):
    if keyed if keyed is not None else pending.keyed:
      value = (pending.key, value)
    windowed = WindowedValue(value, pending.timestamp, (pending.window,))
    return beam.pvalue.TaggedOutput(tag, windowed) if tag else windowed
