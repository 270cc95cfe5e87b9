"""Micro-measurements behind the choices in transforms/embed.py (see benchmarks/README.md).

    python benchmarks/levers.py forward  [--rounds 3]   # frozen weights, tf.function variants, TF threads, XLA, batch
    python benchmarks/levers.py overlap  [--rounds 3]   # forward + decoding the next batch in k threads
    python benchmarks/levers.py decode                  # CPU cost of one image's read + hash + decode
    python benchmarks/levers.py startup [--rounds 5]    # imports with the GC paused, exit with a frozen heap

Each variant runs in a fresh process (TensorFlow's thread pools are fixed at its first op), and
variants are interleaved over rounds so that other load on the machine spreads over all of them.
Rates are img/s of wall time; "cpu ms/img" is the process's CPU time per image, which load from
other processes inflates much less.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [p for p in (REPO, os.path.dirname(os.path.abspath(__file__))) if p not in sys.path]
WAIT_QUIET = 0

FORWARD_VARIANTS = {
    "signature None batch": dict(signature="none"),
    "weights frozen to constants (FusedModel)": dict(signature="none", frozen=True),
    "signature fixed batch 32": dict(signature="fixed"),
    "no signature (retrace per shape)": dict(signature="auto"),
    "XLA jit_compile, None batch": dict(signature="none", xla=True),
    "intra 1 / inter 1": dict(signature="none", intra=1, inter=1),
    "intra 2 / inter 1": dict(signature="none", intra=2, inter=1),
    "intra 4 / inter 1": dict(signature="none", intra=4, inter=1),
    "oneDNN off (TF_ENABLE_ONEDNN_OPTS=0)": dict(signature="none", env={"TF_ENABLE_ONEDNN_OPTS": "0"}),
    "2 concurrent calls, intra 1 / inter 2": dict(signature="none", intra=1, inter=2, concurrent=2),
    "2 concurrent calls, intra 2 / inter 2": dict(signature="none", concurrent=2),
    "batch 16": dict(signature="none", batch=16),
    "batch 64": dict(signature="none", batch=64),
}

OVERLAP_VARIANTS = {
    "forward only (pre-decoded)": dict(threads=0),
    "no overlap: decode in 2 threads, then forward": dict(threads=2, serial=True),
    "overlap, decode in 1 thread": dict(threads=1),
    "overlap, decode in 2 threads": dict(threads=2),
    "overlap, decode in 16 threads": dict(threads=16),
    "overlap, 2 threads, TF intra 1": dict(threads=2, intra=1, inter=1),
    "overlap, 2 threads, TF inter 1": dict(threads=2, intra=2, inter=1),
    "overlap, 2 threads at nice 19": dict(threads=2, nice=19),
    "overlap, 16 threads at nice 19": dict(threads=16, nice=19),
    "overlap, 2 threads SCHED_IDLE": dict(threads=2, idle=True),
    "2 model calls in flight, intra 1, decode 2 threads": dict(threads=2, concurrent=2, intra=1, inter=2),
    "2 model calls in flight, intra 1, decode 2 at nice 19": dict(threads=2, concurrent=2, intra=1, inter=2,
                                                                  nice=19),
    "2 model calls in flight, intra 2, decode 2 at nice 19": dict(threads=2, concurrent=2, nice=19),
}


def _cpu():
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _configure(v):
  import tensorflow as tf
  if v.get("intra"):
    tf.config.threading.set_intra_op_parallelism_threads(v["intra"])
  if v.get("inter"):
    tf.config.threading.set_inter_op_parallelism_threads(v["inter"])
  return tf


def _model_fn(tf, v, name="mobilenet_v2", size=224):
  from transforms.backbones import preprocess
  from transforms.weights import load_backbone, resolve_weights
  model = load_backbone(name, size, "avg", resolve_weights("random", name, size))
  kwargs = {}
  if v.get("signature") == "none":
    kwargs["input_signature"] = [tf.TensorSpec([None, size, size, 3], tf.uint8)]
  elif v.get("signature") == "fixed":
    kwargs["input_signature"] = [tf.TensorSpec([v.get("batch", 32), size, size, 3], tf.uint8)]
  if v.get("xla"):
    kwargs["jit_compile"] = True

  @tf.function(**kwargs)
  def forward(x):
    return model(preprocess(tf.cast(x, tf.float32), "tf"), training=False)
  if v.get("frozen"):
    # What FusedModel runs for small backbones: weights as constants, BatchNorm folded.
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2
    frozen = convert_variables_to_constants_v2(
        forward.get_concrete_function(tf.TensorSpec([None, size, size, 3], tf.uint8)))
    return lambda x: frozen(tf.convert_to_tensor(x))[0]
  return forward


def child_forward(v, images):
  import numpy as np
  tf = _configure(v)
  forward = _model_fn(tf, v)
  bs = v.get("batch", 32)
  x = np.random.default_rng(0).integers(0, 256, (bs, 224, 224, 3), dtype=np.uint8)
  forward(x).numpy()
  forward(x).numpy()
  steps = max(1, images // bs)
  concurrent_calls = v.get("concurrent", 1)
  if concurrent_calls > 1:
    import concurrent.futures
    pool = concurrent.futures.ThreadPoolExecutor(concurrent_calls)
    list(pool.map(lambda _: forward(x).numpy(), range(concurrent_calls)))
  wall, cpu = time.perf_counter(), _cpu()
  if concurrent_calls > 1:
    list(pool.map(lambda _: forward(x).numpy(), range(steps)))
  else:
    for _ in range(steps):
      forward(x).numpy()
  wall, cpu = time.perf_counter() - wall, _cpu() - cpu
  return {"img_s": steps * bs / wall, "cpu_ms": 1000 * cpu / (steps * bs)}


def _bench_files(count):
  import tempfile
  from throughput import make_images
  return make_images(count, os.path.join(tempfile.gettempdir(), "embed-images-bench"))


def _spec():
  from transforms.decode import DecodeSpec
  return DecodeSpec(sizes=(224,), max_pixels=None)  # decoded in-process: the levers measured the thread schedule


def child_overlap(v, images):
  """The DoFn's schedule without Beam: batch i+1 is read+decoded in a pool while batch i runs."""
  import concurrent.futures
  import numpy as np
  from transforms.load import load_file
  tf = _configure(v)
  forward = _model_fn(tf, v)
  paths = _bench_files(images)
  bs = 32
  threads = v["threads"]
  if threads == 0:
    arrays = [load_file(p, _spec()).image.arrays[224] for p in paths]
  def lower_priority():
    if v.get("idle"):
      os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: the calling thread
    elif v.get("nice"):
      os.setpriority(os.PRIO_PROCESS, 0, v["nice"])  # on Linux, per thread
  pool = concurrent.futures.ThreadPoolExecutor(max(1, threads), initializer=lower_priority)
  forward(np.zeros((bs, 224, 224, 3), np.uint8)).numpy()
  forward(np.zeros((images % bs or bs, 224, 224, 3), np.uint8)).numpy()
  wall, cpu = time.perf_counter(), _cpu()
  if threads == 0:
    for i in range(0, len(paths), bs):
      forward(np.stack(arrays[i:i + bs])).numpy()
  else:
    batches = [paths[i:i + bs] for i in range(0, len(paths), bs)]
    submit = lambda batch: [pool.submit(load_file, p, _spec()) for p in batch]
    if v.get("serial"):
      for batch in batches:
        forward(np.stack([f.result().image.arrays[224] for f in submit(batch)])).numpy()
    elif v.get("concurrent", 1) > 1:
      import collections
      k = v["concurrent"]
      model_pool = concurrent.futures.ThreadPoolExecutor(k)
      decoding = collections.deque(submit(b) for b in batches[:k + 1])
      running = collections.deque()
      for i in range(len(batches)):
        ready = [f.result().image.arrays[224] for f in decoding.popleft()]
        if i + k + 1 < len(batches):
          decoding.append(submit(batches[i + k + 1]))
        if len(running) >= k:
          running.popleft().result()
        running.append(model_pool.submit(lambda a: forward(a).numpy(), np.stack(ready)))
      for f in running:
        f.result()
    else:
      pending = submit(batches[0])
      for i in range(len(batches)):
        ready = [f.result().image.arrays[224] for f in pending]
        if i + 1 < len(batches):
          pending = submit(batches[i + 1])
        forward(np.stack(ready)).numpy()
  wall, cpu = time.perf_counter() - wall, _cpu() - cpu
  return {"img_s": len(paths) / wall, "cpu_ms": 1000 * cpu / len(paths)}


