"""A nightly refresh (--previous) against a full run, as whole processes: time, peak RSS, requests.

    python benchmarks/refresh.py [--n 3072,30720] [--store local,gcs] [--latency-ms 30]
                                 [--changed 0.01] [--backbones mobilenet_v3_small] [--image-size 32]
                                 [--repeats 1]

For each store and N, on N distinct small JPEGs, it runs `embed-images` from start to exit:
- a full run;
- an unchanged refresh (`--previous` the full run): every object's listing is the one its row
  recorded, so nothing should be read;
- a refresh after `--changed` of the objects were rewritten (`--previous` the full run);
- an unchanged refresh with `--previous-verify` (today's old behaviour: read and hash everything);
- a refresh after as many new objects were added (`--previous` the changed refresh): a bucket that
  only grows, whose previous files are each reused whole.

`--repeats K` runs the full run and the unchanged refresh K times each, alternating (full,
unchanged, full, unchanged, ...), and reports each one's fastest: this VM's speed drifts by a
third within minutes, and the ratio of two single runs minutes apart carries that drift. The
changed and --previous-verify refreshes run once (a second round of changes would be a touch).

Per run: wall seconds and the ratio to the full run; peak RSS of the whole process tree (the run
and its decode processes, summed, sampled every 50 ms from /proc: forked children's shared pages
count twice) and the main process's own peak (VmHWM, from _SUCCESS.json: on the local runner the
process that holds every stage's data); on gs:// (the GCS emulator
behind tests/fault_proxy.py, `--latency-ms` added to every request) the requests made and
requests per object. Each run's counts are checked against what it must hold.
"""

import argparse
import concurrent.futures
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def jpeg(seed: int) -> bytes:
  import numpy as np
  from PIL import Image
  rng = np.random.default_rng(seed)
  pixels = (rng.integers(0, 256, (6, 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1))  # 64x48, blocky
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, format="JPEG", quality=85)
  return out.getvalue()


