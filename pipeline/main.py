"""The job behind `embed-images` (pipeline/cli.py): parse, check at launch, run the pipeline, report, exit status."""

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading

import apache_beam as beam
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, SetupOptions
from apache_beam.runners.worker import statesampler
from apache_beam.utils import shared

from pipeline import launch
from pipeline.config import model_spec
from pipeline.graph import build_graph
from pipeline.options import EmbedOptions, LaunchError
from transforms import checkpoint, decode_pool, hub, progress, store, tensorflow_import
from transforms.backbones import format_table
from transforms.embed import BuildAhead
from transforms.write import SUCCESS_FILE, read_summary

PROG = "embed-images"
EXIT_INTERRUPTED = {signal.SIGINT: 130, signal.SIGTERM: 143}
# Beam's state sampler (the "msecs" counters) ticks in a thread of its own that the end of every
# bundle joins, so each bundle ends up to one tick late: ticks grow from 2 to 200 ms, and an
# unchanged refresh's 25 short local stages waited 0.19 s in all for them (of ~2.8 s). This command
# line reads none of those counters; during its runs a tick tops out at this many ms instead.
SAMPLER_TICK_MS = 20


def _summary_line(summary, output) -> str:
  counts, timings = summary["counts"], summary["timings"]
  reused = "".join(f"{counts[key]} {words}, " for key, words in (("resumed", "resumed"), ("carried_over", "carried over"))
                   if counts.get(key))
  return (f"{PROG}: {summary['status']}: {counts['matched']} matched, {counts['embedded']} embedded, {reused}"
          f"{counts['failed']} failed in {timings['seconds']:.1f}s, start-up included "
          f"({timings['images_per_second']:.1f} img/s over the whole run) -> {output}")


def local_runner(options):
  """For the DirectRunner, Beam's FnApiRunner directly: what DirectRunner picks for batch
  jobs after first trying to download a Prism binary, which fails offline and costs time."""
  if launch.runner_name(options) not in launch.LOCAL_RUNNERS:
    return None  # Beam resolves --runner itself
  from apache_beam.portability.api import beam_provision_api_pb2
  from apache_beam.runners.portability.fn_api_runner import fn_runner
  from apache_beam.runners.portability.portable_runner import JobServiceHandle
  encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
  return fn_runner.FnApiRunner(provision_info=fn_runner.ExtendedProvisionInfo(
      beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded)))


def builds_ahead(options, config) -> bool:
  """Whether the model is built at launch, beside the job's first stages: where the embed stage runs
  in this process (a local runner, not multi_processing, whose workers build their own) and the run
  embeds from scratch. A refresh or a resume may embed nothing: it builds at its first batch, if any."""
  return (launch.runner_name(options) in launch.LOCAL_RUNNERS
          and options.view_as(DirectOptions).direct_running_mode != "multi_processing"
          and not config.previous and not config.resume)


def info_request(argv):
  """(--list-backbones / --list-layers / --help as parsed, the other arguments): those need no job."""
  pre = argparse.ArgumentParser(add_help=False)
  pre.add_argument("--list-backbones", action="store_true")
  pre.add_argument("--list-layers", "--list_layers", dest="list_layers", default=None)
  pre.add_argument("-h", "--help", action="store_true")
  return pre.parse_known_args(argv)


class Interrupted(BaseException):
  """SIGINT or SIGTERM during a run; a BaseException so that no `except Exception` in Beam keeps it."""

  def __init__(self, signum):
    super().__init__(signum)
    self.signum = signum


def descendants(root: int) -> list:
  """Every process below `root`, from /proc (Linux; elsewhere none)."""
  children = {}
  try:
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
  except OSError:
    return []
  for pid in pids:
    try:
      with open(f"/proc/{pid}/stat") as f:
        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
      continue
    children.setdefault(ppid, []).append(pid)
  stack, found = list(children.get(root, ())), []
  while stack:
    pid = stack.pop()
    found.append(pid)
    stack.extend(children.get(pid, ()))
  return found


def _kill_descendants():
  """SIGKILLs every process below this one (Beam's worker processes, decode processes)."""
  for pid in descendants(os.getpid()):
    try:
      os.kill(pid, signal.SIGKILL)
    except OSError:
      pass


