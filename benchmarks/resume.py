"""What checkpoints cost a run, and what a resume of a 90%-done run costs against a full run.

    python benchmarks/resume.py [--n 3072] [--backbones mobilenet_v2] [--image-size 224] [--repeats 2]

On the throughput benchmark's JPEGs (500x375), whole `embed-images` processes, per repeat:

  (the three full runs in turned-round order from one repeat to the next)
  off:     a full run with --checkpoint-every 0 (no checkpoints: the run before this feature);
  default: a full run with the default --checkpoint-every 30 (rows written twice: checkpoints and
           the final shards);
  often:   a full run with --checkpoint-every 1 (a commit a second);
  resume:  --resume of an output whose checkpoints hold 90% of the rows, committed by a run over
           those 90% (the state a kill at 90% leaves, with the files' listings unchanged).

It prints each time and the ratios default/off, often/off (the cost of checkpointing) and
resume/off (the time a resume of a 90%-done run takes against a full run), and checks that the
resumed output holds every row once and equals the full run's to 1e-5.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from benchmarks.throughput import make_images  # noqa: E402


def embed(inputs, out, args, *extra):
  cmd = [sys.executable, "-m", "pipeline", "--input", f"{inputs}/*.jpg", "--output", out,
         "--backbones", args.backbones, "--weights", "random", "--overwrite", *extra]
  if args.image_size:
    cmd += ["--image-size", str(args.image_size)]
  started = time.perf_counter()
  done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  seconds = time.perf_counter() - started
  if done.returncode != 0:
    raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
  return seconds


def committed_state(out, ninety_out):
  """Turns the finished run over 90% of the files into checkpoints of `out`, as a kill leaves them."""
  import pyarrow.parquet as pq
  from transforms import checkpoint
  # The rows hold each file's listing, as a checkpoint does.
  table = pq.read_table(sorted(os.path.join(ninety_out, f) for f in os.listdir(ninety_out)
                               if f.startswith("embeddings-")))
  with open(os.path.join(ninety_out, "_SUCCESS.json")) as f:
    layout = json.load(f)["layout"]
  shutil.rmtree(out, ignore_errors=True)
  checkpoint.write_layout(out, layout)
  for i, start in enumerate(range(0, table.num_rows, 4096)):
    pq.write_table(table.slice(start, 4096), os.path.join(out, "_checkpoints", f"embeddings-dead-run-{i:06d}.parquet"))
  return table.num_rows


def check(out, reference, n):
  import numpy as np
  import pyarrow.parquet as pq
  from transforms.write import embedding_matrix

  def rows(d):
    table = pq.read_table(sorted(os.path.join(d, f) for f in os.listdir(d) if f.startswith("embeddings-")))
    return dict(zip(table.column("uri").to_pylist(), embedding_matrix(table.column("embedding"))))

  got, want = rows(out), rows(reference)
  assert len(got) == len(want) == n, (len(got), len(want), n)
  # In float64: float32 squares of tiny pooled values (random weights) underflow to a 0 that would pass any bound.
  worst = max(float(np.linalg.norm(np.float64(got[u]) - want[u]) / max(np.linalg.norm(np.float64(want[u])), 1e-30))
              for u in want)
  assert worst < 1e-5, worst
  with open(os.path.join(out, "_SUCCESS.json")) as f:
    return json.load(f)["counts"], worst


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=3072)
  parser.add_argument("--backbones", default="mobilenet_v2")
  parser.add_argument("--image-size", type=int, default=None)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "embed-images-bench"))
  args = parser.parse_args(argv)

  paths = make_images(args.n, args.cache_dir)
  work = tempfile.mkdtemp(prefix="resume-", dir=args.cache_dir)
  full, ninety = os.path.join(work, "full"), os.path.join(work, "ninety")
  os.makedirs(full)
  os.makedirs(ninety)
  keep = int(args.n * 0.9)
  for i, path in enumerate(paths):
    os.symlink(path, os.path.join(full, os.path.basename(path)))
    if i < keep:
      os.symlink(os.path.join(full, os.path.basename(path)), os.path.join(ninety, os.path.basename(path)))
  print(f"machine: {os.cpu_count()} cores; {args.n} JPEGs of 500x375; {args.backbones} "
        f"at {args.image_size or 'its native size'}; whole processes; {args.repeats} repeats\n")
  times = {k: [] for k in ("off", "default", "often", "resume")}
  # The 90% run's rows, made once: a full-speed run over those files (its time is not reported).
  embed(ninety, os.path.join(work, "ninety-out"), args, "--checkpoint-every", "0")
  # The ninety/ links point into full/, so uris differ; checkpoints must name full/'s files.
  ninety_rows = os.path.join(work, "ninety-as-full")
  variants = {"off": ("--checkpoint-every", "0"), "default": (), "often": ("--checkpoint-every", "1")}
  for repeat in range(args.repeats):
    # The order turns round each repeat, so that a drift of the machine hits every variant alike.
    order = list(variants) if repeat % 2 == 0 else list(variants)[::-1]
    for name in order:
      times[name].append(embed(full, os.path.join(work, name), args, *variants[name]))
    if repeat == 0:
      _rename_uris(os.path.join(work, "ninety-out"), ninety_rows, ninety + "/", full + "/")
    out = os.path.join(work, "resume")
    committed = committed_state(out, ninety_rows)
    times["resume"].append(embed(full, out, args, "--resume"))
    counts, worst = check(out, os.path.join(work, "off"), args.n)
    assert counts["resumed"] == committed and counts["embedded"] == args.n - committed, counts
    print(f"  repeat {repeat + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items())
          + f"; resumed {counts['resumed']}, embedded {counts['embedded']}, max relative L2 to the full run {worst:.1e}")
  med = {k: statistics.median(v) for k, v in times.items()}
  print()
  for k, label in (("off", "full run, --checkpoint-every 0"), ("default", "full run, --checkpoint-every 30 (default)"),
                   ("often", "full run, --checkpoint-every 1"), ("resume", "--resume of a 90%-done run")):
    print(f"{label:45s} {med[k]:7.1f} s [{min(times[k]):.1f}-{max(times[k]):.1f}]  {med[k] / med['off']:.3f} x off")
  print("\ncheckpoint cost: default/off - 1 = "
        f"{med['default'] / med['off'] - 1:+.1%}; every second: {med['often'] / med['off'] - 1:+.1%}")


def _rename_uris(source, target, old_prefix, new_prefix):
  """A copy of the run in `source` whose uris name the full/ folder's files."""
  import pyarrow.compute as pc
  import pyarrow.parquet as pq
  shutil.rmtree(target, ignore_errors=True)
  os.makedirs(target)
  for name in os.listdir(source):
    if name.startswith("embeddings-"):
      table = pq.read_table(os.path.join(source, name))
      uris = pc.replace_substring(table.column("uri"), old_prefix, new_prefix)
      table = table.set_column(table.schema.get_field_index("uri"), "uri", uris)
      pq.write_table(table, os.path.join(target, name))
  shutil.copy(os.path.join(source, "_SUCCESS.json"), target)


if __name__ == "__main__":
  main()
