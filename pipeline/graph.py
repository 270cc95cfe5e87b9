"""Assembles the Beam graph: inputs -> (previous run, dedupe) -> reshuffle (many workers) -> read/decode/embed -> Parquet -> summary."""

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.pvalue import AsDict
from apache_beam.transforms.window import GlobalWindows

from transforms.dedupe import DedupeWithShards
from transforms import checkpoint
from transforms.decode_pool import own_peak_rss
from pipeline.config import OPTION_NAMES
from transforms.checkpoint import CommitRows
from transforms.embed import EmbedImages
from transforms.item import Item
from transforms.manifest import ReadManifest, label_item
from transforms.progress import CountProgress
from transforms import reuse
from transforms.listing import ListInputs
from transforms.refresh import previous_error_files, previous_files
from transforms import shards
from transforms.shards import ExpandShards, shard_format
from transforms.write import (ERRORS_SCHEMA, REUSED_PREFIX, ParquetTableSink, embeddings_schema, errors_to_table,
                              number_shards, summarize, write_summary)


def resource_hints(config) -> dict:
  hints = {}
  if config.accelerator:
    hints["accelerator"] = config.accelerator
  if config.embed_min_ram:
    hints["min_ram"] = config.embed_min_ram
  return hints


def reuse_digests(item) -> tuple:
  """The digests of rows already made for an item's bytes: an interrupted run's, the previous run's."""
  return item.digests()


def embed_images(config, shared_model=None) -> EmbedImages:
  """The library's transform as this run's options configure it; `shared_model` as EmbedImages takes it."""
  return EmbedImages(
      config.backbones, pooling=config.pooling, resize=config.resize, batch_size=config.batch_size,
      normalize=config.normalize, fast_decode=config.fast_decode, max_pixels=config.max_pixels,
      decode_timeout=config.decode_timeout, decode_memory=config.decode_memory,
      decode_processes=config.decode_threads, read_threads=config.read_threads, allow_tf32=config.allow_tf32,
      mixed_precision=config.mixed_precision, engine=config.engine, known_digests=reuse_digests,
      option_names=OPTION_NAMES, shared_model=shared_model)


class ReadDecodeEmbed(beam.PTransform):
  """The one stage that runs on accelerator workers: items in; Arrow tables of rows, error rows,
  committed rows to reuse (reuse.Use), shard counts and worker stats out. Shards open into their images, `EmbedImages`
  embeds, and the rows are committed as checkpoints in the same fused stage, so only paths cross
  the shuffle into it and rows are durable as they are made."""

  def __init__(self, config, shared_model=None):
    super().__init__()
    self._config = config
    self._shared_model = shared_model

  def expand(self, items):
    config = self._config
    expanded = items | "ExpandShards" >> beam.ParDo(ExpandShards(config.shard_layouts, config.extra_fields)).with_outputs(
        ExpandShards.ERRORS_TAG, ExpandShards.SHARD_COUNT_TAG, main="images")
    embedded = expanded.images | "EmbedImages" >> embed_images(config, self._shared_model).batches().as_one_output()
    # Under this composite's resource hints too (Beam fuses only steps of the same hints), and
    # straight after the model, with no Flatten between (the local runner would materialize it):
    # the commits run where and when the rows are made.
    commit = beam.ParDo(CommitRows(config.output, config.started_at, config.checkpoint_every, config.extra_fields,
                                   config.progress, config.store_retry_seconds))
    results = embedded | "CommitRows" >> commit.with_outputs(
        CommitRows.ERRORS_TAG, CommitRows.REUSED_TAG, CommitRows.WORKER_STATS_TAG, main="embeddings")
    return {"embeddings": results.embeddings, "errors": results[CommitRows.ERRORS_TAG],
            "shard_errors": expanded[ExpandShards.ERRORS_TAG], "reused": results[CommitRows.REUSED_TAG],
            "worker_stats": results[CommitRows.WORKER_STATS_TAG],
            "shard_count": expanded[ExpandShards.SHARD_COUNT_TAG]}


def _error_rows(item, error):
  for each in item.items():
    yield dict(error.row(), uri=each.uri)


