"""Assembles the Beam graph: inputs -> (previous run, dedupe) -> reshuffle -> read/decode/embed -> Parquet -> summary."""

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems
from apache_beam.pvalue import AsDict, AsSingleton

from transforms.dedupe import DedupeWithShards
from transforms import checkpoint
from transforms.decode_pool import own_peak_rss
from pipeline.config import OPTION_NAMES
from transforms.checkpoint import CommitRows
from transforms.embed import EmbedImages
from transforms.item import Item
from transforms.manifest import ReadManifest, label_item
from transforms.progress import CountProgress
from transforms.refresh import CarryOver, PreviousIndex, attach_previous, removed_uri
from transforms import shards
from transforms.shards import ExpandShards, shard_format
from transforms.write import (ERRORS_SCHEMA, ParquetTableSink, embeddings_schema, errors_to_table,
                              summarize, write_summary)


def resource_hints(config) -> dict:
  hints = {}
  if config.accelerator:
    hints["accelerator"] = config.accelerator
  if config.embed_min_ram:
    hints["min_ram"] = config.embed_min_ram
  return hints


def reuse_digests(item) -> tuple:
  """The digests of rows already made for an item's bytes: an interrupted run's, the previous run's."""
  return item.resume_sha256, item.previous_sha256


def embed_images(config) -> EmbedImages:
  """The library's transform as this run's options configure it."""
  return EmbedImages(
      config.backbones, pooling=config.pooling, resize=config.resize, batch_size=config.batch_size,
      normalize=config.normalize, fast_decode=config.fast_decode, max_pixels=config.max_pixels,
      decode_timeout=config.decode_timeout, decode_memory=config.decode_memory,
      decode_processes=config.decode_threads, read_threads=config.read_threads, allow_tf32=config.allow_tf32,
      mixed_precision=config.mixed_precision, engine=config.engine, known_digests=reuse_digests,
      option_names=OPTION_NAMES)


class ReadDecodeEmbed(beam.PTransform):
  """The one stage that runs on accelerator workers: items in; Arrow tables of rows, error rows,
  rows to reuse, shard counts and worker stats out. Shards open into their images, `EmbedImages`
  embeds, and the rows are committed as checkpoints in the same fused stage, so only paths cross
  the shuffle into it and rows are durable as they are made."""

  def __init__(self, config):
    super().__init__()
    self._config = config

  def expand(self, items):
    config = self._config
    expanded = items | "ExpandShards" >> beam.ParDo(ExpandShards(config.shard_layouts, config.extra_fields)).with_outputs(
        ExpandShards.ERRORS_TAG, ExpandShards.SHARD_COUNT_TAG, main="images")
    embedded = expanded.images | "EmbedImages" >> embed_images(config).batches().as_one_output()
    # Under this composite's resource hints too (Beam fuses only steps of the same hints), and
    # straight after the model, with no Flatten between (the local runner would materialize it):
    # the commits run where and when the rows are made.
    commit = beam.ParDo(CommitRows(config.output, config.started_at, config.checkpoint_every, config.extra_fields,
                                   config.progress))
    results = embedded | "CommitRows" >> commit.with_outputs(
        CommitRows.ERRORS_TAG, CommitRows.CARRIED_TAG, CommitRows.RESUMED_TAG, CommitRows.WORKER_STATS_TAG,
        main="embeddings")
    return {"embeddings": results.embeddings, "errors": results[CommitRows.ERRORS_TAG],
            "shard_errors": expanded[ExpandShards.ERRORS_TAG],
            "carried": results[CommitRows.CARRIED_TAG], "resumed": results[CommitRows.RESUMED_TAG],
            "worker_stats": results[CommitRows.WORKER_STATS_TAG],
            "shard_count": expanded[ExpandShards.SHARD_COUNT_TAG]}


def _error_rows(item, error):
  for each in item.items():
    yield dict(error.row(), uri=each.uri)


class MatchInputs(beam.PTransform):
  """Every file matched by the --input globs, once, as an Item with its listed size and mtime."""

  def __init__(self, patterns):
    super().__init__()
    self._patterns = list(patterns)

  def expand(self, pbegin):
    paths = (pbegin
             | "Patterns" >> beam.Create(self._patterns)
             | "Match" >> fileio.MatchAll()
             | "Listed" >> beam.Map(lambda m: (m.path, (m.size_in_bytes, m.last_updated_in_seconds))))
    if len(self._patterns) > 1:
      # Overlapping globs must not embed (and count) a file twice.
      paths = paths | "Distinct" >> beam.Distinct()
    return paths | "Item" >> beam.MapTuple(lambda path, listed: Item(path, size=listed[0], mtime=listed[1]))


