"""Time of an incremental refresh (--previous) against a full run, as whole processes.

    python benchmarks/refresh.py [--n 512] [--backbones mobilenet_v2] [--changed 0.1]

On N benchmark JPEGs (500x375, the same pool as throughput.py), it times `embed-images` from
start to exit: a full run; an unchanged refresh (every file read and hashed, none decoded or
embedded); and a refresh after a fraction of the files was rewritten. Each refresh's rows are
checked against what it should hold.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.throughput import make_images  # noqa: E402


def embed(images, out, args, *extra):
  cmd = [sys.executable, "-m", "pipeline", "--input", f"{images}/*.jpg", "--output", out,
         "--backbones", args.backbones, "--weights", "random", "--progress", "off", *extra]
  started = time.perf_counter()
  subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  seconds = time.perf_counter() - started
  from transforms.write import read_summary
  return seconds, read_summary(out)["counts"]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=512)
  parser.add_argument("--backbones", default="mobilenet_v2")
  parser.add_argument("--changed", type=float, default=0.1, help="fraction rewritten before the last refresh")
  parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "embed-images-bench"))
  args = parser.parse_args(argv)

  work = tempfile.mkdtemp(prefix="refresh-bench-")
  images = os.path.join(work, "images")
  os.makedirs(images)
  for path in make_images(args.n, args.cache):  # real copies: a refresh must read real bytes
    shutil.copy(path, images)

  full, counts = embed(images, os.path.join(work, "full"), args)
  assert counts["embedded"] == args.n, counts
  same, counts = embed(images, os.path.join(work, "same"), args, "--previous", os.path.join(work, "full"))
  assert (counts["embedded"], counts["carried_over"]) == (0, args.n), counts

  from PIL import Image
  names = sorted(os.listdir(images))
  changed = names[:int(args.n * args.changed)]
  for name in changed:
    path = os.path.join(images, name)
    Image.open(path).transpose(Image.FLIP_LEFT_RIGHT).save(path, quality=90)
  part, counts = embed(images, os.path.join(work, "part"), args, "--previous", os.path.join(work, "same"))
  assert (counts["embedded"], counts["carried_over"]) == (len(changed), args.n - len(changed)), counts

  print(f"N={args.n} backbones={args.backbones} cpus={os.cpu_count()}")
  print(f"{'run':<34}{'seconds':>9}{'vs full':>9}")
  print(f"{'full run':<34}{full:>9.1f}{1.0:>9.2f}")
  print(f"{'unchanged refresh':<34}{same:>9.1f}{same / full:>9.2f}")
  print(f"{f'refresh, {len(changed)} files changed':<34}{part:>9.1f}{part / full:>9.2f}")
  shutil.rmtree(work)


if __name__ == "__main__":
  main()
