"""Embed stage: one fused Keras model per worker process, and the DoFn that reads, decodes and embeds files."""

import collections
import concurrent.futures
import dataclasses
import functools
import logging
import os
import time
from typing import Optional

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.metrics import Metrics
from apache_beam.transforms import window
from apache_beam.utils import shared

from transforms import checkpoint, decode, decode_pool, fused, shards
from transforms.decode_pool import DecodeProcessError
from transforms.item import Item
from transforms.read import read_bytes, sha256_hex
from transforms.store import StoreUnavailable
from transforms.write import error_row, package_versions, rows_to_table

_LOG = logging.getLogger(__name__)
ERRORS_TAG = "errors"
CARRIED_TAG = "carried"
RESUMED_TAG = "resumed"
WORKER_STATS_TAG = "worker_stats"
# Files a read-ahead task reads and sends to a decode process at once. Per file, a task and a
# decode round trip cost the worker's GIL ~0.1 ms, the model's thread's time with a small model;
# per 8 files, an eighth of that. A batch of 32 still spans four tasks, so two decode processes
# stay busy while the model runs.
DECODE_GROUP = 8
# Per shard (or slice of one): (path, inputs it held (images and a damage row): `matched`, how many
# of them --previous has rows for).
SHARD_COUNT_TAG = "shard_count"


@dataclasses.dataclass
class Loaded:
  uri: str
  sha256: Optional[str] = None
  image: Optional[decode.DecodedImage] = None
  error: Optional[dict] = None
  carried: bool = False  # bytes unchanged since the previous run: its row is reused
  resumed: bool = False  # bytes unchanged since an interrupted run of this output committed its row


def decode_in_process(data, spec: decode.DecodeSpec) -> decode.DecodedImage:
  """`decode_and_resize` in this process, without isolation: for trusted files and tests."""
  return decode.decode_and_resize(data, spec.sizes, resize=spec.resize, max_pixels=spec.max_pixels,
                                  fast=spec.fast, option_names=dict(spec.option_names))


def load_file(uri, spec: decode.DecodeSpec, decoder=decode_in_process, previous_sha256=None,
              resume_sha256=None, data=None, source=None) -> Loaded:
  """Read + hash + decode one file; every failure becomes an error row, never an exception.

  `decoder(data, spec)` is `DecodePool.decode` in a run. A file whose digest equals
  `resume_sha256` (a row an interrupted run committed) or `previous_sha256` (the previous run's
  row) is not decoded: that row stands. `data`: the bytes, already read (a shard's member);
  `source`: where to read them when that is not `uri` (a Parquet row's image path).
  """
  loaded, data = _read_and_hash(uri, previous_sha256, resume_sha256, data, source)
  if loaded.sha256 is None or loaded.error is not None or loaded.resumed or loaded.carried:
    return loaded
  try:
    image = decoder(data, spec)
  except Exception as e:  # mapped as load_files maps the results of DecodePool.decode_many
    image = e
  return _decoded(loaded, image)


def load_files(requests, decode_many=None) -> list:
  """`load_file(*request)` for each request, in order, with the decodes of those whose decoder is
  `decode_many`'s pool's `decode` made in one `decode_many` call (one round trip)."""
  pool = getattr(decode_many, "__self__", None)
  batched = [pool is not None and len(r) > 2 and r[2] == pool.decode for r in requests]
  if not any(batched):
    return [load_file(*request) for request in requests]
  results, pending = [], []
  for request, in_batch in zip(requests, batched):
    if not in_batch:
      results.append(load_file(*request))
      continue
    uri, spec, _, *rest = request
    loaded, data = _read_and_hash(uri, *rest)
    results.append(loaded)
    if loaded.sha256 is not None and loaded.error is None and not (loaded.resumed or loaded.carried):
      pending.append((len(results) - 1, data, spec))
  specs = {spec for _, _, spec in pending}
  for spec in specs:
    group = [(i, data) for i, data, s in pending if s == spec]
    for (i, _), image in zip(group, decode_many([data for _, data in group], spec)):
      results[i] = _decoded(results[i], image)
  return results


