"""Time and peak memory of `embed-images report` on synthetic outputs of 100k and 1M rows, against a plain scan of the same vectors.

    python benchmarks/report_scale.py [--rows 100000,1000000] [--dim 2048] [--dir /tmp/report-scale] [--keep]

Per size, a fake run's output is written once (reused while its `_params.json` matches): rows of
seeded random vectors (two "backbones" of dim/2 each, 10 labels whose means differ so the probes
have something to find), 8,192-row groups as the pipeline writes them (snappy, no dictionary), one
file per 131,072 rows, 1% of rows repeating another row's sha256, and uris that are hard links to
the sample photos (10,000 names), so the thumbnails are real reads and decodes. 1M x 2,048 float32
is 8 GB on disk: check `df -h` for --dir.

Then, per size, two whole processes: the baseline, a pyarrow scan of every row group's embedding
column into numpy (what any reader of all the vectors pays), and `python -m pipeline report` with
its defaults (--sample 5000, --neighbours 8). It prints each one's wall time and peak RSS (the
process's own VmHWM, by wait4), and the ratio report / scan.
"""

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from transforms.write import LAYOUT_KEY, SUCCESS_FILE, embeddings_schema, rows_to_table  # noqa: E402

ROW_GROUP = 8192
FILE_ROWS = 131072
LABELS = 10
IMAGE_NAMES = 10000

SCAN = """
import sys, glob, pyarrow.parquet as pq
sys.path.insert(0, {repo!r})
from transforms.write import embedding_matrix
total = 0.0
for path in sorted(glob.glob({pattern!r})):
  f = pq.ParquetFile(path)
  for g in range(f.metadata.num_row_groups):
    total += float(embedding_matrix(f.read_row_group(g, columns=["embedding"]).column("embedding"))[:, 0].sum())
print(total)
"""


def _images(root: str) -> list:
  """IMAGE_NAMES hard links to the sample photos, made once."""
  folder = os.path.join(root, "images")
  photos = sorted(os.path.join(REPO, "samples", n) for n in os.listdir(os.path.join(REPO, "samples")) if n.endswith(".jpg"))
  names = [os.path.join(folder, f"{i:05d}.jpg") for i in range(IMAGE_NAMES)]
  if not os.path.exists(names[-1]):
    os.makedirs(folder, exist_ok=True)
    for i, name in enumerate(names):
      if not os.path.exists(name):
        os.link(photos[i % len(photos)], name)
  return names


def write_run(path: str, rows: int, dim: int, images: list):
  params = {"rows": rows, "dim": dim, "row_group": ROW_GROUP, "file_rows": FILE_ROWS, "version": 2}
  marker = os.path.join(path, "_params.json")
  if os.path.exists(marker) and json.load(open(marker)) == params:
    return False
  shutil.rmtree(path, ignore_errors=True)
  os.makedirs(path)
  half = dim // 2
  layout = {"dim": dim, "pooling": "avg", "resize": "squash", "normalize": "none",
            "backbones": [{"name": "synthetic_a", "offset": 0, "dim": half, "input_size": 224},
                          {"name": "synthetic_b", "offset": half, "dim": dim - half, "input_size": 224}]}
  label_field = pa.field("label", pa.string())
  schema = embeddings_schema(dim, layout, (label_field,))
  rng = np.random.default_rng(7)
  means = rng.standard_normal((LABELS, dim)).astype(np.float32) * 0.03  # classes overlap: probes below 100%
  for part, start in enumerate(range(0, rows, FILE_ROWS)):
    stop = min(rows, start + FILE_ROWS)
    name = os.path.join(path, f"embeddings-{part:05d}-of-{-(-rows // FILE_ROWS):05d}.parquet")
    with pq.ParquetWriter(name, schema, compression="snappy", use_dictionary=False) as writer:
      for lo in range(start, stop, ROW_GROUP):
        hi = min(stop, lo + ROW_GROUP)
        labels = rng.integers(0, LABELS, hi - lo)
        vectors = rng.standard_normal((hi - lo, dim), dtype=np.float32) + means[labels]
        # 1% of rows (every 100th) are byte copies of an earlier row.
        sha = [hashlib.sha256(str(i // 2 if i % 100 == 0 else i).encode()).hexdigest() for i in range(lo, hi)]
        table = rows_to_table([images[i % len(images)] for i in range(lo, hi)], sha, [500] * (hi - lo),
                              [375] * (hi - lo), vectors, {"label": [f"class{l}" for l in labels]}, (label_field,))
        writer.write_table(table.replace_schema_metadata(schema.metadata), row_group_size=ROW_GROUP)
  summary = {"status": "ok", "counts": {"matched": rows, "embedded": rows, "failed": 0}, "layout": layout,
             "output": path, "warnings": ["synthetic output written by benchmarks/report_scale.py"]}
  with open(os.path.join(path, SUCCESS_FILE), "w") as f:
    json.dump(summary, f)
  with open(marker, "w") as f:
    json.dump(params, f)
  return True


def measure(cmd) -> tuple:
  """(wall seconds, peak RSS bytes) of one whole process."""
  started = time.perf_counter()
  process = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  err = process.stderr.read()
  _, status, usage = os.wait4(process.pid, 0)
  process.returncode = os.waitstatus_to_exitcode(status)
  seconds = time.perf_counter() - started
  if process.returncode:
    raise SystemExit(f"{cmd[:4]} failed ({process.returncode}): {err.decode()[-2000:]}")
  return seconds, usage.ru_maxrss * 1024


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", default="100000,1000000")
  parser.add_argument("--dim", type=int, default=2048)
  parser.add_argument("--dir", default="/tmp/report-scale")
  parser.add_argument("--keep", action="store_true", help="keep the synthetic outputs (default: delete them at the end)")
  args = parser.parse_args(argv)
  os.makedirs(args.dir, exist_ok=True)
  images = _images(args.dir)
  env_note = f"{os.cpu_count()} CPUs; {resource.getpagesize()} B pages"
  print(f"report_scale: dim {args.dim}; {env_note}", flush=True)
  made = []
  for rows in [int(r) for r in args.rows.split(",")]:
    path = os.path.join(args.dir, f"run-{rows}x{args.dim}")
    started = time.perf_counter()
    if write_run(path, rows, args.dim, images):
      made.append(path)
      print(f"  wrote {rows:,} rows in {time.perf_counter() - started:.0f}s", flush=True)
    scan_s, scan_rss = measure([sys.executable, "-c", SCAN.format(repo=REPO, pattern=os.path.join(path, "embeddings-*.parquet"))])
    page = os.path.join(path, "report.html")
    report_s, report_rss = measure([sys.executable, "-m", "pipeline", "report", path, "--html", page])
    print(f"{rows:>9,} rows x {args.dim}: scan {scan_s:6.1f}s {scan_rss / 2**30:5.2f} GiB | report {report_s:6.1f}s "
          f"{report_rss / 2**30:5.2f} GiB peak RSS | report/scan {report_s / scan_s:4.2f}x | page "
          f"{os.path.getsize(page) / 2**20:.1f} MiB", flush=True)
  if not args.keep:
    for path in made:
      shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
  main()