def child_decode(images):
  from transforms.load import load_file
  import keras
  paths = _bench_files(images)
  out = {}
  for label, fn in (("load_file (read+sha256+decode+resize)", lambda p: load_file(p, _spec())),
                    ("keras load_img + img_to_array", lambda p: keras.utils.img_to_array(
                        keras.utils.load_img(p, target_size=(224, 224), interpolation="bilinear")))):
    fn(paths[0])
    wall, cpu = time.perf_counter(), _cpu()
    for p in paths:
      fn(p)
    wall, cpu = time.perf_counter() - wall, _cpu() - cpu
    out[label] = {"img_s": len(paths) / wall, "cpu_ms": 1000 * cpu / len(paths)}
  return out


STARTUP_VARIANTS = {
    "GC running (plain imports, plain exit)": dict(pause=False, freeze_at_exit=False),
    "GC paused + frozen over imports, frozen at exit (pipeline.cli)": dict(pause=True, freeze_at_exit=True),
}


def child_startup(v, images):
  """Seconds to import what a local run needs, then a real 64-image run; the parent measures the
  time from `end` (just before the result is printed) to the process's exit."""
  import gc
  import tempfile
  started = time.perf_counter()
  if v["pause"]:
    from pipeline.cli import startup_without_gc
    context = startup_without_gc()
  else:
    import contextlib
    context = contextlib.nullcontext()
  with context:
    from pipeline.main import run
    import keras  # noqa: F401
  imports = time.perf_counter() - started
  from throughput import subset_dir
  folder = subset_dir(_bench_files(images), images, os.path.join(tempfile.gettempdir(), "embed-images-bench"))
  with tempfile.TemporaryDirectory() as out:
    status = run(["--input", os.path.join(folder, "*.jpg"), "--output", out,
                  "--backbones", "mobilenet_v2", "--weights", "random", "--overwrite"])
    ran = time.perf_counter() - started - imports
  if v["freeze_at_exit"]:
    gc.freeze()
  return {"imports_s": imports, "run_s": ran, "status": status, "end": time.time()}


