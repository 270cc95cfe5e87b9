"""The same images as loose files and as shards (tar, Parquet, TFRecord): images/s and requests per image, locally and on gs://.

    python benchmarks/shards.py [--n 1024] [--large 3072] [--shard-size 256] [--latency-ms 30]
                                [--repeats 1] [--rss-mb 400] [--skip local,gcs,rss]

On the throughput benchmark's JPEGs (500x375, quality 90), in one run:

  local:  `embed-images --backbones mobilenet_v3_small --image-size 32 --weights random` as a whole
          process (start to exit), over N loose files, then over the same N images in WebDataset
          tars, single-row-group Parquet files (img2dataset's layout: `key` + `jpg`) and TFRecords
          of tf.train.Example (`image/encoded` + `image/filename`), --shard-size images a shard;
          and again over --large images: a whole run at N is mostly start-up (imports, model
          build, ~7 s here), so the marginal rate (large - N) / (t(large) - t(N)) is what says
          how fast each format is read;
  gcs:    the same four inputs uploaded to the local GCS emulator and read through the latency
          proxy of benchmarks/gcs_reads.py (--latency-ms added to every request, which it counts by
          kind); the output is local, so the requests are the run's reads: listing, the launch's
          probe of the first shard of each format, and the images' or shards' bytes;
  rss:    peak RSS of a process that streams every member of ONE shard of --rss-mb MB of image
          bytes through transforms.shards.read_members (a Parquet file with one row group, a tar
          of the same images), against the same process importing alone, and its RSS when the
          first image is handed out (what was read before any image could be used). For Parquet
          also pyarrow alone with other reader settings (pre_buffer off; a read buffer_size), to
          say where the memory goes.

A near-free model (mobilenet_v3_small at 32 px) keeps the forward pass out of the way, so what
differs between formats is reading. Each run's rows are read back and matched to the loose run's
by sha256: the vectors must agree (max relative L2 printed) and every image must be there once.
Timings drift on a shared VM: compare ratios within one run only.
"""

import argparse
import io
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from benchmarks.throughput import make_images  # noqa: E402

FORMATS = ("loose", "tar", "parquet", "tfrecord")
MODEL = ("--backbones", "mobilenet_v3_small", "--image-size", "32", "--weights", "random", "--progress", "off")


# ---------------------------------------------------------------- datasets

def write_tar(path, items):
  with tarfile.open(path, "w") as tar:
    for key, data in items:
      info = tarfile.TarInfo(f"{key}.jpg")
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def write_parquet(path, items):
  import pyarrow as pa
  import pyarrow.parquet as pq
  table = pa.table({"key": pa.array([k for k, _ in items], pa.string()),
                    "jpg": pa.array([d for _, d in items], pa.binary())})
  # img2dataset writes a shard as one row group; JPEG neither compresses nor dictionary-encodes.
  pq.write_table(table, path, row_group_size=len(items), compression="none", use_dictionary=False)


def write_tfrecord(path, items):
  import tensorflow as tf
  with tf.io.TFRecordWriter(path) as writer:
    for key, data in items:
      feature = {"image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[data])),
                 "image/filename": tf.train.Feature(bytes_list=tf.train.BytesList(value=[key.encode()]))}
      writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())


WRITERS = {"tar": (write_tar, "tar"), "parquet": (write_parquet, "parquet"), "tfrecord": (write_tfrecord, "tfrecord")}


def build_datasets(paths, shard_size, root):
  """{format: (folder, glob pattern relative to it)}: the same images, loose and in each shard format."""
  items = [(os.path.splitext(os.path.basename(p))[0], open(p, "rb").read()) for p in paths]
  datasets = {}
  loose = os.path.join(root, "loose")
  os.makedirs(loose)
  for key, data in items:
    with open(os.path.join(loose, f"{key}.jpg"), "wb") as f:
      f.write(data)
  datasets["loose"] = (loose, "*.jpg")
  for kind, (write, extension) in WRITERS.items():
    folder = os.path.join(root, kind)
    os.makedirs(folder)
    for start in range(0, len(items), shard_size):
      write(os.path.join(folder, f"{start // shard_size:05d}.{extension}"), items[start:start + shard_size])
    datasets[kind] = (folder, f"*.{extension}")
  return datasets


def folder_bytes(folder):
  return sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder))


# ---------------------------------------------------------------- pipeline runs

def run_pipeline(pattern, out, env=None):
  """Whole-process wall seconds and CPU seconds (the child's tree) of one run."""
  cmd = [sys.executable, "-m", "pipeline", "--input", pattern, "--output", out, "--overwrite", *MODEL]
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  started = time.perf_counter()
  done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
  seconds = time.perf_counter() - started
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  if done.returncode != 0:
    raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
  cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
  return seconds, cpu