def _write_summary_step(files, config, matched, embedded, carried, removed, deduplicated, failures, workers,
                        resumed):
  summary = summarize(
      matched, embedded, sorted(failures), files, layout=config.layout, inputs=config.inputs,
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
  items = p | "MatchInputs" >> MatchInputs(config.inputs)
  # A shard (by extension, or --input-format) stays one item, flagged with its format.
  items = items | "ShardFormat" >> beam.Map(
      lambda item, kind: item.replace(shard_format=shard_format(item.uri, kind)), config.input_format)
  if config.label_from_dir:
    return items | "LabelFromDir" >> beam.Map(label_item)
  return items


def _with_members(items, digests, field, label):
  """Shard items with `field` set to their images' digests {`SHARD#KEY`: sha256}, from `digests`
  ((uri, sha256) of rows of a previous or interrupted run), joined by the shard's path: digests, never
  images, travel with a shard into the embed stage."""
  files, shard_items = items | f"FilesOrShards{label}" >> beam.Partition(
      lambda item, n: int(bool(item.shard_format)), 2)
  by_shard = digests | f"{label}ByShard" >> beam.FlatMap(
      lambda row: [(row[0].rpartition("#")[0], row)] if "#" in row[0] else [])
  joined = ({"shards": shard_items | f"KeyShard{label}" >> beam.Map(lambda item: (item.uri, item)),
             "digests": by_shard}
            | f"Join{label}Members" >> beam.CoGroupByKey()
            | f"Attach{label}Members" >> beam.FlatMap(_attach_members, field))
  return (files, joined) | f"FilesAndShardsWith{label}" >> beam.Flatten()


def _attach_members(joined, field):
  _, groups = joined
  digests = dict(groups["digests"])
  for item in groups["shards"]:
    yield item.replace(**{field: digests}) if digests else item


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
              lambda _, groups: max(0, sum(groups["total"]) - sum(groups["seen"])) if list(groups["seen"]) else 0)
          | "SumRemovedFromShards" >> beam.CombineGlobally(sum))


def _count(pcoll, label):
  return pcoll | label >> beam.combiners.Count.Globally()