@contextlib.contextmanager
def stop_on_signals():
  """SIGINT and SIGTERM stop the run: decode processes and worker processes are killed at once and
  `Interrupted` is raised in the main thread. Yields a list that then holds the signal's number:
  Beam wraps what a DoFn's thread raises (even a BaseException) in its own RuntimeError, so the
  list, not the exception's type, is what tells an interruption apart. A second signal gets the
  default behaviour."""
  received = []
  if threading.current_thread() is not threading.main_thread():
    yield received  # signal handlers can only be set from the main thread: a library caller's choice
    return

  def handler(signum, frame):
    for s in EXIT_INTERRUPTED:
      signal.signal(s, signal.SIG_DFL)
    received.append(signum)
    # Beam logs what unwinds through a bundle as an error with its traceback: noise for a stop
    # the user asked for. Restored once the run has returned.
    logging.disable(logging.CRITICAL)
    decode_pool.close_all_pools()
    _kill_descendants()
    raise Interrupted(signum)

  previous = {s: signal.signal(s, handler) for s in EXIT_INTERRUPTED}
  try:
    yield received
  finally:
    for s, old in previous.items():
      signal.signal(s, old)
    if received:
      logging.disable(logging.NOTSET)


@contextlib.contextmanager
def restored_process_state():
  """What a run sets process-wide (TensorFlow's TF32 switch, Beam's state-sampler tick) is put back
  after it, so a second run in the same process (a library user, a test session) is configured only
  by its options. Keras's dtype policy is restored by FusedModel itself, right after the build."""
  tf = tensorflow_import.loaded()
  # Not imported yet (it is imported where first needed): TensorFlow's own default, on.
  tf32 = tf.config.experimental.tensor_float_32_execution_enabled() if tf else True
  sampler_init = statesampler.StateSampler.__init__
  sampler_defaults = sampler_init.__defaults__
  if sampler_defaults == (statesampler.DEFAULT_SAMPLING_PERIOD_MS,):  # another Beam's: left as it is
    sampler_init.__defaults__ = (SAMPLER_TICK_MS,)
  try:
    yield
  finally:
    sampler_init.__defaults__ = sampler_defaults
    # Not while the build-ahead thread of an interrupted run is still importing it.
    tf = tensorflow_import.loaded()
    if tf is not None:
      tf.config.experimental.enable_tensor_float_32_execution(tf32)


def print_help():
  EmbedOptions._add_argparse_args(parser := argparse.ArgumentParser(prog=PROG))
  parser.add_argument("--list-backbones", action="store_true", help="Print the backbone registry.")
  parser.add_argument("--list-layers", metavar="NAME",
                      help="Print the layers NAME:LAYER can pick, with their output shapes: of a registry "
                           "backbone (built without weights) or of a .keras model given with --model.")
  parser.add_argument("--verbose", action="store_true",
                      help="Show TensorFlow's and Beam's own start-up lines (hidden by default).")
  parser.print_help()
  print("\nEvery Apache Beam pipeline option (--runner, --direct_num_workers, --project, ...) "
        "is accepted as well. --dry_run=true runs the launch checks only: nothing is written or deleted.")