def _startup_table(variants, rounds, images):
  results = {name: [] for name in variants}
  for r in range(rounds):
    for name, v in variants.items():
      res = _run("startup", v, images)
      res["exit_s"] = time.time() - res.pop("end")  # the child printed its result, then exited
      results[name].append(res)
      print(f"  round {r + 1} {name:64} imports {res['imports_s']:5.2f} s  run {res['run_s']:5.2f} s"
            f"  exit {res['exit_s']:5.2f} s", flush=True)
  print()
  print(f"{'variant':64} {'imports s':>16} {'run s':>16} {'exit s':>16}   (median [min-max])")
  for name, rs in results.items():
    cells = []
    for key in ("imports_s", "run_s", "exit_s"):
      xs = [x[key] for x in rs]
      cells.append(f"{statistics.median(xs):5.2f} [{min(xs):.2f}-{max(xs):.2f}]")
    print(f"{name:64} " + " ".join(f"{c:>16}" for c in cells))


def _run(kind, variant, images):
  cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--variant", json.dumps(variant),
         "--images", str(images if not variant.get("xla") else min(images, 64))]
  if WAIT_QUIET:
    from throughput import wait_for_quiet
    wait_for_quiet(WAIT_QUIET)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO, **variant.get("env", {}))
  out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
  for line in reversed(out.stdout.splitlines()):
    if line.startswith("RESULT "):
      return json.loads(line[7:])
  raise RuntimeError(out.stderr[-3000:])


def _table(variants, kind, rounds, images):
  results = {name: [] for name in variants}
  for r in range(rounds):
    for name, v in variants.items():
      res = _run(kind, v, images)
      results[name].append(res)
      print(f"  round {r + 1} {name:38} {res['img_s']:7.1f} img/s  {res['cpu_ms']:6.2f} cpu ms/img", flush=True)
  print()
  print(f"{'variant':40} {'img/s median [min-max]':>26} {'cpu ms/img median':>18}")
  for name, rs in results.items():
    rates = [x["img_s"] for x in rs]
    print(f"{name:40} {statistics.median(rates):8.1f} [{min(rates):.1f}-{max(rates):.1f}]"
          f"{statistics.median(x['cpu_ms'] for x in rs):>18.2f}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("what", nargs="?", choices=("forward", "overlap", "decode", "startup"))
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--images", type=int, default=512)
  parser.add_argument("--only", default="", help="comma list of variant names (substring match)")
  parser.add_argument("--wait-quiet", type=float, default=120,
                      help="before each run, wait up to this long for other processes to go quiet")
  parser.add_argument("--child", help=argparse.SUPPRESS)
  parser.add_argument("--variant", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    v = json.loads(args.variant)
    res = {"forward": lambda: child_forward(v, args.images), "overlap": lambda: child_overlap(v, args.images),
           "decode": lambda: child_decode(args.images),
           "startup": lambda: child_startup(v, args.images)}[args.child]()
    print("RESULT " + json.dumps(res), flush=True)
    return
  global WAIT_QUIET
  WAIT_QUIET = args.wait_quiet
  print(f"{os.cpu_count()} CPUs; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
  if args.what == "decode":
    for label, res in _run("decode", {}, args.images).items():
      print(f"{label:40} {res['img_s']:7.1f} img/s  {res['cpu_ms']:6.2f} cpu ms/img")
    return
  if args.what == "startup":
    _startup_table(STARTUP_VARIANTS, args.rounds, 64)
    return
  variants = FORWARD_VARIANTS if args.what == "forward" else OVERLAP_VARIANTS
  if args.only:
    keys = [k.strip() for k in args.only.split(",")]
    variants = {n: v for n, v in variants.items() if any(k in n for k in keys)}
  _table(variants, args.what, args.rounds, args.images)


if __name__ == "__main__":
  main()
