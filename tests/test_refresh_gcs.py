"""A nightly refresh on gs://, counted through tests/fault_proxy.py: what is unchanged is never read."""

import os
import subprocess
import sys

from apache_beam.io.filesystems import FileSystems

from tests.corpus import noise_jpeg
from transforms.write import read_summary

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 512
MODEL = ("--backbones", "mobilenet_v3_small", "--image-size", "32", "--weights", "random", "--batch-size", "64",
         "--progress", "off")




def _put(uri, data):
  with FileSystems.create(uri, compression_type="uncompressed") as f:
    f.write(data)


def _cli(*args):
  done = subprocess.run([sys.executable, "-m", "pipeline", *args, *MODEL], capture_output=True, text=True, cwd=REPO,
                        timeout=540, env=dict(os.environ, PYTHONPATH=REPO))
  assert done.returncode == 0, done.stderr[-2000:]


def _reads_of(proxy, prefix):
  return sum(1 for kind, uri in proxy.requests if kind == "read" and uri and uri.startswith(prefix))


def test_an_unchanged_refresh_costs_n_over_100_requests_and_reads_only_what_changed(gcs_proxy):
  proxy, bucket = gcs_proxy, gcs_proxy.bucket
  photos = f"{bucket}/photos"
  for i in range(N):
    _put(f"{photos}/{i // 128}/{i:04d}.jpg", noise_jpeg(i, 16))
  pattern = f"{photos}/**/*.jpg"

  proxy.reset_counts()
  _cli("--input", pattern, "--output", f"{bucket}/day1")
  full = sum(proxy.counts.values())
  assert _reads_of(proxy, photos + "/") == N  # the full run reads each object once

  proxy.reset_counts()
  _cli("--input", pattern, "--output", f"{bucket}/day2", "--previous", f"{bucket}/day1")
  unchanged = sum(proxy.counts.values())
  counts = read_summary(f"{bucket}/day2")["counts"]
  assert (counts["carried_over"], counts["embedded"]) == (N, 0)
  assert _reads_of(proxy, photos + "/") == 0
  assert unchanged <= N / 100 + 100, dict(proxy.counts)

  # 1% of the objects rewritten (a new generation each): only those are read.
  changed = [f"{photos}/{i // 128}/{i:04d}.jpg" for i in range(0, N, 100)]
  for uri in changed:
    _put(uri, noise_jpeg(10_000 + len(uri), 16))
  proxy.reset_counts()
  _cli("--input", pattern, "--output", f"{bucket}/day3", "--previous", f"{bucket}/day2")
  counts = read_summary(f"{bucket}/day3")["counts"]
  assert (counts["carried_over"], counts["embedded"]) == (N - len(changed), len(changed))
  assert sorted(uri for kind, uri in proxy.requests if kind == "read" and uri.startswith(photos + "/")) == sorted(changed)
  print(f"requests: full {full}, unchanged {unchanged}, 1% changed {sum(proxy.counts.values())}")
