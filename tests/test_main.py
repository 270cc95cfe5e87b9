"""End to end: real pipelines over real image files, Parquet read back and checked against the Keras recipe."""

import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.main import run
from transforms.weights import BackboneSpec
from tests.recipe import recipe_embeddings, relative_l2
from transforms.weights import resolve_weights
from transforms.write import LAYOUT_KEY, embedding_matrix, read_summary

SAMPLES = pathlib.Path(__file__).resolve().parent.parent / "samples"
REPO = SAMPLES.parent


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  """The shipped photos plus files the recipe reads correctly: grey PNG, RGB PNG, a 4000 px photo."""
  d = tmp_path_factory.mktemp("photos")
  for p in sorted(SAMPLES.glob("*.jpg")):
    shutil.copy(p, d / p.name)
  first = Image.open(sorted(SAMPLES.glob("*.jpg"))[0])
  first.convert("L").save(d / "grey.png")
  first.save(d / "rgb.png")
  first.resize((4000, 3000), Image.BICUBIC).save(d / "large.jpg", quality=85)
  return d


def read_output(out):
  out = pathlib.Path(out)
  table = pq.read_table(sorted(out.glob("embeddings-*.parquet")))
  errors = pq.read_table(sorted(out.glob("errors-*.parquet")))
  return table, errors


def test_two_backbones_of_different_sizes_match_the_keras_recipe(photos, tmp_path):
  out = tmp_path / "out"
  status = run(["--input", f"{photos}/*.jpg", "--input", f"{photos}/*.png", "--output", str(out),
                "--backbones", "mobilenet_v2,inception_v3", "--weights", "random", "--batch-size", "4"])
  assert status == 0
  table, errors = read_output(out)
  files = sorted(p for p in photos.iterdir())
  assert errors.num_rows == 0
  assert table.num_rows == len(files)
  assert table.schema.field("embedding").type == pa.list_(pa.float32(), 1280 + 2048)
  assert table.schema.field("width").type == pa.int32()

  layout = json.loads(pq.read_schema(sorted(out.glob("embeddings-*.parquet"))[0]).metadata[LAYOUT_KEY])
  assert [(b["name"], b["offset"], b["dim"], b["input_size"], b["preprocessing"]) for b in layout["backbones"]] == [
      ("mobilenet_v2", 0, 1280, 224, "tf"), ("inception_v3", 1280, 2048, 299, "tf")]
  random_weights = resolve_weights("random", "mobilenet_v2", 224).fingerprint
  assert [b["weights_fingerprint"] for b in layout["backbones"]] == [random_weights, random_weights]
  assert layout["pooling"] == "avg" and layout["resize"] == "squash"

  summary = read_summary(str(out))
  assert summary["status"] == "ok"
  assert summary["counts"] == {"matched": len(files), "embedded": len(files), "carried_over": 0,
                               "removed": 0, "failed": 0, "failed_by_stage": {}, "failed_by_type": {}}
  assert summary["layout"] == layout

  rows = {uri: i for i, uri in enumerate(table.column("uri").to_pylist())}
  assert set(rows) == {str(p) for p in files}
  sizes = {str(p): Image.open(p).size for p in files}
  for uri, i in rows.items():
    assert (table.column("width")[i].as_py(), table.column("height")[i].as_py()) == sizes[uri]
  import hashlib
  for uri, i in rows.items():
    assert table.column("sha256")[i].as_py() == hashlib.sha256(pathlib.Path(uri).read_bytes()).hexdigest()

  specs = [BackboneSpec("mobilenet_v2", 224, resolve_weights("random", "mobilenet_v2", 224)),
           BackboneSpec("inception_v3", 299, resolve_weights("random", "inception_v3", 299))]
  want = recipe_embeddings(files, specs)
  got = embedding_matrix(table.column("embedding"))[[rows[str(p)] for p in files]]
  error = relative_l2(got, want)
  print(f"fidelity: max relative L2 error {error.max():.2e} over {len(files)} files (incl. 4000x3000)")
  assert error.max() < 1e-4
  # each backbone's slice on its own, as a reader would cut it
  for b, spec in zip(layout["backbones"], specs):
    part = slice(b["offset"], b["offset"] + b["dim"])
    assert relative_l2(got[:, part], want[:, part]).max() < 1e-4


