"""How many images/s the decode side feeds to a model, per core, with and without decode isolation.

    python benchmarks/decode_feed.py [--n 1024] [--sizes 224,32] [--repeats 3]

On the throughput benchmark's JPEGs (500x375, quality 90; benchmarks/throughput.py makes and
caches them), in this one process and one run, for each target size and for 1 and 2 workers:

  in-process: `load_file` (read + sha256 + decode + resize, what the embed step does per file) in a
              thread pool of W threads, decoding in this process: the path before decode isolation;
  isolated:   the same `load_file` in a thread pool, each decode sent to a DecodePool of W decode
              processes (transforms/decode_pool.py), as the embed step now does.

It prints the median (and min-max) over the repeats of img/s and of img/s per worker (a worker
is a thread or a decode process, i.e. a core when W <= the machine's cores), and the isolated /
in-process ratio. Every isolated array is compared with the in-process one: they must be equal.
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

from benchmarks.throughput import make_images  # noqa: E402


def feed_rate(paths, spec, workers, pool=None):
  from transforms.load import load_file
  decoder = pool
  with concurrent.futures.ThreadPoolExecutor(workers if pool is None else max(workers, 4)) as threads:
    list(threads.map(lambda p: load_file(p, spec, decoder), paths[:8]))  # warm: caches, processes started
    started = time.perf_counter()
    loaded = list(threads.map(lambda p: load_file(p, spec, decoder), paths))
    seconds = time.perf_counter() - started
  failed = [item.uri for item in loaded if item.error]
  if failed:
    raise SystemExit(f"decode failed for {failed[:3]}")
  return len(paths) / seconds, loaded


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=1024)
  parser.add_argument("--sizes", default="224,32")
  parser.add_argument("--workers", default="1,2")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "embed-images-bench"))
  args = parser.parse_args(argv)

  import numpy as np

  from transforms.decode import PIL_MAX_PIXELS, DecodeSpec
  from transforms.decode_pool import DecodePool, default_memory_ceiling
  paths = make_images(args.n, args.cache_dir)
  print(f"machine: {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), python {sys.version.split()[0]}")
  print(f"{args.n} JPEGs of 500x375; median [min-max] of {args.repeats} repeats\n")
  print(f"{'size':>5} {'workers':>7} {'in-process img/s':>22} {'isolated img/s':>22} {'per worker (in/iso)':>20} {'ratio':>6}")
  memory = default_memory_ceiling(PIL_MAX_PIXELS)
  for size in (int(s) for s in args.sizes.split(",")):
    spec = DecodeSpec(sizes=(size,), max_pixels=PIL_MAX_PIXELS, memory=memory)
    for workers in (int(w) for w in args.workers.split(",")):
      pool = DecodePool(workers, memory)
      try:
        plain, isolated = [], []
        for _ in range(args.repeats):  # interleaved, so drift hits both alike
          rate, reference = feed_rate(paths, spec, workers)
          plain.append(rate)
          rate, got = feed_rate(paths, spec, workers, pool)
          isolated.append(rate)
        for a, b in zip(reference, got):
          if not np.array_equal(a.image.arrays[size], b.image.arrays[size]):
            raise SystemExit(f"isolated decode differs from in-process for {a.uri}")
      finally:
        pool.close()
      p, i = statistics.median(plain), statistics.median(isolated)
      print(f"{size:>5} {workers:>7} {p:>9.0f} [{min(plain):.0f}-{max(plain):.0f}] {i:>11.0f} "
            f"[{min(isolated):.0f}-{max(isolated):.0f}] {p / workers:>9.0f} / {i / workers:<8.0f} {i / p:>6.2f}")


if __name__ == "__main__":
  main()
