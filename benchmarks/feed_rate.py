"""The CPU side's feed rate: the pipeline with a near-free model against the serial limit of decode + forward.

    python benchmarks/feed_rate.py [--n 3072] [--size 32] [--backbone mobilenet_v3_small] [--repeats 2] [--wait-quiet 60]
                                   [-- extra embed-images options, e.g. --direct_num_workers 2 ...]

On the throughput benchmark's JPEGs (500x375; N made once, 4N as links to them), in one run:

  decode:   Pillow decode + bilinear resize to --size (`decode_and_resize`, in this process) on
            as many threads as the machine has cores, best of --repeats;
  forward:  the near-free model's bare forward pass (tf.function over uint8 batches of 32), best
            of --repeats;
  limit:    1 / (1/decode + 1/forward): both on the same cores, one after the other;
  pipeline: `embed-images --backbones BACKBONE --image-size SIZE --weights random` as whole
            processes on N and 4N files, best of --repeats each; marginal = 3N / (t(4N) - t(N)),
            with default options (decode isolation and checkpoints on).

Each repeat measures all four side by side (decode, forward, N, 4N), and with --repeats > 1 prints
its own ratio: the spread between repeats is what this VM's drift does to one ratio.

`--against DIR` (another checkout of this repository, e.g. `git worktree add /tmp/before REV`):
each repeat also runs that tree's pipeline on the same N and 4N files, the two trees' order
alternated from repeat to repeat, and prints both trees' per-repeat ratios and their medians: a
before/after within one run, where two runs minutes apart carry this VM's drift.

It prints each rate and the pipeline's marginal rate over the limit (issue 16's target: 0.85);
and, per image, the CPU time of each side (the pipeline's: its whole process tree, decode
processes included, marginal between N and 4N), which other processes on the machine disturb far
less than wall time: (decode + forward) CPU over the pipeline's is the share of its CPU that the
work itself needs.
"""

import argparse
import concurrent.futures
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from benchmarks.throughput import make_images, run_child, wait_for_quiet  # noqa: E402


def decode_rate(paths, size):
  """(img/s, CPU seconds an image)."""
  from transforms.decode import decode_and_resize
  data = [open(p, "rb").read() for p in paths]
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
    list(pool.map(lambda d: decode_and_resize(d, (size,)), data[:16]))
    started, cpu = time.perf_counter(), time.process_time()
    list(pool.map(lambda d: decode_and_resize(d, (size,)), data))
  return len(data) / (time.perf_counter() - started), (time.process_time() - cpu) / len(data)


