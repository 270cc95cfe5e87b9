"""Ctrl-C and SIGTERM: a local run stops within seconds, decode processes included, and leaves an output that reads as partial."""

import contextlib
import io
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

from pipeline.main import descendants, run
from tests import hostile
from tests.corpus import SAMPLES
from tests.test_decode_pool import alive, wait_for
from transforms import decode_pool

SMALL_MODEL = ("--backbones", "mobilenet_v2", "--weights", "random", "--image-size", "32")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_the_run_and_every_decode_process(tmp_path, signum):
  folder = tmp_path / "in"
  folder.mkdir()
  for name in ("astronaut.jpg", "coffee.jpg", "rocket.jpg"):
    shutil.copy(SAMPLES / name, folder / name)
  (folder / "endless.jpg").write_bytes(hostile.plugin_file(hostile.BLOCK_MAGIC))
  markers = tmp_path / "markers"
  markers.mkdir()
  out = tmp_path / "out"
  env = dict(os.environ, EMBEDTEST_MARKER_DIR=str(markers), **{decode_pool.PLUGINS_ENV: hostile.PLUGIN_MODULE})
  proc = subprocess.Popen(
      [sys.executable, "-m", "pipeline", "--input", f"{folder}/*", "--output", str(out), *SMALL_MODEL,
       "--decode-timeout", "3600"],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=pathlib.Path(__file__).parent.parent, text=True)
  try:
    wait_for(lambda: any(markers.iterdir()) or proc.poll() is not None, "the run to be decoding", limit=300)
    assert proc.poll() is None, f"the run ended early ({proc.returncode}):\n{proc.stderr.read()[-4000:]}"
    below = descendants(proc.pid)
    assert below  # its decode processes
    signalled = time.monotonic()
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  took = time.monotonic() - signalled
  print(f"{signal.Signals(signum).name}: the run ended {took:.2f}s after the signal")
  assert proc.returncode == 128 + signum
  name = signal.Signals(signum).name
  assert stderr.strip().splitlines()[-1] == (
      f"embed-images: interrupted by {name}: the output in {out} is partial (no _SUCCESS.json); "
      "run again with --resume to go on from its committed rows, or --overwrite to start over")
  assert "Traceback" not in stderr
  assert not (out / "_SUCCESS.json").exists()
  wait_for(lambda: not any(alive(pid) for pid in below), "every process of the run to end")

  # The partial output is refused as a previous run, and --overwrite replaces it.
  stderr = io.StringIO()
  with contextlib.redirect_stderr(stderr):
    status = run(["--input", f"{folder}/*.jpg", "--output", str(tmp_path / "next"), *SMALL_MODEL,
                  "--previous", str(out), "--max-failure-fraction", "1"])
  assert status == 2 and "has no readable _SUCCESS.json (missing or partial run)" in stderr.getvalue()
  (folder / "endless.jpg").unlink()
  with contextlib.redirect_stderr(io.StringIO()):
    status = run(["--input", f"{folder}/*.jpg", "--output", str(out), *SMALL_MODEL, "--overwrite"])
  assert status == 0 and (out / "_SUCCESS.json").exists()