def _read_and_hash(uri, previous_sha256=None, resume_sha256=None, data=None, source=None):
  """(Loaded, the bytes): the Loaded is final when it holds an error or reuses a row."""
  if data is None:
    try:
      data = read_bytes(source or uri)
    except StoreUnavailable:
      raise  # the store's fault, not the file's: the run stops, and --resume reads it again
    except Exception as e:  # vanished, unreadable, permission: the file's own fault
      return Loaded(uri, error=error_row(uri, "read", type(e).__name__, f"could not read file: {e}")), None
  digest = sha256_hex(data)
  if resume_sha256 is not None and digest == resume_sha256:
    return Loaded(uri, digest, resumed=True), None
  if previous_sha256 is not None and digest == previous_sha256:
    return Loaded(uri, digest, carried=True), None
  return Loaded(uri, digest), data


def _decoded(loaded: Loaded, image) -> Loaded:
  """`loaded` with its image, or with a decode error row where `image` is an exception."""
  uri, digest = loaded.uri, loaded.sha256
  if isinstance(image, (decode.DecodeError, DecodeProcessError)):
    return Loaded(uri, digest, error=error_row(uri, "decode", image.error_type, str(image)))
  if isinstance(image, BaseException):  # decode_and_resize maps bad data itself; this is a last guard
    return Loaded(uri, digest, error=error_row(uri, "decode", type(image).__name__, str(image)))
  return Loaded(uri, digest, image=image)


class ReadAhead:
  """Loads items in `executor` ahead of their use and hands them back in submission order.

  The model runs on one batch while the executor's threads read and decode the next ones. Every
  limit on a single file (its decode's memory and time) is enforced inside `load`, so waiting
  for the oldest item always ends.

  With `load_group` (a list of `submit`'s argument tuples -> a list of results), items go to the
  executor `group` at a time, as one task: a thread hand-off and a decode round trip per group
  rather than per file. A group not yet full is sent when its oldest item is wanted.
  """

  def __init__(self, load, executor, load_group=None, group=1):
    self._load = load
    self._load_group = load_group
    self._group = group if load_group is not None else 1
    self._executor = executor
    self._pending = collections.deque()  # (item, future, index in its group's results or None)
    self._unsent = []

  def submit(self, item, *args):
    if self._group <= 1:
      self._pending.append((item, self._executor.submit(self._load, *args), None))
      return
    self._unsent.append((item, args))
    if len(self._unsent) >= self._group:
      self._send()

  def _send(self):
    future = self._executor.submit(self._load_group, [args for _, args in self._unsent])
    self._pending.extend((item, future, i) for i, (item, _) in enumerate(self._unsent))
    self._unsent = []

  def __len__(self):
    return len(self._pending) + len(self._unsent)

  def next(self):
    """(item, what `load` returned for it) of the oldest submission."""
    if not self._pending:
      self._send()
    item, future, index = self._pending.popleft()
    return item, future.result() if index is None else future.result()[index]


def _rows_for(batch, embeddings, config):
  """(Item, Loaded) pairs and their embeddings -> one table (duplicates expanded, extra columns laid
  out) and each row's listing [(size, mtime)], which checkpoints record."""
  uris, shas, widths, heights, index, extra = [], [], [], [], [], {f.name: [] for f in config.extra_fields}
  listing = []
  for i, (item, loaded) in enumerate(batch):
    for each in item.items():
      uri, columns = each.uri, each.columns
      listing.append((each.size, each.mtime))
      uris.append(uri)
      shas.append(loaded.sha256)
      widths.append(loaded.image.width)
      heights.append(loaded.image.height)
      index.append(i)
      for name in extra:
        extra[name].append(columns.get(name))
  if len(index) != len(batch):
    embeddings = embeddings[index]
  return rows_to_table(uris, shas, widths, heights, embeddings, extra, config.extra_fields), listing