class MatchInputs(beam.PTransform):
  """Every file matched by the --input globs, once, as an Item with what its listing said
  (transforms/listing.py: gs:// generation, size and checksums; local size and mtime_ns), a shard
  (by extension, or `input_format`) flagged with its format."""

  def __init__(self, patterns, input_format=None):
    super().__init__()
    self._patterns = list(patterns)
    self._input_format = input_format

  def expand(self, pbegin):
    # One step per object after the listing, not one per field: each is ~2 µs an object here.
    return (pbegin
            | "List" >> ListInputs(self._patterns)
            | "Item" >> beam.MapTuple(_listed_item, self._input_format))


def _listed_item(uri, listed, input_format=None):
  return Item(uri, listed=listed, shard_format=shard_format(uri, input_format))


_SUMS = ("matched", "embedded", "carried", "resumed", "removed", "deduplicated")


class Tally(beam.CombineFn):
  """Every figure the summary needs, from one combine: on the local runner each CombineGlobally
  and side input of its own is another stage (~0.1 s each here; the summary had nine).
  (name, value) in: the names of _SUMS add their values, "failure" counts its (stage, error_type)
  values, "worker" and "file" list theirs. Out: one dict with every name."""

  def create_accumulator(self):
    return {}

  def add_input(self, tally, element):
    name, value = element
    # As a one-element tally of its own: one way of adding, for inputs and accumulators alike.
    _merge(tally, name, value if name in _SUMS else {value: 1} if name == "failure" else [value])
    return tally

  def merge_accumulators(self, tallies):
    tallies = iter(tallies)
    merged = next(tallies)
    for tally in tallies:
      for name, value in tally.items():
        _merge(merged, name, value)
    return merged

  def extract_output(self, tally):
    out = {name: tally.get(name, 0) for name in _SUMS}
    out["failure"] = sorted(tally.get("failure", {}).items())
    out["worker"] = tally.get("worker", [])
    out["file"] = tally.get("file", [])
    out["copy"] = sorted(tally.get("copy", []))
    return out


def _merge(tally, name, value):
  """Adds the accumulated `value` of `name` into `tally`: a sum, failure counts by kind, or a list."""
  if name in _SUMS:
    tally[name] = tally.get(name, 0) + value
  elif name == "failure":
    counts = tally.setdefault(name, {})
    for kind, n in value.items():
      counts[kind] = counts.get(kind, 0) + n
  else:
    tally.setdefault(name, []).extend(value)


def _tallied(name, value_of=lambda element: element):
  """A step that turns each element into Tally's (name, value)."""
  return beam.Map(lambda element: (name, value_of(element)))


class _CountMatched(beam.DoFn):
  """Items in; Tally's ("matched", n) out, one per bundle, for the items that are files (a shard
  counts as the images its reader finds), and (uri, True) per shard tagged "shards". One step
  per item instead of a filter, a map to (name, 1) per file, and a shard step: per object, on
  the local runner, each step costs ~2 µs and each element into Tally another few. For the command
  line's batch graph: its counts are in the global window."""

  def start_bundle(self):
    self._files = 0

  def process(self, item):
    if item.shard_format is None:
      self._files += 1
    else:
      yield beam.pvalue.TaggedOutput("shards", (item.uri, True))

  def finish_bundle(self):
    yield GlobalWindows.windowed_value(("matched", self._files))


def _write_summary_step(tally, config):
  files = number_shards([f for f in tally["file"] if f is not None], config.output, copies=tally["copy"])
  matched, embedded, workers = tally["matched"], tally["embedded"], tally["worker"]
  carried, removed, resumed, deduplicated = tally["carried"], tally["removed"], tally["resumed"], tally["deduplicated"]
  summary = summarize(
      matched, embedded, tally["failure"], files, layout=config.layout, inputs=config.inputs,
      output=config.output, started_at=config.started_at, max_failure_fraction=config.max_failure_fraction,
      refresh=config.refresh, carried=carried, removed=removed, resumed=resumed,
      decode_processes=_decode_processes(workers),
      worker_versions=_distinct(stats["versions"] for _, stats in workers))
  if config.dedupe:
    summary["counts"]["deduplicated"] = deduplicated
  # Own peaks since exec (VmHWM): ru_maxrss would start at the RSS of whatever forked the process.
  # On the local runner the summary is written by the process that ran everything else.
  summary["peak_rss_bytes"] = {
      "worker_processes_max": max((s.get("own_peak_rss", 0) for _, s in workers), default=0),
      "summary_process": own_peak_rss(),
  }
  path = write_summary(config.output, summary)
  # Only once _SUCCESS.json is there: a run killed before this point can still be resumed, and one
  # killed after it is finished (a later --resume clears what is left).
  checkpoint.clear(config.output)
  return path