def run(argv=None, save_main_session=True) -> int:
  """Runs the job; returns the exit status (0 ok, 1 over the failure budget or inconsistent,
  2 bad options, 130/143 interrupted by SIGINT/SIGTERM). `report ...` writes a run's report page instead."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:1] == ["report"]:
    from pipeline import report
    return report.run(argv[1:])
  known, argv = info_request(argv)
  if known.list_backbones:
    print(format_table())
    print()
    print(hub.format_families())
    return 0
  if known.help:
    print_help()
    return 0
  if known.list_layers:
    try:
      print(launch.list_layers(known.list_layers, argv))
    except LaunchError as e:
      print(f"{PROG}: error: {e}", file=sys.stderr)
      return 2
    return 0

  store.install()  # before the launch checks: their requests retry under the outage deadline too
  try:
    launch.check_arguments(argv)
    options = PipelineOptions(argv)
    dry_run = launch.dry_run(options)
    config = launch.build_config(options)
    opts = options.view_as(EmbedOptions)
    config, doomed, finished = launch.plan_output(
        config, launch.existing_outputs(config.output), opts.overwrite, opts.resume)
  except LaunchError as e:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return 2
  options.view_as(SetupOptions).save_main_session = save_main_session

  if finished:
    if not dry_run:
      launch.clear_outputs(doomed)  # checkpoints a run left between _SUCCESS.json and its cleanup
    print(f"{PROG}: --resume: {config.output} holds a finished run ({SUCCESS_FILE}); nothing to do",
          file=sys.stderr)
    return 0
  if dry_run:
    return _dry_run(options, config, doomed)

  with stop_on_signals() as received, restored_process_state():
    model_handle, ahead = shared.Shared(), None
    try:
      if builds_ahead(options, config):
        ahead = BuildAhead(model_handle, model_spec(config))
      p = beam.Pipeline(runner=local_runner(options), options=options)
      build_graph(p, config, model_handle)
      # Only now, with the job built and about to run, is a previous run deleted.
      launch.clear_outputs(doomed)
      if config.checkpoint_every and not config.resume:
        checkpoint.write_layout(config.output, config.layout)
      p.run().wait_until_finish()
    except BaseException as e:
      down = None if received else store.unavailable_in(e)
      if down:
        go_on = ("run again with --resume to go on from its committed rows" if config.checkpoint_every
                 else "run again with --overwrite to start over")
        print(f"{PROG}: error: the store {down[0]} is unavailable (no request succeeded for "
              f"{store.OUTAGE.seconds:g} s); last status: {down[1]}; the output in {config.output} is partial "
              f"(no {SUCCESS_FILE}); {go_on}", file=sys.stderr)
        return 1
      if not received:
        raise
      name = signal.Signals(received[0]).name
      go_on = ("run again with --resume to go on from its committed rows, or --overwrite to start over"
               if config.checkpoint_every else "run again with --overwrite to start over")
      print(f"{PROG}: interrupted by {name}: the output in {config.output} is partial (no {SUCCESS_FILE}); "
            f"{go_on}", file=sys.stderr)
      return EXIT_INTERRUPTED[received[0]]
    finally:
      if ahead is not None and not received:
        # A run that ended before its first batch: the build must not go on changing this process's
        # state (TensorFlow's, Keras's) after restored_process_state has put it back.
        ahead.join()
      progress.close_all()
  return _report(config)


def _dry_run(options, config, doomed) -> int:
  for path in doomed:
    print(f"{PROG}: dry run: --overwrite would delete {path}", file=sys.stderr)
  if launch.runner_name(options) not in launch.LOCAL_RUNNERS:
    # Dataflow's dry run builds the whole job and submits nothing (dry_run is a real boolean now).
    p = beam.Pipeline(options=options)
    build_graph(p, config)
    p.run()
  print(f"{PROG}: dry run: launch checks passed; nothing was run, written or deleted", file=sys.stderr)
  return 0


def _report(config) -> int:
  try:
    summary = read_summary(config.output)
  except Exception as e:  # a job not waited on (e.g. a Dataflow template) writes it later
    print(f"{PROG}: launched; {config.output}/{SUCCESS_FILE} not readable yet ({type(e).__name__})",
          file=sys.stderr)
    return 0
  print(_summary_line(summary, config.output), file=sys.stderr)
  for warning in summary.get("warnings", ()):
    print(f"{PROG}: warning: {warning}", file=sys.stderr)
  counts = summary["counts"]
  if summary["status"] == "over_failure_budget":
    print(f"{PROG}: error: {counts['failed']} of {counts['matched']} inputs failed "
          f"({summary['failure_fraction']:.1%} > --max-failure-fraction "
          f"{summary['max_failure_fraction']:g}); see {config.output}/errors-*.parquet",
          file=sys.stderr)
    return 1
  if summary["status"] != "ok":
    print(f"{PROG}: error: inputs not accounted for: {counts['matched']} matched != "
          f"{counts['embedded']} embedded + {counts.get('resumed', 0)} resumed + "
          f"{counts.get('carried_over', 0)} carried over + {counts['failed']} failed", file=sys.stderr)
    return 1
  return 0
