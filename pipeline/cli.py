"""The `embed-images` console script (and `python -m pipeline`): start-up without the cyclic GC, and quiet.

Start-up is one thread of Python on the critical path: importing Beam, TensorFlow and Keras
makes a few hundred thousand long-lived objects, and the cyclic GC walks all of them in each
full collection it triggers on the way (six, ~0.9 s in all, in a 1024-image local run), and once
more at interpreter exit (~1.3 s). So the imports run with the GC paused, what they made is
moved to the permanent generation (`gc.freeze`), and the heap is frozen again before exit.
TensorFlow and Keras are imported where first needed (transforms/tensorflow_import.py), under
the same pause and the capture below: a run that builds no model never imports them. Optional
dependencies that Beam, TensorFlow and Keras import where installed, and this program never uses,
are kept out of those imports (`kept_out`): BigQuery's client (~0.3 s), scikit-learn (~0.8 s),
IPython (~0.13 s) and SciPy (~0.1 s).
`pipeline.main.run` itself, which tests and other programs call in-process, leaves the GC alone.

Quiet: what a person sees is this program's own output. Without --verbose, Beam's "apitools not
found" warning (BigQuery's client, which this job never uses) is dropped, so is Beam's "No shards
found to finalize" where a refresh copied every previous file whole, and TensorFlow's start-up
lines are held back: TF_CPP_MIN_LOG_LEVEL=2 (set by the package unless the user set a level) hides
TensorFlow's INFO and WARNING lines, but not those its libraries print before reading it, nor the
ERROR-level failed cuInit of a machine with no GPU; level 3 would hide those with every real
error. So, at level 2 or 3, stderr is captured while TensorFlow loads and looks for GPUs, and
replayed less those lines alone.
"""

import contextlib
import functools
import gc
import logging
import os
import re
import sys
import tempfile
import threading

import pipeline  # this module's own package, already imported: its USER_TF_LOG_LEVEL
from transforms import tensorflow_import

REPORT_COMMAND = "report"  # `embed-images report OUTPUT ...` (pipeline/report.py)
VERBOSE_FLAG = "--verbose"  # taken out here: Beam and the job's own parser never see it
# Logged on the root logger by apache_beam/io/gcp/internal/clients/bigquery when the [gcp] extra
# (apitools) is not installed; only BigQuery needs it.
APITOOLS_WARNING = "apitools not found, and bigquery client libraries are not available"

# absl prints this once per library that logs before absl::InitializeLog, whatever the level.
_ABSL_PREAMBLE = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
# absl's line format: severity, date, time, thread, file:line]. Only I(NFO) and W(ARNING).
_INFO_OR_WARNING = re.compile(r"[IW]\d{4} \d\d:\d\d:[\d.]+ +\d+ [\w.-]+:\d+\] ")
_FAILED_CUINIT = re.compile(r"E\d{4} .*\] failed call to cuInit: ")
# What says there is no GPU here at all, so a failed cuInit tells nothing more.
_NO_DRIVER = "Could not find cuda drivers on your machine"
_NO_DEVICE = "CUDA_ERROR_NO_DEVICE"


@contextlib.contextmanager
def _first_tensorflow_import(quiet: bool):
  # TensorFlow's import imports all of Keras, whose scikit-learn wrappers import scikit-learn where
  # it is installed (the `report` extra): ~0.8 s of a 2-core machine's start-up; and whose
  # `saving.file_editor` imports IPython where it is installed, to show a table in a notebook: ~0.13 s.
  # TensorFlow's own legacy Keras engine (`tensorflow.python.keras.engine.training_v1` and
  # `training_arrays_v1`, never used with Keras 3) imports SciPy's sparse matrices where installed: ~0.1 s.
  with startup_without_gc(), kept_out("sklearn", "IPython", "scipy"), \
      tensorflow_noise_held_back() if quiet else contextlib.nullcontext():
    yield


@contextlib.contextmanager
def kept_out(*modules):
  """For the block, `import` of these modules fails, as if they were not installed, unless they are
  imported already; afterwards they import as usual. For optional dependencies that a library
  imports where installed and this program never uses (`python -X importtime` shows their cost):
  the library guards the import and goes on without them, and only that library's use of them
  stays off in this process."""
  blocked = [name for name in modules if name not in sys.modules]
  for name in blocked:
    sys.modules[name] = None
  try:
    yield
  finally:
    for name in blocked:
      if name in sys.modules and sys.modules[name] is None:
        del sys.modules[name]


@contextlib.contextmanager
def startup_without_gc():
  enabled = gc.isenabled()
  gc.disable()
  try:
    yield
  finally:
    gc.freeze()
    if enabled:
      gc.enable()


class _Dropping(logging.Filter):
  """Drops the records whose message starts with `prefix`; every other record passes."""

  def __init__(self, prefix: str):
    super().__init__()
    self._prefix = prefix

  def filter(self, record) -> bool:
    return not str(record.msg).startswith(self._prefix)


_NOT_APITOOLS_WARNING = _Dropping(APITOOLS_WARNING)
# A refresh's reused rows go through a sink that writes no file of no rows (pipeline/graph.py,
# WriteReused): where every previous file was copied whole, Beam logs that it found none to finalize.
NO_SHARDS_WARNING = "No shards found to finalize"


