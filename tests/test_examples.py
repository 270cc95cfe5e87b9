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


def test_csv_example_embeds_ids_and_uris_into_parquet_and_errors(tmp_path):
  import pyarrow.parquet as pq
  photos = sorted((REPO / "samples").glob("*.jpg"))[:3]
  lines = ["id,uri", *[f"p{i},{p}" for i, p in enumerate(photos)], f"gone,{tmp_path / 'gone.jpg'}"]
  (tmp_path / "products.csv").write_text("\n".join(lines) + "\n")
  result = subprocess.run(
      [sys.executable, str(REPO / "examples" / "embed_csv.py"), "--csv", str(tmp_path / "products.csv"),
       "--output", str(tmp_path / "out"), "--backbones", "mobilenet_v3_small", "--weights", "random",
       "--image-size", "32"], capture_output=True, text=True, cwd=REPO, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  vectors = pq.read_table(sorted((tmp_path / "out").glob("vectors-*.parquet")))
  assert sorted(zip(vectors.column("id").to_pylist(), vectors.column("uri").to_pylist())) == [
      (f"p{i}", str(p)) for i, p in enumerate(photos)]
  assert {len(v) for v in vectors.column("embedding").to_pylist()} == {576}
  errors = pq.read_table(sorted((tmp_path / "out").glob("errors-*.parquet")))
  assert errors.select(["id", "stage", "error_type"]).to_pylist() == [
      {"id": "gone", "stage": "read", "error_type": "FileNotFoundError"}]


def test_streaming_example_writes_each_window_its_vectors(tmp_path):
  incoming = tmp_path / "incoming"
  incoming.mkdir()
  photos = sorted((REPO / "samples").glob("*.jpg"))[:2]
  for p in photos:
    (incoming / p.name).write_bytes(p.read_bytes())
  # Files there before the start are found by the watcher's first match; the example stops
  # watching by itself after --stop-after-secs.
  result = subprocess.run(
      [sys.executable, str(REPO / "examples" / "streaming.py"), "--watch", f"{incoming}/*.jpg",
       "--output", str(tmp_path / "out"), "--backbones", "mobilenet_v3_small", "--weights", "random",
       "--image-size", "32", "--window-secs", "3600", "--stop-after-secs", "5"],
      capture_output=True, text=True, cwd=REPO, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  windows = sorted((tmp_path / "out").glob("window-*.npz"))
  assert len(windows) == 1
  data = np.load(windows[0])
  assert sorted(data["uris"].tolist()) == [str(incoming / p.name) for p in photos]
  assert data["embeddings"].shape == (2, 576) and data["embeddings"].dtype == np.float32
