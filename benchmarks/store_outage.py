"""How long a run takes to give up on a store that stays down, on the default deadline, and what a
flaky store costs in time.

    python benchmarks/store_outage.py [--n 64] [--retry-seconds DEFAULT] [--skip flaky,launch,reads]

On the GCS emulator behind tests/fault_proxy.py, with N small JPEGs in gs://:
- flaky: a fault-free gs:// -> gs:// run, then the same run with 10% of requests answering 503,
  5% 429 and 2% of connections reset (every kind: listing, reads, writes, checkpoints); the
  second's wall time as a multiple of the first's, rows compared;
- launch: every request answers 503 from the start: seconds until the process exits, its exit
  status and last line;
- reads: every read answers 503 after the first 8: the same.
Without --retry-seconds, the runs use the default outage deadline (transforms/store.py, 120 s).
"""

import argparse
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
MODEL = ("--backbones", "mobilenet_v3_small", "--image-size", "32", "--weights", "random", "--batch-size", "8",
         "--progress", "off")




def cli(args, retry_seconds):
  env = dict(os.environ, PYTHONPATH=REPO)
  env.pop("EMBED_IMAGES_STORE_RETRY_SECONDS", None)
  extra = ("--store-retry-seconds", str(retry_seconds)) if retry_seconds else ()
  started = time.perf_counter()
  done = subprocess.run([sys.executable, "-m", "pipeline", *args, *MODEL, *extra], capture_output=True, text=True,
                        cwd=REPO, env=env, timeout=1800)
  lines = done.stderr.strip().splitlines()
  return time.perf_counter() - started, done.returncode, lines[-1] if lines else ""


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=64)
  parser.add_argument("--retry-seconds", type=float, default=None)
  parser.add_argument("--skip", default="")
  args = parser.parse_args(argv)
  skip = set(filter(None, args.skip.split(",")))
  from apache_beam.io.filesystems import FileSystems
  from tests.fault_proxy import fault_proxy
  from tests.corpus import noise_jpeg
  from tests.gcs_emulator import gcs_emulator
  from transforms import store
  print(f"deadline: {args.retry_seconds or store.DEFAULT_RETRY_SECONDS:g} s; N={args.n}", flush=True)
  with gcs_emulator("outage-bench") as name, fault_proxy(seed=7) as proxy:
    bucket = f"gs://{name}"
    for i in range(args.n):
      with FileSystems.create(f"{bucket}/photos/{i % 4}/{i:04d}.jpg") as f:
        f.write(noise_jpeg(i))
    pattern = f"{bucket}/photos/**/*.jpg"
    if "flaky" not in skip:
      proxy.reset_counts()
      clean_s, code, line = cli(["--input", pattern, "--output", f"{bucket}/clean"], args.retry_seconds)
      assert code == 0, line
      clean_requests = sum(proxy.counts.values())
      proxy.reset_counts()
      proxy.faults(p503=0.10, p429=0.05, p_reset=0.02)
      flaky_s, code, line = cli(["--input", pattern, "--output", f"{bucket}/flaky"], args.retry_seconds)
      proxy.faults()
      from transforms.write import read_summary
      counts = read_summary(f"{bucket}/flaky")["counts"]
      print(f"flaky store: fault-free {clean_s:.1f} s ({clean_requests} requests); flaky {flaky_s:.1f} s "
            f"({sum(proxy.counts.values())} requests, {proxy.injected()} faults injected) = "
            f"{flaky_s / clean_s:.2f}x; exit {code}; embedded {counts['embedded']}, failed {counts['failed']}",
            flush=True)
    if "launch" not in skip:
      proxy.reset_counts()
      proxy.down(status=503)
      seconds, code, line = cli(["--input", pattern, "--output", f"{bucket}/down"], args.retry_seconds)
      proxy.up()
      print(f"down from launch: exit {code} after {seconds:.1f} s, {sum(proxy.counts.values())} requests\n  {line}",
            flush=True)
    if "reads" not in skip:
      proxy.reset_counts()
      proxy.down(kind="read", status=503, after=8)
      seconds, code, line = cli(["--input", pattern, "--output", f"{bucket}/reads-down", "--checkpoint-every", "1"],
                                args.retry_seconds)
      proxy.up()
      print(f"reads down after the listing: exit {code} after {seconds:.1f} s, {proxy.counts['read']} reads\n  {line}",
            flush=True)


if __name__ == "__main__":
  main()