class EmbedFilesDoFn(beam.DoFn):
  """Items in; Arrow tables of embeddings out (main), error rows (tagged `errors`), the paths
  whose bytes are unchanged since the previous run (tagged `carried`), and per bundle the decode
  processes' state and the worker's package versions (tagged `worker_stats`).

  Reads run in a thread pool ahead of the model; decodes run in this process's decode pool
  (transforms/decode_pool.py), so the CPU decodes the next batch while TensorFlow runs this one
  and no file can take the worker down. Only paths cross the shuffle into this stage: a shard's
  path too, whose images are streamed here (transforms/shards.py), a member at a time as the
  read-ahead has room, each one item `SHARD#KEY`; per shard, its count is tagged `shard_count`.
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
    # 0: this worker's own cores, counted here rather than on the machine that launched the job.
    processes = config.decode_threads or worker_cores()
    self._spec = config.decode_spec
    self._versions = package_versions()
    self._decoders = decode_pool.acquire_pool(processes, self._spec.memory)
    self._executor = concurrent.futures.ThreadPoolExecutor(
        max_workers=max(config.read_threads, processes), thread_name_prefix="read-decode")
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
          lambda: fused.FusedModel(config.backbones, config.pooling, config.allow_tf32, config.mixed_precision,
                             config.normalize),
          tag=key)
    return self._model

  def start_bundle(self):
    self._ahead = ReadAhead(load_file, self._executor,
                            functools.partial(load_files, decode_many=self._decoders.decode_many), DECODE_GROUP)
    self._checkpoints = None
    if self._config.checkpoint_every:
      self._checkpoints = checkpoint.CheckpointWriter(
          self._config.output, f"{int(self._config.started_at * 1000):x}", self._config.checkpoint_every)
    self._first = True

  def process(self, item: Item):
    if self._first and self._checkpoints is not None:
      self._checkpoints.start_bundle(item.uri)  # names a retry of this bundle repeats
    self._first = False
    if item.shard_format is not None:
      yield from self._process_shard(item)
      return
    self._ahead.submit(item, item.uri, self._spec, self._decoders.decode, item.previous_sha256,
                       item.resume_sha256)
    yield from self._embed_while_full()

  def _embed_while_full(self):
    # Keep one batch decoding while the model runs the one before it; no more: a shard's members
    # wait in the shard, not in memory.
    while len(self._ahead) >= 2 * self._config.batch_size:
      yield from self._embed_next_batch()

  def _process_shard(self, shard: Item):
    found = previous_seen = 0
    for member, uri, columns in shards.shard_images(shard, self._config.shard_layouts, self._config.extra_fields):
      found += 1
      if uri is None:  # the shard itself: unopenable, or damaged past this point
        yield from self._failures(shard.replace(duplicates=()), member.error)
        continue
      previous_seen += uri in shard.previous_members
      if uri in shard.skip_members:  # --dedupe: another input with the same bytes makes its row
        continue
      item = Item(uri, columns=columns, duplicates=shard.member_duplicates.get(uri, ()))
      if member.error is not None:
        yield from self._failures(item, member.error)
        continue
      self._ahead.submit(item, item.uri, self._spec, self._decoders.decode, shard.previous_members.get(uri),
                         shard.resume_members.get(uri), member.data, member.source)
      yield from self._embed_while_full()
    # What the shard (or this slice of it) held, and how many of --previous's rows of it were found:
    # the rest were removed from it.
    yield beam.pvalue.TaggedOutput(SHARD_COUNT_TAG, (shard.uri, found, previous_seen))

  def finish_bundle(self):
    while len(self._ahead):
      for output in self._embed_next_batch():
        yield _in_global_window(output)
    if self._checkpoints is not None:
      self._checkpoints.commit()
    stats = {"peak_rss": self._decoders.peak_rss(), "started": self._decoders.started,
             "replaced": self._decoders.replaced, "versions": self._versions,
             "own_peak_rss": decode_pool.own_peak_rss()}
    yield _in_global_window(beam.pvalue.TaggedOutput(WORKER_STATS_TAG, (os.getpid(), stats)))

  def teardown(self):
    executor = getattr(self, "_executor", None)
    if executor is not None:
      executor.shutdown(wait=False, cancel_futures=True)
    decoders = getattr(self, "_decoders", None)
    if decoders is not None:
      decode_pool.release_pool(decoders)

  def _failures(self, item, error, sha256=None):
    committed = []
    for each in item.items():
      self._failed[error["stage"]].inc()
      row = dict(error, uri=each.uri)
      yield beam.pvalue.TaggedOutput(ERRORS_TAG, row)
      if sha256 is not None:  # read errors have none, and are retried by a resume
        committed.append(dict(row, sha256=sha256, size=each.size, mtime=each.mtime))
    if committed and self._checkpoints is not None:
      self._checkpoints.add(None, committed)

  def _embed_next_batch(self):
    config = self._config
    loaded = []
    while len(self._ahead) and len(loaded) < config.batch_size:
      item, result = self._ahead.next()
      if result.error is not None:
        yield from self._failures(item, result.error, result.sha256)
      elif result.resumed:
        for uri, columns in item.rows():
          yield beam.pvalue.TaggedOutput(RESUMED_TAG, (result.sha256, (uri, columns)))
      elif result.carried:
        for uri, columns in item.rows():
          self._carried.inc()
          yield beam.pvalue.TaggedOutput(CARRIED_TAG, (result.sha256, (uri, columns)))
      else:
        loaded.append((item, result))
    if not loaded:
      return
    images = {s: np.stack([result.image.arrays[s] for _, result in loaded]) for s in config.sizes}
    started = time.perf_counter()
    embeddings, ok, failures, self._max_batch = fused.embed_robust(self._fused_model(), images, self._max_batch)
    self._latency.update(int((time.perf_counter() - started) * 1e6))
    self._inferences.inc(len(ok))
    for index, error in failures:
      item, result = loaded[index]
      yield from self._failures(item, error_row(
          item.uri, "embed", type(error).__name__, str(error).splitlines()[0][:500]), result.sha256)
    if ok:
      table, listing = _rows_for([loaded[i] for i in ok], embeddings, config)
      if self._checkpoints is not None:
        sizes, mtimes = zip(*listing)
        self._checkpoints.add(table.append_column(checkpoint.LISTING_FIELDS[0], pa.array(sizes, pa.int64()))
                              .append_column(checkpoint.LISTING_FIELDS[1], pa.array(mtimes, pa.float64())))
      self._embedded.inc(table.num_rows)
      if self._progress is not None:
        self._progress.update(table.num_rows)
      yield table


def _in_global_window(output):
  if isinstance(output, beam.pvalue.TaggedOutput):
    return beam.pvalue.TaggedOutput(output.tag, window.GlobalWindows.windowed_value(output.value))
  return window.GlobalWindows.windowed_value(output)


def worker_cores() -> int:
  """CPU cores this process may run on (a container's or taskset's limit, not the host's)."""
  try:
    return len(os.sched_getaffinity(0))
  except (AttributeError, OSError):
    return os.cpu_count() or 1


class ReadDecodeEmbed(beam.PTransform):
  """The one stage that runs on accelerator workers: paths in, embeddings and errors out."""

  def __init__(self, config):
    super().__init__()
    self._config = config

  def expand(self, paths):
    return paths | "EmbedFiles" >> beam.ParDo(EmbedFilesDoFn(self._config)).with_outputs(
        ERRORS_TAG, CARRIED_TAG, RESUMED_TAG, WORKER_STATS_TAG, SHARD_COUNT_TAG, main="embeddings")