def _decode_processes(workers):
  """Per worker process, its last report (counts only grow); summed over processes. The sum of
  every decode process's peak RSS bounds what they ever held at once."""
  last = {}
  for pid, stats in workers:
    if pid not in last or stats["started"] >= last[pid]["started"]:
      last[pid] = stats
  return {
      "worker_processes": len(last),
      "started": sum(s["started"] for s in last.values()),
      "replaced": sum(s["replaced"] for s in last.values()),
      "peak_rss_max_bytes": max((s["peak_rss"]["max"] for s in last.values()), default=0),
      "peak_rss_sum_bytes": sum(s["peak_rss"]["sum"] for s in last.values()),
  }


def _distinct(items):
  found = []
  for item in items:
    if item not in found:
      found.append(item)
  return found


def input_items(p, config):
  """An Item per input: from the --input globs or the manifest, with its extra columns."""
  if config.manifest:
    return p | "ReadManifest" >> ReadManifest(config.manifest, config.manifest_schema)
  # A shard (by extension, or --input-format) stays one item, flagged with its format.
  items = p | "MatchInputs" >> MatchInputs(config.inputs, config.input_format)
  if config.label_from_dir:
    return items | "LabelFromDir" >> beam.Map(label_item)
  return items


def _with_members(items, index, p, config, trust_previous):
  """Shard items with `members` set to their images' Refs (uri `SHARD#KEY`), from `index` ((uri, Ref)
  of committed rows), joined by the shard's path: references, never images, travel with a shard
  into the embed stage. A shard --previous shows unchanged is not read (reuse.attach_members):
  (items, its rows' (file, reuse.Batch of Uses)s, its (shard, found, seen) counts)."""
  files, shard_items = items | "FilesOrShards" >> beam.Partition(lambda item, n: int(bool(item.shard_format)), 2)
  by_shard = index | "RefsByShard" >> beam.FlatMap(reuse.shard_refs)
  groups = {"shards": shard_items | "KeyShard" >> beam.Map(lambda item: (item.uri, item)), "refs": by_shard}
  trusted = trust_previous and bool(config.previous) and config.previous_shard_columns
  if trusted:
    groups["damaged"] = (p | "PreviousErrorFiles" >> beam.Create(previous_error_files(config.previous))
                         | "PreviousErrors" >> beam.FlatMap(reuse.error_uris))
  joined = (groups
            | "JoinMembers" >> beam.CoGroupByKey()
            | "AttachMembers" >> beam.FlatMap(reuse.attach_members, trusted).with_outputs(
                "reused", "shard_count", main="items"))
  return (files, joined.items) | "FilesAndShards" >> beam.Flatten(), joined.reused, joined.shard_count


def _split_parquet(item, rows_per_part):
  """A Parquet shard of many row groups as slices of them, each its own element across the shuffle:
  the workers share one big shard out instead of one of them reading it all."""
  parts = []
  if item.shard_format == "parquet" and rows_per_part:
    parts = shards.parquet_parts(item.uri, rows_per_part)
  if not parts:
    yield item
  for part in parts:
    yield item.replace(row_groups=part)


def _removed_from_shards(previous_rows, shard_counts):
  """Rows of --previous for images of shards still matched that these shards no longer hold."""
  totals = previous_rows | "PreviousPerShard" >> beam.combiners.Count.PerKey()
  seen = shard_counts | "SeenPerShard" >> beam.CombinePerKey(sum)
  return ({"total": totals, "seen": seen}
          | "JoinShardTotals" >> beam.CoGroupByKey()
          | "RemovedPerShard" >> beam.MapTuple(
              lambda _, groups: ("removed", (max(0, sum(groups["total"]) - sum(groups["seen"]))
                                             if list(groups["seen"]) else 0))))