def read_vectors(out):
  """{sha256: vector} of a finished run, and how many rows and error rows it has."""
  import glob
  import pyarrow.parquet as pq
  from transforms.write import embedding_matrix
  table = pq.read_table(sorted(glob.glob(os.path.join(out, "embeddings-*.parquet"))))
  errors = pq.read_table(sorted(glob.glob(os.path.join(out, "errors-*.parquet"))))
  matrix = embedding_matrix(table.column("embedding"))
  return dict(zip(table.column("sha256").to_pylist(), matrix)), table.num_rows, errors.num_rows


def agreement(out, reference, n):
  """Max relative L2 of a run's vectors against the reference run's, by sha256; checks every image once."""
  import numpy as np
  got, rows, failed = read_vectors(out)
  if rows != n or failed or len(got) != n or not set(got) <= set(reference):
    raise SystemExit(f"{out}: {rows} rows, {failed} errors, {len(got)} distinct images; expected {n}")
  worst = 0.0
  for digest, vector in got.items():
    want = np.asarray(reference[digest], np.float64)  # float32 squares of tiny values underflow to 0
    worst = max(worst, float(np.linalg.norm(np.float64(vector) - want) / max(np.linalg.norm(want), 1e-30)))
  return worst


def pipeline_table(title, results, sizes, counted):
  """results: [(repeat, kind, {size: run})]; each repeat's loose run is the baseline of its ratios."""
  n, large = sizes[0], sizes[-1]
  print(f"\n{title}")
  head = (f"  {'format':9s} {'objects':>7s} {'MB':>6s} {'wall s':>7s} {'cpu s':>6s} {'img/s':>7s} "
          f"{'vs loose':>8s}")
  if large != n:
    head += f" {f'wall s {large}':>11s} {'marginal':>8s} {'vs loose':>8s} {'cpu ms/img':>10s}"
  if counted:
    head += f" {'requests':>8s} {'req/image':>9s}"
  print(head + "  max L2    requests by kind (at N)" if counted else head + "  max L2")
  for _, kind, runs in results:
    r = runs[n]
    if kind == "loose":  # each repeat starts with loose files: ratios within a repeat
      loose = runs
    line = (f"  {kind:9s} {r['objects']:7d} {r['mb']:6.1f} {r['seconds']:7.2f} {r['cpu']:6.1f} "
            f"{n / r['seconds']:7.1f} {loose[n]['seconds'] / r['seconds']:7.2f}x")
    if large != n:
      marginal = (large - n) / (runs[large]["seconds"] - r["seconds"])
      loose_marginal = (large - n) / (loose[large]["seconds"] - loose[n]["seconds"])
      # CPU time moves less than wall time when other work shares the cores
      cpu_ms = 1000 * (runs[large]["cpu"] - r["cpu"]) / (large - n)
      line += f" {runs[large]['seconds']:11.2f} {marginal:8.0f} {marginal / loose_marginal:7.2f}x {cpu_ms:10.2f}"
    if counted:
      line += f" {r['requests']:8d} {r['requests'] / n:9.4f}"
    line += f"  {max(run['l2'] for run in runs.values()):.1e}"
    if counted:
      line += "   " + ", ".join(f"{k} {v}" for k, v in sorted(r["kinds"].items()))
    print(line)


def measured_runs(datasets, sizes, repeats, work, where, pattern_of, env=None, counter=None):
  """[(repeat, kind, {size: run})], formats interleaved within each repeat; each run's rows checked
  against the first loose run's vectors (kept in datasets["reference"])."""
  results = []
  for repeat in range(repeats):
    for kind in FORMATS:
      runs = {}
      for size in sorted(sizes, reverse=True):  # the first run holds every image: the reference
        folder, _ = datasets[size][kind]
        out = os.path.join(work, f"out-{where}-{kind}-{size}")
        if counter:
          counter(reset=True)
        seconds, cpu = run_pipeline(pattern_of(size, kind), out, env)
        if "reference" not in datasets:
          datasets["reference"] = read_vectors(out)[0]
        run = {"seconds": seconds, "cpu": cpu, "objects": len(os.listdir(folder)),
               "mb": folder_bytes(folder) / 1e6, "l2": agreement(out, datasets["reference"], size)}
        if counter:
          stats = counter()
          run.update(requests=stats["requests"], kinds=stats.get("kinds", {}))
        runs[size] = run
        print(f"  {where:5s} {kind:9s} n={size:<6d} repeat {repeat + 1}: {seconds:6.2f} s"
              + (f", {run['requests']} requests" if counter else ""), flush=True)
      results.append((repeat, kind, runs))
  return results


