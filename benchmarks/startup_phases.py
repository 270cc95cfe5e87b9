"""Where a whole `python -m pipeline` run's seconds go: the real console script in this process, its steps timed from outside.

    python benchmarks/startup_phases.py SPAWNED_AT -- EMBED-IMAGES ARGUMENTS...

Run by `benchmarks/startup.py --phases` as a child process (SPAWNED_AT: the parent's time.time()
just before it started this one). The imports are made here in `pipeline/cli.py`'s order and
under its paused GC; then `pipeline.cli.main` runs as `python -m pipeline` would, with the steps
below wrapped so that each records when it started and ended (the local runner runs every DoFn in
this process). The last line printed is `PHASES {json}`: a list of (name, start, end) in seconds
from this process's start, the interpreter's own start-up and the exit measured by the parent.
"""

import contextlib
import json
import sys
import time

T0 = time.perf_counter()
SPAWNED_AT = float(sys.argv[1])
STARTED_AT = time.time()
EVENTS = []  # (name, start, end), seconds after T0


def now():
  return time.perf_counter() - T0


def record(name, start, end=None):
  EVENTS.append((name, start, now() if end is None else end))


def wrap(owner, attr, name, limit=None, before=None):
  """owner.attr recorded as `name` (its first `limit` calls; None: every call, summed by name)."""
  original = getattr(owner, attr)
  calls = [0]

  def wrapper(*args, **kwargs):
    calls[0] += 1
    if before is not None:
      before(*args, **kwargs)
    start = now()
    try:
      return original(*args, **kwargs)
    finally:
      if limit is None or calls[0] <= limit:
        label = name(calls[0]) if callable(name) else name
        record(label, start)
  setattr(owner, attr, wrapper)


def main():
  argv = sys.argv[sys.argv.index("--") + 1:]
  EVENTS.append(("interpreter start-up (until this script's first line)", -(STARTED_AT - SPAWNED_AT), 0.0))
  start = now()
  from pipeline import cli
  record("import pipeline.cli", start)
  with cli.startup_without_gc():
    with cli.without_apitools_warning():
      start = now()
      import apache_beam  # noqa: F401
      record("import apache_beam", start)
      start = now()
      import pipeline.main  # noqa: F401  (ours, Beam's runners, pyarrow)
      record("import pipeline.main (ours, pyarrow, the rest of Beam)", start)

  import apache_beam as beam
  from pipeline import graph, launch
  from transforms import decode_pool, embed, fused, openvino_engine

  wrap(pipeline.main, "run", "pipeline.main.run (the whole job)")
  wrap(launch, "build_config", "launch checks: options, listing, backbones and weights resolved")
  wrap(pipeline.main, "build_graph", "build the Beam graph")
  wrap(beam.Pipeline, "run", "Pipeline.run (the local runner, start to finish)")
  wrap(embed._EmbedDoFn, "setup", "embed stage setup (thread pool; decode processes start at the first image)", limit=1)
  wrap(decode_pool, "acquire_pool", "start the decode processes", limit=1)
  first_element = []

  def on_element(*args, **kwargs):
    if not first_element:
      first_element.append(now())
      record("first image reaches the embed stage", first_element[0], first_element[0])
  # (not process itself: Beam reads its signature for the window and timestamp parameters)
  wrap(embed, "_request", "_", limit=0, before=on_element)
  wrap(fused, "load_features", "model build: keras.applications / user models")

  def trace_first(forward, models):
    start = now()
    forward.get_concrete_function()
    record("trace the fused forward (tf.function)", start)
  wrap(fused, "_freeze", "freeze the weights (convert_variables_to_constants_v2)", before=trace_first)
  wrap(fused, "_read_frozen", "TensorFlow: read the frozen graph from the model cache")
  wrap(fused, "_write_frozen", "TensorFlow: write the frozen graph to the model cache")

  def trace_for_openvino(model, *args, **kwargs):
    start = now()
    model._forward.get_concrete_function()
    record("trace the fused forward (tf.function)", start)
  wrap(openvino_engine, "convert_fused", "OpenVINO: convert_model", before=trace_for_openvino)
  wrap(openvino_engine, "read_cached", "OpenVINO: read the converted model from the model cache")
  wrap(openvino_engine, "write_cached", "OpenVINO: write the converted model to the model cache")
  wrap(openvino_engine.OpenVINOModel, "__init__", "OpenVINO: compile (CPU plugin) + infer requests")
  batch_name = lambda n: {1: "first batch (forward)", 2: "second batch (forward)"}.get(n, "later batches (forward)")
  wrap(fused.FusedModel, "__call__", batch_name)
  wrap(openvino_engine.OpenVINOModel, "__call__", batch_name)

  # TensorFlow where the command line first needs it (transforms/tensorflow_import.py): timed inside
  # the wrapper cli.main registers for that import, in whichever thread makes it; a run that needs
  # none (OpenVINO with its model cached) has no such phase.
  from transforms import tensorflow_import
  register = tensorflow_import.on_first_import

  def timed_register(wrapper):
    @contextlib.contextmanager
    def timed():
      start = now()
      with (wrapper or contextlib.nullcontext)():
        yield
      record("import tensorflow, keras, look for GPUs (where first needed)", start)
    register(timed)
  tensorflow_import.on_first_import = timed_register

  status = 0
  try:
    cli.main(argv)
  except SystemExit as e:
    status = e.code or 0
  print("PHASES " + json.dumps({"events": EVENTS, "end": now()}), flush=True)
  sys.stdout.flush()
  sys.exit(status)


if __name__ == "__main__":
  main()
