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
slower than plain Keras"). With --phases it first prints where one process's start-up goes
(imports, model build, freeze, first batches, decode processes), each timed in turn.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from benchmarks.throughput import _machine, make_images, run_child, subset_dir  # noqa: E402

PHASES = r"""
import sys, time
started = time.perf_counter()
last = [started]
def lap(name):
  now = time.perf_counter()
  print(f"  {name:44} {now - last[0]:6.2f} s   (at {now - started:5.2f} s)", flush=True)
  last[0] = now
import numpy as np, PIL.Image; lap("import numpy, Pillow")
import apache_beam; lap("import apache_beam")
import tensorflow, keras; lap("import tensorflow, keras")
import pipeline.main; lap("import pipeline.main (the rest of ours)")
from transforms import fused as embed
from transforms.weights import BackboneSpec, resolve_weights
name, size, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
spec = BackboneSpec(name, size, resolve_weights("random", name, size))
freeze, embed._freeze = embed._freeze, lambda forward, models: None
model = embed.FusedModel([spec]); lap("build the model (keras.applications)")
model._forward.get_concrete_function(); lap("trace the forward function")
frozen = freeze(model._forward, model.models); lap("freeze (convert_variables_to_constants_v2)")
batch = np.zeros((32, size, size, 3), np.uint8)
if frozen is not None:
  frozen(batch); lap("first batch of 32, frozen (Grappler)")
  frozen(batch); lap("second batch of 32, frozen")
model._forward(batch); lap("first batch of 32, variables")
model._forward(batch); lap("second batch of 32, variables")
from transforms.decode import DecodeSpec
from transforms.decode_pool import DecodePool
pool = DecodePool(2, None)
pool.decode(open(path, "rb").read(), DecodeSpec(sizes=(size,))); lap("start 2 decode processes, first decode")
pool.close()
"""


def phases(args, first_image):
  from transforms.backbones import get_backbone
  name = args.backbones.split(",")[0]
  size = args.image_size or get_backbone(name).native_size
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
  print(f"start-up phases in one process ({name} at {size} px), each timed in turn:", flush=True)
  done = subprocess.run([sys.executable, "-c", PHASES, name, str(size), first_image], cwd=REPO, env=env,
                        capture_output=True, text=True)
  print(done.stdout, end="")
  if done.returncode:
    print(done.stderr[-2000:])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=256)
  parser.add_argument("--backbones", default="mobilenet_v2")
  parser.add_argument("--image-size", type=int, default=None)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--phases", action="store_true", help="first print where one process's start-up goes")
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
    phases(args, paths[0])
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