def _run_small(photos, out, *extra):
  return run(["--input", f"{photos}/*.jpg", "--output", str(out), "--backbones", "mobilenet_v2",
              "--weights", "random", "--image-size", "64", "--batch-size", "3", *extra])


def test_multi_process_run_gives_the_same_rows(photos, tmp_path):
  assert _run_small(photos, tmp_path / "one") == 0
  assert _run_small(photos, tmp_path / "two", "--direct_running_mode=multi_processing",
                    "--direct_num_workers=2") == 0
  one, _ = read_output(tmp_path / "one")
  two, _ = read_output(tmp_path / "two")
  one, two = one.sort_by("uri"), two.sort_by("uri")
  assert one.column("uri").to_pylist() == two.column("uri").to_pylist()
  assert one.num_rows == len(list(photos.glob("*.jpg")))
  vectors = embedding_matrix(two.column("embedding"))
  np.testing.assert_allclose(vectors, embedding_matrix(one.column("embedding")), rtol=1e-5, atol=1e-6)
  # the non-default size reached the worker processes
  layout = json.loads(pq.read_schema(sorted((tmp_path / "two").glob("embeddings-*"))[0]).metadata[LAYOUT_KEY])
  assert layout["backbones"][0]["input_size"] == 64
  specs = [BackboneSpec("mobilenet_v2", 64, resolve_weights("random", "mobilenet_v2", 64))]
  paths = [pathlib.Path(u) for u in two.column("uri").to_pylist()]
  assert relative_l2(vectors, recipe_embeddings(paths, specs)).max() < 1e-4


def _cli(*args, cwd=REPO):
  return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True,
                        cwd=cwd, timeout=300)


def test_cli_bad_option_is_one_line_and_exit_2(photos, tmp_path):
  result = _cli("--input", f"{photos}/*.jpg", "--output", str(tmp_path / "o"), "--backbones", "resnet5")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith("embed-images: error: --backbones: unknown backbone 'resnet5'")
  assert "Traceback" not in result.stderr


def test_cli_lists_backbones():
  result = _cli("--list-backbones")
  assert result.returncode == 0
  for name in ("vgg16", "inception_v3", "efficientnet_v2_s", "convnext_xlarge", "nasnet_large"):
    assert name in result.stdout


def test_cli_run_embeds_every_photo_and_exits_0(photos, tmp_path):
  # The console script's own path: imports with the GC paused and frozen, a frozen heap at exit.
  result = _cli("--input", f"{photos}/*.jpg", "--output", str(tmp_path / "o"), "--backbones", "mobilenet_v2",
                "--weights", "random", "--image-size", "64")
  assert result.returncode == 0, result.stderr
  n = len(list(photos.glob("*.jpg")))
  assert f"embed-images: ok: {n} matched, {n} embedded, 0 failed" in result.stderr
  table, _ = read_output(tmp_path / "o")
  assert table.num_rows == n


def test_cli_lists_backbones_without_importing_tensorflow():
  code = ("import sys\nfrom pipeline import cli\ntry:\n  cli.main(['--list-backbones'])\n"
          "except SystemExit as e:\n  print('exit', e.code, 'tensorflow' in sys.modules)")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
  assert result.stdout.strip().splitlines()[-1] == "exit 0 False"
  assert "mobilenet_v2" in result.stdout


def test_rerun_into_the_same_output_is_refused_and_leaves_it_intact(photos, tmp_path):
  out = tmp_path / "out"
  assert _run_small(photos, out) == 0
  before = {p.name: p.read_bytes() for p in out.iterdir()}
  assert _run_small(photos, out) == 2
  assert {p.name: p.read_bytes() for p in out.iterdir()} == before
  assert _run_small(photos, out, "--overwrite") == 0
  assert read_summary(str(out))["status"] == "ok"