def _tree_rss(root: int) -> int:
  """RSS bytes of `root` and all its descendants, now."""
  parents, rss = {}, {}
  for name in os.listdir("/proc"):
    if not name.isdigit():
      continue
    try:
      with open(f"/proc/{name}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
      parents[int(name)] = int(fields[1])
      rss[int(name)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
      continue
  tree, changed = {root}, True
  while changed:
    changed = False
    for pid, parent in parents.items():
      if parent in tree and pid not in tree:
        tree.add(pid)
        changed = True
  return sum(rss.get(pid, 0) for pid in tree)


def run(cmd, env):
  """(wall seconds, peak RSS bytes of the process tree) of one command."""
  started = time.perf_counter()
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  peak, done = [0], threading.Event()

  def sample():
    while not done.wait(0.05):
      peak[0] = max(peak[0], _tree_rss(proc.pid))

  sampler = threading.Thread(target=sample, daemon=True)
  sampler.start()
  _, stderr = proc.communicate()
  seconds = time.perf_counter() - started
  done.set()
  sampler.join()
  if proc.returncode != 0:
    raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr.decode()[-3000:]}")
  return seconds, peak[0]


def embed(pattern, out, args, env, *extra):
  cmd = [sys.executable, "-m", "pipeline", "--input", pattern, "--output", out, "--backbones", args.backbones,
         "--weights", "random", "--progress", "off", "--batch-size", "64", *extra]
  if args.image_size:
    cmd += ["--image-size", str(args.image_size)]
  seconds, rss = run(cmd, env)
  from transforms.write import read_summary
  summary = read_summary(out)
  # The local runner's one process: its own peak (VmHWM), which sampling cannot miss or double count.
  return seconds, (rss, summary["peak_rss_bytes"]["summary_process"]), summary["counts"]


def bench(store, n, args, put_all, root, env, proxy):
  names = [f"{root}/photos/{i // 1024:03d}/{i:06d}.jpg" for i in range(n)]
  put_all((name, jpeg(i)) for i, name in enumerate(names))
  pattern = f"{root}/photos/**/*.jpg"
  results = []

  def measure(label, out, *extra, want, again=False):
    if proxy is not None:
      proxy.reset_counts()
    seconds, rss, counts = embed(pattern, f"{root}/{out}", args, env, *extra, *(["--overwrite"] if again else []))
    got = (counts["embedded"], counts["carried_over"])
    assert got == want, (label, counts)
    requests = sum(proxy.counts.values()) if proxy is not None else None
    reads = sum(1 for kind, uri in proxy.requests if kind == "read" and "/photos/" in (uri or "")) if proxy else None
    result = (label, seconds, rss, requests, reads)
    # The fastest of the rounds, by wall time (its requests with it); the highest peaks of all rounds.
    earlier = next((i for i, r in enumerate(results) if r[0] == label), None)
    if earlier is None:
      results.append(result)
      return
    peaks = tuple(max(a, b) for a, b in zip(rss, results[earlier][2]))
    if seconds < results[earlier][1]:
      results[earlier] = result
    results[earlier] = results[earlier][:2] + (peaks,) + results[earlier][3:]

  for again in range(args.repeats):
    measure("full run", "full", want=(n, 0), again=again > 0)
    measure("unchanged refresh", "same", "--previous", f"{root}/full", want=(0, n), again=again > 0)
  changed = names[::max(1, round(1 / args.changed))] if args.changed else []
  put_all((name, jpeg(10_000_000 + i)) for i, name in enumerate(changed))
  measure(f"refresh, {len(changed)} changed", "part", "--previous", f"{root}/full",
          want=(len(changed), n - len(changed)))
  measure("unchanged, --previous-verify", "verify", "--previous", f"{root}/part", "--previous-verify",
          want=(0, n))
  # A bucket that only grows: new objects beside unchanged ones, whose previous files are copied whole.
  new = [f"{root}/photos/new/{i:06d}.jpg" for i in range(len(changed))]
  put_all((name, jpeg(20_000_000 + i)) for i, name in enumerate(new))
  measure(f"refresh, {len(new)} new", "grown", "--previous", f"{root}/part", want=(len(new), n))

  full_s = results[0][1]
  where = "local disk" if store == "local" else f"GCS emulator, +{args.latency_ms:g} ms a request"
  print(f"\n{where}, N={n:,} ({args.backbones}{f' at {args.image_size} px' if args.image_size else ''}"
        f"{f'; full and unchanged: fastest of {args.repeats}, highest peaks' if args.repeats > 1 else ''})")
  print(f"  {'run':<30}{'seconds':>9}{'vs full':>9}{'tree RSS GiB':>14}{'main VmHWM GiB':>16}" + (
      f"{'requests':>10}{'per object':>12}{'object reads':>14}" if proxy else ""))
  for label, seconds, rss, requests, reads in results:
    line = f"  {label:<30}{seconds:>9.1f}{seconds / full_s:>9.2f}{rss[0] / 2**30:>14.3f}{rss[1] / 2**30:>16.3f}"
    if proxy is not None:
      line += f"{requests:>10}{requests / n:>12.4f}{reads:>14}"
    print(line, flush=True)
  return results


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", default="3072,30720", help="comma-separated object counts")
  parser.add_argument("--store", default="local,gcs", help="local, gcs, or both")
  parser.add_argument("--latency-ms", type=float, default=30.0, help="added to each gs:// request")
  parser.add_argument("--changed", type=float, default=0.01, help="fraction rewritten before the changed refresh")
  parser.add_argument("--backbones", default="mobilenet_v3_small")
  parser.add_argument("--image-size", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=1,
                      help="the full run and the unchanged refresh, each this many times, alternating: the fastest")
  args = parser.parse_args(argv)
  if args.repeats < 1:
    parser.error(f"--repeats must be at least 1; received: {args.repeats}")
  print(f"cpus={os.cpu_count()} python={sys.version.split()[0]}")
  env = dict(os.environ, PYTHONPATH=REPO)
  for store in args.store.split(","):
    by_n = {}
    for n in [int(x) for x in args.n.split(",")]:
      if store == "local":
        work = tempfile.mkdtemp(prefix="refresh-bench-")

        def put(path, data):
          os.makedirs(os.path.dirname(path), exist_ok=True)
          with open(path, "wb") as f:
            f.write(data)

        by_n[n] = bench(store, n, args, lambda pairs: _put_all(put, pairs), work, env, None)
        shutil.rmtree(work)
        continue
      from apache_beam.io.filesystems import FileSystems
      from tests.fault_proxy import fault_proxy
      from tests.gcs_emulator import gcs_emulator

      def put(uri, data):
        with FileSystems.create(uri, compression_type="uncompressed") as f:
          f.write(data)

      with gcs_emulator("refresh-bench") as bucket, fault_proxy() as proxy:
        # The whole environment as the emulator and proxy left it: the proxy's STORAGE_EMULATOR_HOST
        # and the emulator's GOOGLE_APPLICATION_CREDENTIALS. Without the credentials, Beam retries
        # finding some with backoff (_get_credentials_with_retrys), ~20 s a run, then goes on anonymously.
        child_env = dict(os.environ, PYTHONPATH=REPO)
        proxy.latency_s = args.latency_ms / 1000
        by_n[n] = bench(store, n, args, lambda pairs: _fast_put_all(proxy, put, pairs), f"gs://{bucket}", child_env,
                        proxy)
    _print_flatness(store, by_n)


def _print_flatness(store, by_n):
  """Each kind of run's peak at every N against the smallest N's (issue 21: within 10%)."""
  if len(by_n) < 2:
    return
  smallest, *others = sorted(by_n)
  print(f"\n{store}: peak memory against N={smallest:,} (tree RSS / main VmHWM)")
  for i, (label, *_) in enumerate(by_n[smallest]):
    kind = re.sub(r"\d+ (changed|new)", r"\1", label)
    ratios = []
    for n in others:
      _, _, rss, _, _ = by_n[n][i]
      base = by_n[smallest][i][2]
      ratios.append(f"N={n:,}: {rss[0] / base[0]:.3f}x / {rss[1] / base[1]:.3f}x")
    print(f"  {kind:<30}" + "   ".join(ratios))


def _put_all(put, pairs, threads: int = 8):
  """The benchmark's own set-up (not timed): objects written 8 at a time."""
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    for done in [pool.submit(put, name, data) for name, data in pairs]:
      done.result()


def _fast_put_all(proxy, put, pairs):
  """Writes through the proxy without its added latency (a benchmark's own set-up is not timed)."""
  latency, proxy.latency_s = proxy.latency_s, 0.0
  try:
    _put_all(put, pairs)
  finally:
    proxy.latency_s = latency


if __name__ == "__main__":
  main()