def forward_rate(n, size, backbone):
  import numpy as np
  import tensorflow as tf
  from transforms.fused import FusedModel
  from transforms.weights import BackboneSpec, resolve_weights
  model = FusedModel([BackboneSpec(backbone, size, resolve_weights("random", backbone, size))])
  batch = np.random.default_rng(0).integers(0, 256, (32, size, size, 3), dtype=np.uint8)
  model({size: batch})
  started, cpu = time.perf_counter(), time.process_time()
  for _ in range(n // 32):
    model({size: batch})
  del tf
  images = (n // 32) * 32
  return images / (time.perf_counter() - started), (time.process_time() - cpu) / images


def pipeline_run(folder, out, args, extra, repo=REPO):
  """(wall seconds, CPU seconds of the whole process tree, decode processes included)."""
  cmd = [sys.executable, "-m", "pipeline", "--input", f"{folder}/*.jpg", "--output", out, "--overwrite",
         "--backbones", args.backbone, "--image-size", str(args.size), "--weights", "random", *extra]
  child = run_child(cmd, out + "-log", 3600, repo=repo)
  if child["rc"] != 0:
    with open(child["log"] + ".err") as f:
      raise SystemExit(f.read()[-3000:])
  return child["seconds"], child["cpu"]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=3072)
  parser.add_argument("--size", type=int, default=32)
  parser.add_argument("--backbone", default="mobilenet_v3_small")
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--end-to-end", action="store_true",
                      help="whole runs of N only: the end to end rate (start-up included) against the serial "
                           "limit, without the 4N runs the marginal rate needs")
  parser.add_argument("--wait-quiet", type=float, default=0,
                      help="before each measurement, wait up to this many seconds for other processes to use "
                           "under a quarter of a core (0: don't wait)")
  parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "embed-images-bench"))
  parser.add_argument("--against", metavar="DIR",
                      help="another checkout whose pipeline runs beside this one's in every repeat, order alternated")
  args, extra = parser.parse_known_args(argv)
  extra = [a for a in extra if a != "--"]
  paths = make_images(args.n, args.cache_dir)
  work = tempfile.mkdtemp(prefix="feed-", dir=args.cache_dir)
  small, large = os.path.join(work, "n"), os.path.join(work, "4n")
  os.makedirs(small)
  os.makedirs(large)
  for i, path in enumerate(paths):
    os.symlink(path, os.path.join(small, f"{i:06d}.jpg"))
    for k in range(0 if args.end_to_end else 4):  # the 4N folder only for the marginal rate's runs
      os.symlink(path, os.path.join(large, f"{k}-{i:06d}.jpg"))
  print(f"machine: {os.cpu_count()} cores; {args.backbone} at {args.size} px; N={args.n}, 4N={4 * args.n}; "
        f"best of {args.repeats}; pipeline options: {' '.join(extra) or '(defaults)'}")
  def quiet():
    if args.wait_quiet:
      wait_for_quiet(args.wait_quiet)

  def quietly(measure, *a):
    quiet()
    return measure(*a)

  # Every measurement of a repeat side by side (the baselines, then N, then 4N): this VM's speed drifts by tens of
  # percent within minutes, and a limit measured minutes before the runs it divides carries that drift.
  decodes, forwards, runs, ratios = [], [], {"n": [], "4n": []}, []
  other, against = {"n": [], "4n": []}, {"this": [], "against": []}  # --against: the other tree's runs and ratios
  for r in range(args.repeats):
    decodes.append(quietly(decode_rate, paths, args.size))
    forwards.append(quietly(forward_rate, args.n, args.size, args.backbone))
    trees = [("this", REPO, runs)] + ([("against", os.path.abspath(args.against), other)] if args.against else [])
    for label, repo, tree_runs in (trees if r % 2 == 0 else trees[::-1]):
      for name, folder in (("n", small), ("4n", large))[:1 if args.end_to_end else 2]:
        quiet()
        tree_runs[name].append(pipeline_run(folder, os.path.join(work, f"out-{label}-{name}-{r}"), args, extra, repo))
    if args.against and not args.end_to_end:
      limit_r = 1 / (1 / decodes[-1][0] + 1 / forwards[-1][0])
      for label, repo, tree_runs in trees:
        marginal_r = 3 * args.n / (tree_runs["4n"][-1][0] - tree_runs["n"][-1][0])
        against[label].append(marginal_r / limit_r)
        print(f"repeat {r + 1}, {label} tree ({repo}): N {tree_runs['n'][-1][0]:.2f} s, 4N {tree_runs['4n'][-1][0]:.2f} s, "
              f"marginal {marginal_r:.0f} img/s: {marginal_r / limit_r:.3f} of the limit ({limit_r:.0f})", flush=True)
    if not args.end_to_end and args.repeats > 1:
      limit_r = 1 / (1 / decodes[-1][0] + 1 / forwards[-1][0])
      marginal_r = 3 * args.n / (runs["4n"][-1][0] - runs["n"][-1][0])
      ratios.append(marginal_r / limit_r)
      print(f"repeat {r + 1}: decode {decodes[-1][0]:.0f}, forward {forwards[-1][0]:.0f}, serial limit {limit_r:.0f}, "
            f"pipeline marginal {marginal_r:.0f} img/s: {marginal_r / limit_r:.2f} of the limit", flush=True)
  decode, decode_cpu = max(decodes)
  forward, forward_cpu = max(forwards)
  limit = 1 / (1 / decode + 1 / forward)
  t_small, c_small = min(runs["n"])
  print(f"decode + resize alone ({os.cpu_count()} threads)   {decode:8.0f} img/s   {1000 * decode_cpu:6.3f} ms CPU/img")
  print(f"bare forward alone                  {forward:8.0f} img/s   {1000 * forward_cpu:6.3f} ms CPU/img")
  print(f"serial limit 1/(1/decode+1/forward) {limit:8.0f} img/s   {1000 * (decode_cpu + forward_cpu):6.3f} ms CPU/img")
  # Start-up included: process start to exit, N images.
  print(f"end to end: N in {t_small:.1f} s, {args.n / t_small:8.0f} img/s; / serial limit {args.n / t_small / limit:.2f}"
        "   (issue 24's target for MobileNetV2 at 224, N=3072: >= 0.95)")
  if args.end_to_end:
    return
  t_large, c_large = min(runs["4n"])
  marginal = 3 * args.n / (t_large - t_small)
  # CPU per image hardly moves when other processes share the cores, where wall times do.
  cpu_small, cpu_large = min(c for _, c in runs["n"]), min(c for _, c in runs["4n"])
  marginal_cpu = (cpu_large - cpu_small) / (3 * args.n)
  print(f"pipeline: N in {t_small:.1f} s, 4N in {t_large:.1f} s; marginal {marginal:8.0f} img/s   "
        f"{1000 * marginal_cpu:6.3f} ms CPU/img (whole process tree)")
  print(f"pipeline / serial limit             {marginal / limit:8.2f}   (issue 16's target: >= 0.85; "
        "issue 20's: >= 1.0)")
  if ratios:
    print(f"the same within each repeat         {statistics.median(ratios):8.2f}   (median of "
          f"{', '.join(f'{x:.2f}' for x in ratios)})")
  for label, values in against.items():
    if values:
      print(f"{label} tree ({REPO if label == 'this' else os.path.abspath(args.against)}): median per-repeat ratio "
            f"{statistics.median(values):.3f} (of {', '.join(f'{x:.3f}' for x in values)})")
  print(f"CPU: (decode + forward) / pipeline  {(decode_cpu + forward_cpu) / marginal_cpu:8.2f}   "
        "(the share of the pipeline's CPU an image that decode and forward need)")
  # On a GPU worker the forward pass leaves the CPU; the rest of the pipeline's CPU stays there.
  side = marginal_cpu - forward_cpu
  print(f"CPU side (pipeline - forward)      {1000 * side:8.3f} ms CPU/img  ->  {1 / side:6.0f} img/s per vCPU "
        "(what one vCPU of a GPU worker feeds; README: vCPUs per GPU)")


if __name__ == "__main__":
  main()