def local_runs(datasets, sizes, repeats, work):
  def pattern_of(size, kind):
    folder, pattern = datasets[size][kind]
    return os.path.join(folder, pattern)
  return measured_runs(datasets, sizes, repeats, work, "local", pattern_of)


def gcs_runs(datasets, sizes, repeats, latency_ms, work):
  import logging
  logging.getLogger().setLevel(logging.ERROR)
  from apache_beam.io.filesystems import FileSystems
  from benchmarks.gcs_reads import LatencyProxy
  from tests.gcs_emulator import gcs_emulator

  with gcs_emulator("shards-bench") as bucket:
    for size in sizes:
      for kind in FORMATS:
        folder, _ = datasets[size][kind]
        for name in sorted(os.listdir(folder)):
          with FileSystems.create(f"gs://{bucket}/n{size}/{kind}/{name}", compression_type="uncompressed") as f:
            with open(os.path.join(folder, name), "rb") as source:
              f.write(source.read())

    def pattern_of(size, kind):
      return f"gs://{bucket}/n{size}/{kind}/{datasets[size][kind][1]}"
    # Uploads went straight to the emulator; the runs go through the proxy, which counts them.
    proxy = LatencyProxy(os.environ["STORAGE_EMULATOR_HOST"], latency_ms)
    try:
      env = dict(os.environ, STORAGE_EMULATOR_HOST=proxy.url)
      return measured_runs(datasets, sizes, repeats, work, "gcs", pattern_of, env, proxy.stats)
    finally:
      proxy.close()


# ---------------------------------------------------------------- peak RSS of streaming one shard

_STREAM = r"""
import sys, time
sys.path.insert(0, {repo!r})
from transforms import shards
def status(field):
  for line in open("/proc/self/status"):
    if line.startswith(field + ":"):
      return int(line.split()[1]) * 1024
mode, path = sys.argv[1], sys.argv[2]
members = images = 0
first = None  # RSS once the first image is in hand: what was read before any was given out
started = time.perf_counter()
if mode == "import":
  pass
elif mode.startswith("pyarrow"):
  # pyarrow alone, with the reader settings named in the mode; the same batch size as read_members
  import pyarrow.parquet as pq
  kwargs = {{"pre_buffer": False}} if "nopre" in mode else {{}}
  if "buffer" in mode:
    kwargs["buffer_size"] = 1 << 20
  with open(path, "rb") as f:
    for batch in pq.ParquetFile(f, **kwargs).iter_batches(batch_size=shards._PARQUET_BATCH_ROWS):
      for value in batch.column(1).to_pylist():
        members += 1
        images += len(value)
        first = first or status("VmRSS")
else:
  for member in shards.read_members(path, shards.ShardLayout(mode)):
    members += 1
    images += len(member.data or b"")
    first = first or status("VmRSS")
print(members, images, status("VmHWM"), first or status("VmRSS"), time.perf_counter() - started)
"""


def write_big_shards(paths, megabytes, work):
  """One Parquet file of one row group and one tar, each holding ~megabytes of JPEG bytes: the
  benchmark's images repeated, each copy made distinct by 8 bytes after its end-of-image marker."""
  pool = [open(p, "rb").read() for p in paths[:64]]
  items, total, i = [], 0, 0
  while total < megabytes * 1e6:
    data = pool[i % len(pool)] + i.to_bytes(8, "big")
    items.append((f"{i:09d}", data))
    total += len(data)
    i += 1
  parquet, tar = os.path.join(work, "big.parquet"), os.path.join(work, "big.tar")
  write_parquet(parquet, items)
  write_tar(tar, items)
  del items
  return {"parquet": parquet, "tar": tar}, total, i


def stream_peak(mode, path):
  done = subprocess.run([sys.executable, "-c", _STREAM.format(repo=REPO), mode, path],
                        capture_output=True, text=True, cwd=REPO)
  if done.returncode != 0:
    raise SystemExit(done.stderr[-3000:])
  members, images, peak, first, seconds = done.stdout.split()
  return int(members), int(images), int(peak), int(first), float(seconds)