def build_graph(p: beam.Pipeline, config, shared_model=None):
  """The job on `p`; `shared_model`: the Shared handle the embed stage acquires its model through
  (pipeline/main.py builds the model ahead through it), None: a handle of its own."""
  items = input_items(p, config)
  if config.progress:
    items = items | "ProgressMatched" >> beam.Map(CountProgress("matched"))
  # A shard counts as the images found in it, which only its reader knows (added below). The
  # shards' uris: a dict side input, so each previous row's lookup is one hash, however many.
  matched_files, shard_uris = items | "CountMatched" >> beam.ParDo(_CountMatched()).with_outputs(
      "shards", main="matched")

  tallied = [matched_files]  # what the summary counts: Tally's (name, value) pairs
  previous_shard_rows = unread_counts = None
  # Globs whose names can only be images (`*.jpg`): none of the shard steps below, which are ~10
  # stages of their own on the local runner (an unchanged refresh: ~0.1 s of ~4 here).
  with_shards = bool(config.manifest) or shards.may_match_shards(config.inputs, config.input_format)
  committed, buckets = [], reuse.join_buckets(config.fan_out)
  if config.previous:
    committed.append(p | "PreviousIndex" >> reuse.CommittedIndex(
        previous_files(config.previous), reuse.PREVIOUS, buckets))
  if config.resume:
    committed.append(p | "CheckpointIndex" >> reuse.CommittedIndex(
        checkpoint.committed_files(config.output), reuse.RESUME, buckets))
  if committed:
    index = committed[0] if len(committed) == 1 else tuple(committed) | "AllCommitted" >> beam.Flatten()
    # One join by uri, a bucket of uris at a time: a committed row whose listing is this object's is
    # reused unread; the rest are read, and reuse their row if the bytes hash the same
    # (--previous-verify, --resume-verify: all).
    # --dedupe reads and hashes every file anyway, and a new copy of an unchanged file must find
    # that file among the inputs to ride on its row: under it, nothing is trusted unread.
    trust_resume = not (config.resume_verify or config.dedupe)
    trust_previous = not (config.previous_verify or config.dedupe)
    decided = ({"items": items | "ByBucket" >> beam.ParDo(reuse.ByBucket(buckets)), "committed": index}
               | "JoinCommitted" >> beam.CoGroupByKey()
               | "Decide" >> beam.FlatMap(reuse.decide_bucket, trust_resume, trust_previous)
               .with_outputs("reused", "gone", "parts", main="items"))
    items, unread_shards = decided.items, ()  # the images of shards left unread: their rows reused
    if with_shards:
      items, shards_unread, unread_counts = _with_members(items, index, p, config, trust_previous)
      unread_shards = (shards_unread,)
  if config.previous:
    # A shard's images have no item of their own: those of shards still matched are counted against
    # what the shard's reader finds (below); those of shards gone are removed.
    gone = decided.gone
    if with_shards:
      previous_shard_rows = gone | "InShards" >> beam.FlatMap(
          lambda uri, shards_: [(uri.rpartition("#")[0], uri)] if uri.rpartition("#")[0] in shards_ else [],
          AsDict(shard_uris))
      gone = gone | "NotInShards" >> beam.Filter(
          lambda uri, shards_: uri.rpartition("#")[0] not in shards_, AsDict(shard_uris))
    tallied.append(gone | "CountRemoved" >> _tallied("removed", lambda _: 1))

  if config.dedupe:
    items, deduplicated = items | "Dedupe" >> DedupeWithShards(
        config.read_threads, config.shard_layouts, config.extra_fields, config.decode_memory)
    tallied.append(deduplicated | "CountDeduplicated" >> _tallied("deduplicated"))
  if with_shards:
    items = items | "SplitParquetShards" >> beam.FlatMap(_split_parquet, config.parquet_part_rows)

  embed = ReadDecodeEmbed(config, shared_model)
  hints = resource_hints(config)
  if hints:
    # On the composite alone: only paths are shuffled into accelerator workers;
    # listing and writing stay on ordinary ones.
    embed = embed.with_resource_hints(**hints)
  if config.fan_out:
    items = items | "Reshuffle" >> beam.Reshuffle()
  results = items | "ReadDecodeEmbed" >> embed
  embeddings = results["embeddings"]
  # A shard's damage has no digest: never committed (a resume reads the shard again).
  errors = ((results["errors"], results["shard_errors"] | "ShardErrorRows" >> beam.FlatMapTuple(_error_rows))
            | "AllErrors" >> beam.Flatten())
  tallied.append(results["worker_stats"] | "WorkerStats" >> _tallied("worker"))
  shard_counts = results["shard_count"]
  if unread_counts is not None:  # the shards left unread, counted as their reader would have
    shard_counts = (shard_counts, unread_counts) | "WithUnreadShards" >> beam.Flatten()
  tallied.append(shard_counts | "FoundInShards" >> beam.MapTuple(lambda _, found, seen: ("matched", found)))
  if previous_shard_rows is not None:
    tallied.append(_removed_from_shards(
        previous_shard_rows, shard_counts | "PreviousSeen" >> beam.MapTuple(lambda shard, found, seen: (shard, seen))))

  schema = embeddings_schema(config.dim, config.layout, config.extra_fields, listing=True)
  reused_tables = None
  if committed:
    # One Flatten of the three: each level of Flatten is another copy of every Use on the local runner.
    uses = (results["reused"], decided.reused, *unread_shards) | "AllReused" >> beam.Flatten()
    whole = None
    if not config.num_shards and not config.extra_fields:
      # Committed files reused row for row as they are: copied by the summary step, never read
      # (reuse.WholeFiles). A fixed number of shards, or columns of this run's own, rewrite every row.
      # The join's own Uses give their part summaries (decided.parts); the other producers make no exact Use.
      others = [rows | f"NotWhole{i}" >> beam.Map(reuse.not_whole)
                for i, rows in enumerate((results["reused"], *unread_shards))]
      whole = ((decided.parts, *others) | "AllParts" >> beam.Flatten()
               | "WholeFiles" >> reuse.WholeFiles(schema, config.output))
      tallied.append(whole | "CountWhole" >> _tallied("copy"))
    # Counted where they are read back: a second consumer of the Flatten would decode every Batch.
    reused_tables, reused_errors, reused_counts = uses | "FetchRows" >> reuse.FetchRows(config.extra_fields, whole)
    errors = (errors, reused_errors) | "WithReusedErrors" >> beam.Flatten()
    tallied.append(reused_counts)

  tables = embeddings
  if reused_tables is not None and config.num_shards:
    # A fixed number of files groups every row by shard anyway: one sink for all.
    tables = (embeddings, reused_tables) | "WithReused" >> beam.Flatten()
  embedding_files = tables | "WriteEmbeddings" >> beam.io.Write(ParquetTableSink(
      FileSystems.join(config.output, "embeddings"), schema, num_shards=config.num_shards,
      row_group_size=config.row_group_size))
  written = [embedding_files]
  if reused_tables is not None and not config.num_shards:
    # The reused rows through a sink of their own, fused with the step that reads them back: a
    # Flatten into one sink would hold every row of both in memory on the local runner. The
    # summary step numbers both sinks' files as one set (write.number_shards). No file of no rows:
    # where every reused file is copied whole, WriteEmbeddings' file is the one that may be empty.
    written.append(reused_tables | "WriteReused" >> beam.io.Write(ParquetTableSink(
        FileSystems.join(config.output, REUSED_PREFIX), schema, row_group_size=config.row_group_size,
        skip_if_empty=True)))
  error_files = (errors
                 | "ErrorTables" >> beam.BatchElements(min_batch_size=1, max_batch_size=1024)
                 | "ToArrow" >> beam.Map(errors_to_table)
                 | "WriteErrors" >> beam.io.Write(ParquetTableSink(
                     FileSystems.join(config.output, "errors"), ERRORS_SCHEMA,
                     row_group_size=config.row_group_size)))

  tallied += [
      embeddings | "CountEmbedded" >> _tallied("embedded", lambda table: table.num_rows),
      errors | "CountFailures" >> _tallied("failure", lambda row: (row["stage"], row["error_type"])),
      # The written file names too, so the summary runs after every write has finalized: a job
      # nobody waits on still ends with _SUCCESS.json. The seed: a run with nothing at all.
      *(files | f"Tally{i}" >> _tallied("file") for i, files in enumerate((*written, error_files))),
      p | "Seed" >> beam.Create([("file", None)])]
  return (tallied
          | "AllTallied" >> beam.Flatten()
          | "Tally" >> beam.CombineGlobally(Tally()).without_defaults()
          | "WriteSummary" >> beam.Map(_write_summary_step, config))