@contextlib.contextmanager
def without_apitools_warning():
  """Drops Beam's apitools warning, logged once when Beam is first imported; every other record passes."""
  # A filter on the root logger sees only records logged on the root logger itself, as this one is.
  root = logging.getLogger()
  root.addFilter(_NOT_APITOOLS_WARNING)
  try:
    yield
  finally:
    root.removeFilter(_NOT_APITOOLS_WARNING)


def without_tensorflow_noise(text: str) -> str:
  """`text` (TensorFlow's start-up stderr) less absl's preamble, INFO and WARNING lines, and a
  failed cuInit where TensorFlow found no CUDA driver or no device; everything else as it was."""
  no_gpu = _NO_DRIVER in text
  kept = []
  for line in text.splitlines(keepends=True):
    if line.rstrip("\n") == _ABSL_PREAMBLE or _INFO_OR_WARNING.match(line):
      continue
    # A GPU that is there but fails to start stays visible: it is why the run is on the CPU.
    if _FAILED_CUINIT.match(line) and (no_gpu or _NO_DEVICE in line):
      continue
    kept.append(line)
  return "".join(kept)


_held_back = []  # the release of the capture in force, if any (at most one: TensorFlow imports once)


@contextlib.contextmanager
def tensorflow_noise_held_back():
  """Captures file descriptor 2 (TensorFlow's C++ logs go there, not through sys.stderr) to a file
  for the block, then writes what it caught to stderr less `without_tensorflow_noise`'s lines.

  The block may run in the build-ahead thread while the job's main thread goes on: what the main
  thread prints meanwhile is caught too and written at the end. `release_held_back` ends the
  capture early, from any thread: an interrupted run must not exit with its last line in the file."""
  sys.stderr.flush()
  saved = os.dup(2)
  lock = threading.Lock()
  # A file, not a pipe: nothing needs to read it while the block runs, however much is written.
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)

    def release():
      with lock:
        if released:
          return
        released.append(True)
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        captured.seek(0)
        kept = without_tensorflow_noise(captured.read().decode("utf-8", errors="replace"))
        if kept:
          sys.stderr.write(kept)
          sys.stderr.flush()

    released = []
    _held_back.append(release)
    try:
      yield
    finally:
      _held_back.remove(release)
      release()


def release_held_back():
  """Ends a `tensorflow_noise_held_back` capture still in force (another thread's), writing what it caught."""
  for release in list(_held_back):
    release()


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  verbose = VERBOSE_FLAG in argv
  argv = [a for a in argv if a != VERBOSE_FLAG]
  logging.getLogger().setLevel(logging.WARNING)
  if not verbose:
    logging.getLogger("apache_beam.io.filebasedsink").addFilter(_Dropping(NO_SHARDS_WARNING))
  # Arrow's buffers from the C library's malloc, not its default mimalloc, unless the user chose:
  # reading 30,720 reused rows back and writing them again (Arrow's own peak: 30 MB) raised the
  # process's RSS by 121 MB on mimalloc and by 53 MB on malloc (benchmarks/README.md). Arrow reads
  # this at its first allocation, which is after this line.
  os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
  if argv[:1] == [REPORT_COMMAND]:
    # Before the job's own start-up: a report reads Parquet and never needs TensorFlow.
    with contextlib.nullcontext() if verbose else without_apitools_warning():
      from pipeline import report
    sys.exit(report.run(argv[1:]))
  # The package set TF_CPP_MIN_LOG_LEVEL=2 on import unless the user had chosen a level. At 2 or 3
  # TensorFlow promises no INFO or WARNING lines, and the capture keeps that promise for the lines
  # printed before TensorFlow reads it; a user's 0 or 1 asks for them all. --verbose unsets our 2.
  quiet_tensorflow = not verbose and os.environ.get("TF_CPP_MIN_LOG_LEVEL") in ("2", "3")
  if verbose and pipeline.USER_TF_LOG_LEVEL is None:
    os.environ.pop("TF_CPP_MIN_LOG_LEVEL", None)
  # Beam imports google-cloud-bigquery's client where the [gcp] extra installed it (~0.3 s); only
  # BigQuery's IO uses it.
  with startup_without_gc(), kept_out("google.cloud.bigquery"):
    with contextlib.nullcontext() if verbose else without_apitools_warning():
      from pipeline.main import EXIT_INTERRUPTED, run
  # TensorFlow is imported where something first needs it (transforms/tensorflow_import.py): at
  # launch for a model that must be loaded to be checked (or converted for OpenVINO), else by the
  # model's build: ahead, in a thread beside the job's first stages, for an in-process run from
  # scratch (pipeline/main.py), at the first batch to embed for a refresh or a resume, else never
  # (an unchanged refresh, --dry_run). That import is held back and GC-paused as these were.
  tensorflow_import.on_first_import(functools.partial(_first_tensorflow_import, quiet_tensorflow))
  status = run(argv)
  if status in EXIT_INTERRUPTED.values():
    # Stopped by a signal: decode and worker processes are dead already, and a thread still in a
    # read (or in TensorFlow's import, its stderr held back) must not hold the exit until it returns.
    release_held_back()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
  gc.freeze()  # nothing left to collect that matters: skip the final full collection at exit
  sys.exit(status)


if __name__ == "__main__":
  main()
