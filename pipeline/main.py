"""The job behind `embed-images` (pipeline/cli.py): parse, check at launch, run the pipeline, report, exit status."""

import argparse
import sys

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions

from pipeline.graph import build_graph
from pipeline.options import EmbedOptions, LaunchError, build_config, prepare_output
from transforms import progress
from transforms.backbones import format_table
from transforms.write import read_summary

PROG = "embed-images"


def _summary_line(summary, output) -> str:
  counts = summary["counts"]
  line = (f"{PROG}: {summary['status']}: {counts['matched']} matched, {counts['embedded']} embedded, "
          f"{counts['failed']} failed in {summary['timings']['seconds']:.1f}s "
          f"({summary['timings']['images_per_second']:.1f} img/s) -> {output}")
  return line


def local_runner(options):
  """For the DirectRunner, Beam's FnApiRunner directly: what DirectRunner picks for batch
  jobs after first trying to download a Prism binary, which fails offline and costs time."""
  runner = options.get_all_options().get("runner")
  if runner not in (None, "DirectRunner", "direct", "SwitchingDirectRunner"):
    return None  # Beam resolves --runner itself
  from apache_beam.portability.api import beam_provision_api_pb2
  from apache_beam.runners.portability.fn_api_runner import fn_runner
  from apache_beam.runners.portability.portable_runner import JobServiceHandle
  encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
  return fn_runner.FnApiRunner(provision_info=fn_runner.ExtendedProvisionInfo(
      beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded)))


def info_request(argv):
  """(--list-backbones / --help as parsed, the other arguments): those two need no job."""
  pre = argparse.ArgumentParser(add_help=False)
  pre.add_argument("--list-backbones", action="store_true")
  pre.add_argument("-h", "--help", action="store_true")
  return pre.parse_known_args(argv)


def run(argv=None, save_main_session=True) -> int:
  """Runs the job; returns the exit status (0 ok, 1 over the failure budget, 2 bad options)."""
  known, argv = info_request(list(sys.argv[1:] if argv is None else argv))
  if known.list_backbones:
    print(format_table())
    return 0
  if known.help:
    EmbedOptions._add_argparse_args(parser := argparse.ArgumentParser(prog=PROG))
    parser.add_argument("--list-backbones", action="store_true", help="Print the backbone registry.")
    parser.print_help()
    print("\nEvery Apache Beam pipeline option (--runner, --direct_num_workers, --project, ...) "
          "is accepted as well.")
    return 0

  options = PipelineOptions(argv)
  try:
    config = build_config(options)
    prepare_output(config.output, options.view_as(EmbedOptions).overwrite)
  except LaunchError as e:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return 2
  options.view_as(SetupOptions).save_main_session = save_main_session

  try:
    with beam.Pipeline(runner=local_runner(options), options=options) as p:
      build_graph(p, config)
  finally:
    progress.close_all()

  try:
    summary = read_summary(config.output)
  except Exception as e:  # a job not waited on (e.g. a Dataflow template) writes it later
    print(f"{PROG}: launched; {config.output}/_SUCCESS.json not readable yet ({type(e).__name__})",
          file=sys.stderr)
    return 0
  print(_summary_line(summary, config.output), file=sys.stderr)
  counts = summary["counts"]
  if summary["status"] == "over_failure_budget":
    print(f"{PROG}: error: {counts['failed']} of {counts['matched']} inputs failed "
          f"({summary['failure_fraction']:.1%} > --max-failure-fraction "
          f"{summary['max_failure_fraction']:g}); see {config.output}/errors-*.parquet",
          file=sys.stderr)
    return 1
  if summary["status"] != "ok":
    print(f"{PROG}: error: inputs not accounted for: {counts['matched']} matched != "
          f"{counts['embedded']} embedded + {counts['failed']} failed", file=sys.stderr)
    return 1
  return 0
