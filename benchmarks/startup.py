"""A small run's whole-process wall time: embed-images against the plain Keras recipe on the same images, interleaved.

    python benchmarks/startup.py [--n 256] [--backbones mobilenet_v2] [--repeats 3] [--phases]
                                 [-- extra embed-images options]

On the first N of the throughput benchmark's JPEGs (500x375), each repeat runs, one after the
other, as whole child processes timed from start to exit (imports, model building, first batch,
writing and exit included):

  keras:    throughput.py's plain recipe (load_img, img_to_array, preprocess_input,
            model.predict batch by batch, one Parquet file), seeded random weights;
  pipeline: `embed-images --input DIR/*.jpg --backbones BACKBONES --weights random` with default
            options (decode isolation and checkpoints on), plus any extra options given.

The order alternates between repeats, so a slow spell of the shared host falls on both sides;
it prints each side's best (least disturbed) time and pipeline / keras (issue 16: <= 1.0, "not
slower than plain Keras"). With --phases it first runs `python -m pipeline` once per engine
(tensorflow, and openvino where installed) on the same images, with its steps timed from inside the
process (benchmarks/startup_phases.py: interpreter start-up, each import, launch checks, graph,
runner, decode processes, model build, trace, freeze or OpenVINO's conversion and compilation,
first and second batch, interpreter exit), and prints them in the order they began: twice per
engine, with an empty cache of models (transforms/model_cache.py) and with the one the first run
filled.
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from benchmarks.throughput import _machine, make_images, run_child, subset_dir  # noqa: E402

def phases(args, images, engine, extra, model_cache, title):
  """One whole `python -m pipeline` run of the N images on `engine` with `model_cache` as its cache
  of models, its steps timed (benchmarks/startup_phases.py); prints them in the order they began
  and returns them."""
  size = ["--image-size", str(args.image_size)] if args.image_size else []
  out = tempfile.mkdtemp(prefix=f"phases-{engine}-", dir=args.cache_dir)
  argv = ["--input", os.path.join(images, "*.jpg"), "--output", out, "--backbones", args.backbones,
          "--weights", "random", "--batch-size", str(args.batch_size), "--overwrite", "--engine", engine,
          *size, *extra]
  env = dict(os.environ, PYTHONPATH=REPO, EMBED_IMAGES_MODEL_CACHE=model_cache)
  spawned = time.time()
  began = time.perf_counter()
  done = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "startup_phases.py"), repr(spawned), "--",
                         *argv], cwd=REPO, env=env, capture_output=True, text=True)
  wall = time.perf_counter() - began
  line = [l for l in done.stdout.splitlines() if l.startswith("PHASES ")]
  if done.returncode or not line:
    raise SystemExit(f"the {engine} run exited {done.returncode}: {done.stderr[-2000:]}")
  result = json.loads(line[-1][len("PHASES "):])
  steps = {}
  for name, start, end in result["events"]:
    first, spent, calls = steps.get(name, (start, 0.0, 0))
    steps[name] = (min(first, start), spent + end - start, calls + 1)
  offset = -min(first for first, _, _ in steps.values())  # the interpreter's start-up began at 0
  steps["interpreter exit (after main returned)"] = (result["end"], wall - offset - result["end"], 1)
  print(f"phases of one whole run, --engine {engine}, {title} ({args.n} images; wall {wall:.2f} s, spawn to exit):")
  for name, (first, spent, calls) in sorted(steps.items(), key=lambda item: item[1][0]):
    count = f" x{calls}" if calls > 1 else ""
    print(f"  {name + count:66} {spent:6.2f} s   (from {first + offset:5.2f} s)")
  batches = [spent for name, (_, spent, _) in steps.items() if name.endswith("(forward)")]
  first_rows = steps["first batch (forward)"]
  normal = steps.get("second batch (forward)", first_rows)[1]
  startup = first_rows[0] + offset + first_rows[1] - normal
  print(f"  start-up (until the first batch's rows, less one normal batch) {startup:6.2f} s; model time over all "
        f"batches {sum(batches):.2f} s; wall {wall:.2f} s", flush=True)
  return {"steps": steps, "wall": wall, "startup": startup}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=256)
  parser.add_argument("--backbones", default="mobilenet_v2")
  parser.add_argument("--image-size", type=int, default=None)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--phases", action="store_true",
                      help="first time the steps of one whole run per engine (tensorflow, and openvino where "
                           "installed); with --repeats 0, only that")
  parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "embed-images-bench"))
  args, extra = parser.parse_known_args(argv)
  extra = [a for a in extra if a != "--"]
  os.makedirs(args.cache_dir, exist_ok=True)
  paths = make_images(args.n, args.cache_dir)
  images = subset_dir(paths, args.n, args.cache_dir)
  work = tempfile.mkdtemp(prefix="startup-", dir=args.cache_dir)
  print(f"machine: {_machine()}")
  print(f"{args.backbones} ({args.image_size or 'native'} px), weights random, {args.n} JPEGs, batch "
        f"{args.batch_size}, best of {args.repeats}; pipeline options: {' '.join(extra) or '(defaults)'}",
        flush=True)
  if args.phases:
    engines = ["tensorflow"] + (["openvino"] if importlib.util.find_spec("openvino") else [])
    for engine in engines:
      # A cache of models of this run's own: empty for the first run, filled by it for the second.
      cache = tempfile.mkdtemp(prefix=f"model-cache-{engine}-", dir=args.cache_dir)
      cold = phases(args, images, engine, extra, cache, "model cache empty")
      warm = phases(args, images, engine, extra, cache, "model cache filled by the run before")
      print(f"  {engine}: start-up {cold['startup']:.2f} s -> {warm['startup']:.2f} s with the model cache; "
            f"wall {cold['wall']:.2f} s -> {warm['wall']:.2f} s", flush=True)
    if args.repeats == 0:
      return
  size = ["--image-size", str(args.image_size)] if args.image_size else []
  commands = {
      "keras": [sys.executable, os.path.join(REPO, "benchmarks", "throughput.py"), "--mode", "keras",
                "--images", images, "--backbones", args.backbones, "--batch-size", str(args.batch_size),
                "--cache-dir", args.cache_dir, *size],
      "pipeline": [sys.executable, "-m", "pipeline", "--input", os.path.join(images, "*.jpg"), "--backbones",
                   args.backbones, "--weights", "random", "--batch-size", str(args.batch_size), "--overwrite",
                   *size, *extra],
  }
  seconds = {side: [] for side in commands}
  for r in range(args.repeats):
    for side in (("keras", "pipeline") if r % 2 == 0 else ("pipeline", "keras")):
      out = os.path.join(work, f"{side}-{r}")
      os.makedirs(out, exist_ok=True)
      cmd = commands[side] + (["--output", out] if side == "pipeline" else ["--out", out])
      child = run_child(cmd, os.path.join(work, f"{side}-{r}"), 1800)
      if child["rc"] != 0:
        raise SystemExit(f"{side} exited {child['rc']}; see {child['log']}.err")
      seconds[side].append(child["seconds"])
      print(f"  repeat {r + 1}/{args.repeats} {side:>8} {child['seconds']:6.2f} s (cpu {child['cpu']:5.1f} s, "
            f"others on the machine {child['others'] / child['seconds']:.2f} cores)", flush=True)
  best = {side: min(values) for side, values in seconds.items()}
  print(f"plain Keras recipe, whole process     {best['keras']:6.2f} s (best of {args.repeats})")
  print(f"embed-images, whole process           {best['pipeline']:6.2f} s (best of {args.repeats})")
  ratio = best["pipeline"] / best["keras"]
  print(f"pipeline / keras wall time            {ratio:6.2f}   (issue 16's target: <= 1.00: "
        f"{'met' if ratio <= 1.0 else 'NOT met'})")


if __name__ == "__main__":
  main()