def rss_report(paths, megabytes, work):
  import pyarrow.parquet as pq
  big, total, count = write_big_shards(paths, megabytes, work)
  metadata = pq.ParquetFile(big["parquet"]).metadata
  print(f"\npeak RSS streaming ONE shard of {count} images, {total / 2**20:.0f} MiB of JPEG bytes "
        f"(Parquet: {metadata.num_row_groups} row group of {metadata.num_rows} rows, "
        f"{os.path.getsize(big['parquet']) / 2**20:.0f} MiB; tar {os.path.getsize(big['tar']) / 2**20:.0f} MiB)")
  _, _, baseline, _, _ = stream_peak("import", big["tar"])
  print(f"  {'reader':62s} {'members':>7s} {'s':>6s} {'peak RSS MiB':>12s} {'- imports':>9s} {'/ shard':>7s} "
        f"{'at 1st image':>12s}")
  print(f"  {'python + import transforms.shards (baseline)':62s} {'':7s} {'':6s} {baseline / 2**20:12.0f}")
  print("  (- imports, / shard: peak RSS over the baseline, in MiB and as a multiple of the shard file's size; "
        "at 1st image: RSS over the baseline, MiB, once the first image was handed out)")
  rows = [("read_members, tar (tarfile stream mode)", "tar", big["tar"]),
          ("read_members, Parquet (as transforms/shards.py opens it)", "parquet", big["parquet"]),
          ("pyarrow iter_batches 64, defaults (pre_buffer on)", "pyarrow", big["parquet"]),
          ("pyarrow iter_batches 64, pre_buffer=False", "pyarrow-nopre", big["parquet"]),
          ("pyarrow iter_batches 64, pre_buffer=False, buffer_size=1 MiB", "pyarrow-nopre-buffer", big["parquet"])]
  for title, mode, path in rows:
    members, images, peak, first, seconds = stream_peak(mode, path)
    if members != count or images < total - 8 * count:
      raise SystemExit(f"{title}: {members} members of {images} bytes; expected {count}")
    print(f"  {title:62s} {members:7d} {seconds:6.1f} {peak / 2**20:12.0f} {(peak - baseline) / 2**20:9.0f} "
          f"{(peak - baseline) / os.path.getsize(path):6.2f}x {max(first - baseline, 0) / 2**20:12.0f}")
  for path in big.values():
    os.remove(path)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=1024, help="images")
  parser.add_argument("--large", type=int, default=3072,
                      help="a second, larger run per format for the marginal rate (0: none)")
  parser.add_argument("--shard-size", type=int, default=256, help="images per shard")
  parser.add_argument("--latency-ms", type=float, default=30.0, help="added to every gs:// request")
  parser.add_argument("--repeats", type=int, default=1, help="rounds over the four formats, interleaved")
  parser.add_argument("--rss-mb", type=float, default=400.0, help="MB of image bytes in the one-shard RSS check")
  parser.add_argument("--skip", default="", help="comma list of local,gcs,rss")
  parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "embed-images-bench"))
  args = parser.parse_args(argv)
  skip = {s for s in args.skip.split(",") if s}
  os.makedirs(args.cache_dir, exist_ok=True)
  paths = make_images(max(args.n, args.large), args.cache_dir)
  work = tempfile.mkdtemp(prefix="shards-", dir=args.cache_dir)
  load = " ".join(f"{x:.2f}" for x in os.getloadavg())
  print(f"{args.n} JPEGs 500x375 q90, {args.shard_size} a shard; mobilenet_v3_small 32 px, weights random; "
        f"{os.cpu_count()} CPUs, load average at start {load}; work dir {work}")
  sizes = [args.n] + ([args.large] if args.large > args.n else [])
  datasets = {size: build_datasets(paths[:size], args.shard_size, os.path.join(work, f"n{size}")) for size in sizes}
  scale = (f"; whole runs at N={args.n}" + (f" and {args.large}, marginal = {args.large - args.n} / "
                                              f"(t({args.large}) - t({args.n})) img/s" if len(sizes) > 1 else ""))
  if "local" not in skip:
    results = local_runs(datasets, sizes, args.repeats, work)
    pipeline_table(f"local disk: whole `python -m pipeline` processes (start to exit){scale}", results, sizes, False)
  if "gcs" not in skip:
    results = gcs_runs(datasets, sizes, args.repeats, args.latency_ms, work)
    pipeline_table(f"gs:// on the GCS emulator, {args.latency_ms:g} ms added to every request, output local, "
                   f"requests counted at the proxy{scale}", results, sizes, True)
  if "rss" not in skip:
    rss_report(paths, args.rss_mb, work)
  print("\nvs loose: against the same repeat's loose-file run (wall s: loose / this; marginal: this / loose). "
        "max L2: largest relative L2 of a row's vector against the first loose run's vector of the same image "
        "(matched by sha256), over both sizes; every run is checked to hold every image once, no error rows. "
        "cpu ms/img: the process tree's marginal CPU time per image.")


if __name__ == "__main__":
  main()
