"""Assembles the Beam graph: match -> reshuffle -> read/decode/embed -> Parquet -> run summary."""

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems
from apache_beam.pvalue import AsSingleton

from transforms.embed import ERRORS_TAG, ReadDecodeEmbed
from transforms.progress import CountProgress
from transforms.write import (ERRORS_SCHEMA, ParquetTableSink, embeddings_schema, errors_to_table,
                              summarize, write_summary)


def resource_hints(config) -> dict:
  hints = {}
  if config.accelerator:
    hints["accelerator"] = config.accelerator
  if config.embed_min_ram:
    hints["min_ram"] = config.embed_min_ram
  return hints


class MatchInputs(beam.PTransform):
  """Every file matched by the --input globs, once, as its path."""

  def __init__(self, patterns):
    super().__init__()
    self._patterns = list(patterns)

  def expand(self, pbegin):
    paths = (pbegin
             | "Patterns" >> beam.Create(self._patterns)
             | "Match" >> fileio.MatchAll()
             | "Path" >> beam.Map(lambda metadata: metadata.path))
    if len(self._patterns) > 1:
      # Overlapping globs must not embed (and count) a file twice.
      paths = paths | "Distinct" >> beam.Distinct()
    return paths


def _write_summary_step(files, config, matched, embedded, failures):
  summary = summarize(config, matched, embedded, sorted(failures), files)
  return write_summary(config.output, summary)


def build_graph(p: beam.Pipeline, config):
  paths = p | "MatchInputs" >> MatchInputs(config.inputs)
  if config.progress:
    paths = paths | "ProgressMatched" >> beam.Map(CountProgress("matched"))

  embed = ReadDecodeEmbed(config)
  hints = resource_hints(config)
  if hints:
    # On the composite alone: only paths are shuffled into accelerator workers;
    # listing and writing stay on ordinary ones.
    embed = embed.with_resource_hints(**hints)
  results = paths | "Reshuffle" >> beam.Reshuffle() | "ReadDecodeEmbed" >> embed
  embeddings, errors = results.embeddings, results[ERRORS_TAG]

  embedding_files = embeddings | "WriteEmbeddings" >> beam.io.Write(ParquetTableSink(
      FileSystems.join(config.output, "embeddings"),
      embeddings_schema(config.dim, config.layout()),
      num_shards=config.num_shards,
      row_group_size=config.row_group_size))
  error_files = (errors
                 | "ErrorTables" >> beam.BatchElements(min_batch_size=1, max_batch_size=1024)
                 | "ToArrow" >> beam.Map(errors_to_table)
                 | "WriteErrors" >> beam.io.Write(ParquetTableSink(
                     FileSystems.join(config.output, "errors"), ERRORS_SCHEMA,
                     row_group_size=config.row_group_size)))

  matched = paths | "CountMatched" >> beam.combiners.Count.Globally()
  embedded = (embeddings
              | "Rows" >> beam.Map(lambda table: table.num_rows)
              | "CountEmbedded" >> beam.CombineGlobally(sum))
  failures = (errors
              | "FailureKind" >> beam.Map(lambda row: (row["stage"], row["error_type"]))
              | "CountFailures" >> beam.combiners.Count.PerElement()
              | "FailureList" >> beam.combiners.ToList())
  # The summary's main input is the written file names, so it runs after both
  # writes have finalized: a job nobody waits on still ends with _SUCCESS.json.
  return ((embedding_files, error_files)
          | "WrittenFiles" >> beam.Flatten()
          | "AllFiles" >> beam.combiners.ToList()
          | "WriteSummary" >> beam.Map(
              _write_summary_step, config, AsSingleton(matched), AsSingleton(embedded),
              AsSingleton(failures)))