def build_graph(p: beam.Pipeline, config):
  items = input_items(p, config)
  if config.progress:
    items = items | "ProgressMatched" >> beam.Map(CountProgress("matched"))
  # A shard counts as the images found in it, which only its reader knows (added below).
  matched_files = _count(items | "ImageFiles" >> beam.Filter(lambda item: item.shard_format is None),
                         "CountMatched")
  # A dict side input, so each previous row's lookup is one hash, however many shards there are.
  shard_uris = items | "Shards" >> beam.FlatMap(lambda item: [(item.uri, True)] if item.shard_format else [])

  removed = previous_shard_rows = None
  if config.previous:
    index = p | "PreviousIndex" >> PreviousIndex(config.previous)
    keyed = items | "KeyByUri" >> beam.Map(lambda item: (item.uri, item))
    joined = ({"items": keyed, "previous": index}
              | "JoinPreviousIndex" >> beam.CoGroupByKey())
    items = joined | "AttachPrevious" >> beam.FlatMap(attach_previous)
    items = _with_members(items, index, "previous_members", "Previous")
    # A shard's images have no item of their own: those of shards still matched are counted against
    # what the shard's reader finds (below); those of shards gone are removed.
    gone = joined | "Gone" >> beam.FlatMap(removed_uri)
    removed = _count(gone | "NotInShards" >> beam.Filter(
        lambda uri, shards_: uri.rpartition("#")[0] not in shards_, AsDict(shard_uris)), "CountRemoved")
    previous_shard_rows = gone | "InShards" >> beam.FlatMap(
        lambda uri, shards_: [(uri.rpartition("#")[0], uri)] if uri.rpartition("#")[0] in shards_ else [],
        AsDict(shard_uris))
  resumed_direct = None
  if config.resume:
    committed = p | "CheckpointIndex" >> checkpoint.CheckpointIndex(config.output)
    keyed = items | "KeyForResume" >> beam.Map(lambda item: (item.uri, item))
    decided = ({"items": keyed, "checkpoint": committed}
               | "JoinCheckpoints" >> beam.CoGroupByKey()
               | "Decide" >> beam.FlatMap(checkpoint.decide, config.resume_verify))
    resumed_direct = decided | "Unread" >> beam.FlatMap(lambda d: [d[1]] if d[0] == "resumed" else [])
    items = decided | "ToEmbed" >> beam.FlatMap(lambda d: [d[1]] if d[0] == "item" else [])
    # A shard's images are always read again (a shard lists no size per image): those whose bytes
    # still hash as committed reuse their rows.
    items = _with_members(items, committed | "CommittedDigests" >> beam.MapTuple(lambda uri, entry: (uri, entry[1])),
                          "resume_members", "Resume")

  deduplicated = None
  if config.dedupe:
    items, deduplicated = items | "Dedupe" >> DedupeWithShards(
        config.read_threads, config.shard_layouts, config.extra_fields)
  items = items | "SplitParquetShards" >> beam.FlatMap(_split_parquet, config.parquet_part_rows)

  embed = ReadDecodeEmbed(config)
  hints = resource_hints(config)
  if hints:
    # On the composite alone: only paths are shuffled into accelerator workers;
    # listing and writing stay on ordinary ones.
    embed = embed.with_resource_hints(**hints)
  results = items | "Reshuffle" >> beam.Reshuffle() | "ReadDecodeEmbed" >> embed
  embeddings, carried = results["embeddings"], results["carried"]
  # A shard's damage has no digest: never committed (a resume reads the shard again).
  errors = ((results["errors"], results["shard_errors"] | "ShardErrorRows" >> beam.FlatMapTuple(_error_rows))
            | "AllErrors" >> beam.Flatten())
  workers = results["worker_stats"] | "WorkerStats" >> beam.combiners.ToList()
  shard_counts = results["shard_count"]
  matched = ((matched_files, shard_counts | "FoundInShards" >> beam.MapTuple(lambda _, found, seen: found))
             | "FilesAndShardImages" >> beam.Flatten()
             | "CountAllMatched" >> beam.CombineGlobally(sum))
  if previous_shard_rows is not None:
    removed_in_shards = _removed_from_shards(
        previous_shard_rows, shard_counts | "PreviousSeen" >> beam.MapTuple(lambda shard, found, seen: (shard, seen)))
    removed = ((removed, removed_in_shards)
               | "AllRemoved" >> beam.Flatten()
               | "CountAllRemoved" >> beam.CombineGlobally(sum))

  tables = embeddings
  if config.previous:
    carried_tables = carried | "CarryOver" >> CarryOver(config.previous, config.extra_fields)
    tables = (embeddings, carried_tables) | "AllRows" >> beam.Flatten()
  resumed_count = None
  if config.resume:
    resumed = (resumed_direct, results["resumed"]) | "AllResumed" >> beam.Flatten()
    resumed_tables, resumed_errors = resumed | "Resume" >> checkpoint.Resume(config.output, config.extra_fields)
    tables = (tables, resumed_tables) | "WithResumed" >> beam.Flatten()
    errors = (errors, resumed_errors) | "WithResumedErrors" >> beam.Flatten()
    resumed_count = (resumed_tables
                     | "ResumedRows" >> beam.Map(lambda table: table.num_rows)
                     | "CountResumed" >> beam.CombineGlobally(sum))

  embedding_files = tables | "WriteEmbeddings" >> beam.io.Write(ParquetTableSink(
      FileSystems.join(config.output, "embeddings"),
      embeddings_schema(config.dim, config.layout, config.extra_fields),
      num_shards=config.num_shards,
      row_group_size=config.row_group_size))
  error_files = (errors
                 | "ErrorTables" >> beam.BatchElements(min_batch_size=1, max_batch_size=1024)
                 | "ToArrow" >> beam.Map(errors_to_table)
                 | "WriteErrors" >> beam.io.Write(ParquetTableSink(
                     FileSystems.join(config.output, "errors"), ERRORS_SCHEMA,
                     row_group_size=config.row_group_size)))

  embedded = (embeddings
              | "Rows" >> beam.Map(lambda table: table.num_rows)
              | "CountEmbedded" >> beam.CombineGlobally(sum))
  failures = (errors
              | "FailureKind" >> beam.Map(lambda row: (row["stage"], row["error_type"]))
              | "CountFailures" >> beam.combiners.Count.PerElement()
              | "FailureList" >> beam.combiners.ToList())
  carried_count = _count(carried, "CountCarried")
  removed = removed if removed is not None else p | "NoneRemoved" >> beam.Create([0])
  deduplicated = deduplicated if deduplicated is not None else p | "NoneDeduplicated" >> beam.Create([0])
  resumed_count = resumed_count if resumed_count is not None else p | "NoneResumed" >> beam.Create([0])
  # The summary's main input is the written file names, so it runs after both
  # writes have finalized: a job nobody waits on still ends with _SUCCESS.json.
  return ((embedding_files, error_files)
          | "WrittenFiles" >> beam.Flatten()
          | "AllFiles" >> beam.combiners.ToList()
          | "WriteSummary" >> beam.Map(
              _write_summary_step, config, AsSingleton(matched), AsSingleton(embedded),
              AsSingleton(carried_count), AsSingleton(removed), AsSingleton(deduplicated),
              AsSingleton(failures), AsSingleton(workers), AsSingleton(resumed_count)))
