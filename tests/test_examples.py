"""The classifier example runs end to end on a tiny labelled folder and learns something."""

import pathlib
import re
import subprocess
import sys

import numpy as np
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parent.parent


def _labelled_folder(root, per_class=16):
  """Two classes a frozen random backbone can tell apart: crops of two different photos."""
  rng = np.random.default_rng(0)
  for label, photo in (("astronaut", "astronaut.jpg"), ("coffee", "coffee.jpg")):
    source = Image.open(REPO / "samples" / photo)
    (root / label).mkdir(parents=True)
    for i in range(per_class):
      w, h = source.size
      side = int(rng.integers(min(w, h) // 2, min(w, h)))
      x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
      crop = source.crop((x, y, x + side, y + side))
      if rng.random() < 0.5:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
      crop.save(root / label / f"{i:02d}.jpg", quality=90)


def test_classifier_example_beats_chance(tmp_path):
  _labelled_folder(tmp_path / "data")
  result = subprocess.run(
      [sys.executable, str(REPO / "examples" / "train_classifier.py"), "--data", str(tmp_path / "data"),
       "--work", str(tmp_path / "work"), "--backbones", "mobilenet_v2", "--weights", "random",
       "--image-size", "96"],
      capture_output=True, text=True, cwd=REPO, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  match = re.search(r"accuracy ([\d.]+) \(majority class ([\d.]+)\)", result.stdout)
  assert match, result.stdout
  accuracy, chance = float(match.group(1)), float(match.group(2))
  print(result.stdout.strip())
  assert accuracy >= 0.8 and accuracy > chance
