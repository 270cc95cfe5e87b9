"""End to end: real pipelines over real image files, Parquet read back and checked against the Keras recipe."""

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import types

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
  assert summary["counts"] == {"matched": len(files), "embedded": len(files), "resumed": 0, "carried_over": 0,
                               "removed": 0, "failed": 0, "failed_by_stage": {}, "failed_by_type": {}}
  assert summary["layout"] == layout

  rows = {uri: i for i, uri in enumerate(table.column("uri").to_pylist())}
  assert set(rows) == {str(p) for p in files}
  sizes = {str(p): Image.open(p).size for p in files}
  for uri, i in rows.items():
    assert (table.column("width")[i].as_py(), table.column("height")[i].as_py()) == sizes[uri]
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


def _layout(out):
  return json.loads(pq.read_schema(sorted(pathlib.Path(out).glob("embeddings-*.parquet"))[0]).metadata[LAYOUT_KEY])


def _rows(out):
  """{uri: (sha256, vector)} of an output."""
  table, _ = read_output(out)
  vectors = embedding_matrix(table.column("embedding"))
  return {uri: (sha, vectors[i]) for i, (uri, sha) in
          enumerate(zip(table.column("uri").to_pylist(), table.column("sha256").to_pylist()))}


def test_max_pooling_matches_the_keras_recipe_in_row_groups_of_row_group_size(tmp_path):
  out = tmp_path / "out"
  files = sorted(SAMPLES.glob("*.jpg"))
  assert len(files) == 7
  # batches of 4 against groups of 3: the writer must carry rows over from one batch to the next
  assert run(["--input", f"{SAMPLES}/*.jpg", "--output", str(out), "--backbones", "mobilenet_v2",
              "--weights", "random", "--image-size", "64", "--batch-size", "4", "--pooling", "max",
              "--row-group-size", "3", "--num-shards", "1"]) == 0
  layout = _layout(out)
  assert layout["pooling"] == "max"
  assert read_summary(str(out))["layout"]["pooling"] == "max"

  shards = sorted(out.glob("embeddings-*.parquet"))
  assert [p.name for p in shards] == ["embeddings-00000-of-00001.parquet"]
  metadata = pq.ParquetFile(shards[0]).metadata
  assert [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)] == [3, 3, 1]

  table, errors = read_output(out)
  assert errors.num_rows == 0
  rows = {uri: i for i, uri in enumerate(table.column("uri").to_pylist())}
  assert set(rows) == {str(p) for p in files}
  got = embedding_matrix(table.column("embedding"))[[rows[str(p)] for p in files]]
  specs = [BackboneSpec("mobilenet_v2", 64, resolve_weights("random", "mobilenet_v2", 64))]
  assert relative_l2(got, recipe_embeddings(files, specs, pooling="max")).max() < 1e-4
  # and not what average pooling gives: the flag reached the model (64 px, not 32: MobileNetV2's
  # last feature map is then 2x2, where max and average differ; at 32 it is 1x1)
  assert relative_l2(got, recipe_embeddings(files, specs, pooling="avg")).min() > 0.1


CLI_SMALL = ("--input", f"{SAMPLES}/*.jpg", "--backbones", "mobilenet_v2", "--weights", "random",
             "--image-size", "32")


def test_cli_run_with_one_decode_process_progress_bars_and_gpu_math_flags(tmp_path):
  out = tmp_path / "o"
  result = _cli(*CLI_SMALL, "--output", str(out), "--read-threads", "2", "--decode-threads", "1",
                "--progress", "on", "--max-pixels", "0", "--allow-tf32", "--mixed-precision")
  assert result.returncode == 0, result.stderr
  n = len(list(SAMPLES.glob("*.jpg")))
  assert f"embed-images: ok: {n} matched, {n} embedded, 0 failed" in result.stderr
  table, errors = read_output(out)
  assert sorted(table.column("uri").to_pylist()) == sorted(str(p) for p in SAMPLES.glob("*.jpg"))
  assert errors.num_rows == 0
  # tqdm's bars, final counts included, though stderr is a pipe here (the summary line's
  # "7 embedded" has no colon)
  assert f"embedded: {n} img" in result.stderr and f"matched: {n} img" in result.stderr

  summary = read_summary(str(out))
  assert summary["decode_processes"]["worker_processes"] == 1
  assert (summary["decode_processes"]["started"], summary["decode_processes"]["replaced"]) == (1, 0)
  layout = _layout(out)
  assert (layout["allow_tf32"], layout["mixed_precision"]) == (True, True)
  assert (summary["layout"]["allow_tf32"], summary["layout"]["mixed_precision"]) == (True, True)


def test_cli_default_decode_processes_are_the_usable_cores_and_no_bars_off_a_terminal(tmp_path):
  out = tmp_path / "o"
  result = _cli(*CLI_SMALL, "--output", str(out), "--decode-threads", "0")
  assert result.returncode == 0, result.stderr
  summary = read_summary(str(out))
  # the child inherits this process's affinity: the cores it may use, not the machine's
  assert summary["decode_processes"]["started"] == len(os.sched_getaffinity(0))
  assert summary["decode_processes"]["replaced"] == 0
  assert summary["counts"]["embedded"] == len(list(SAMPLES.glob("*.jpg")))
  # --progress auto: stderr is a pipe, so no bars; and off by default in the layout
  assert "embedded:" not in result.stderr and "matched:" not in result.stderr
  assert (summary["layout"]["allow_tf32"], summary["layout"]["mixed_precision"]) == (False, False)


def test_fused_model_builds_mixed_float16_backbones_and_tf32_without_leaking_the_global_policy():
  import keras
  import tensorflow as tf
  from transforms.fused import FusedModel
  policy = keras.mixed_precision.global_policy().name
  tf32 = tf.config.experimental.tensor_float_32_execution_enabled()
  tf.config.experimental.enable_tensor_float_32_execution(False)
  try:
    model = FusedModel([BackboneSpec("mobilenet_v2", 32, resolve_weights("random", "mobilenet_v2", 32))],
                       mixed_precision=True, allow_tf32=True)
    assert tf.config.experimental.tensor_float_32_execution_enabled()
  finally:
    tf.config.experimental.enable_tensor_float_32_execution(tf32)
  assert keras.mixed_precision.global_policy().name == policy
  (backbone,) = model.models
  assert backbone.dtype_policy.name == "mixed_float16"
  convs = [layer for layer in backbone.layers if isinstance(layer, keras.layers.Conv2D)]
  assert convs and {layer.dtype_policy.name for layer in convs} == {"mixed_float16"}
  assert {layer.compute_dtype for layer in convs} == {"float16"}
  # the rows stay float32 whatever the model computes in
  vectors = model({32: np.zeros((2, 32, 32, 3), np.uint8)})
  assert vectors.dtype == np.float32 and vectors.shape == (2, 1280)


def test_gpu_math_flags_reach_the_model_and_leave_the_process_as_it_was(tmp_path, monkeypatch):
  import inspect
  import keras
  import tensorflow as tf
  from transforms import fused
  built, real = [], fused.FusedModel

  def recorded(*args, **kwargs):
    built.append(inspect.signature(real).bind(*args, **kwargs).arguments)
    return real(*args, **kwargs)

  monkeypatch.setattr(fused, "FusedModel", recorded)
  policy = keras.mixed_precision.global_policy().name
  tf32 = tf.config.experimental.tensor_float_32_execution_enabled()
  tf.config.experimental.enable_tensor_float_32_execution(False)  # TensorFlow's default is on
  try:
    assert run([*CLI_SMALL, "--output", str(tmp_path / "o"), "--allow-tf32", "--mixed-precision"]) == 0
    # a second run in this process is configured by its own options only
    assert not tf.config.experimental.tensor_float_32_execution_enabled()
  finally:
    tf.config.experimental.enable_tensor_float_32_execution(tf32)
  assert [(b["allow_tf32"], b["mixed_precision"]) for b in built] == [(True, True)]
  assert keras.mixed_precision.global_policy().name == policy


def test_report_of_an_inconsistent_run_is_exit_1_with_the_accounting_line(tmp_path, capsys):
  from pipeline.main import _report
  from transforms.write import summarize, write_summary
  # 9 matched but 5 + 2 + 1 accounted for; 1 of 9 failed is also over the 5% budget, and
  # inconsistent is what must be reported
  summary = summarize(9, 5, [(("decode", "empty_file"), 1)], [], layout={}, inputs=["in/*.jpg"],
                      output=str(tmp_path), started_at=1000.0, finished_at=1010.0,
                      max_failure_fraction=0.05, carried=2)
  assert summary["status"] == "inconsistent"
  write_summary(str(tmp_path), summary)
  assert _report(types.SimpleNamespace(output=str(tmp_path))) == 1
  lines = capsys.readouterr().err.strip().splitlines()
  assert lines[0].startswith("embed-images: inconsistent: 9 matched, 5 embedded, ") and "1 failed in 10.0s" in lines[0]
  assert lines[-1] == ("embed-images: error: inputs not accounted for: "
                       "9 matched != 5 embedded + 0 resumed + 2 carried over + 1 failed")
  assert not any("--max-failure-fraction" in line for line in lines)


def _dedupe_refresh(tmp_path, copy_name):
  """Day 1 embeds three photos; day 2 adds a byte copy of the first as `copy_name` and changes
  the second, and runs with --dedupe --previous day1. Returns (folder, photos, day 1 rows, day 2 output)."""
  d = tmp_path / "in"
  d.mkdir()
  photos = [d / p.name for p in sorted(SAMPLES.glob("*.jpg"))[:3]]
  for p in photos:
    shutil.copy(SAMPLES / p.name, p)
  args = ["--input", f"{d}/*.jpg", "--backbones", "mobilenet_v2", "--weights", "random", "--image-size", "32"]
  assert run([*args, "--output", str(tmp_path / "day1")]) == 0
  shutil.copy(photos[0], d / copy_name)
  Image.open(photos[1]).transpose(Image.FLIP_LEFT_RIGHT).save(photos[1], quality=90)
  day2 = tmp_path / "day2"
  assert run([*args, "--output", str(day2), "--dedupe", "--previous", str(tmp_path / "day1")]) == 0
  return d, photos, _rows(tmp_path / "day1"), day2


def test_dedupe_with_previous_carries_unchanged_content_and_embeds_the_changed_file(tmp_path):
  d, (original, changed, unchanged), day1, out = _dedupe_refresh(tmp_path, "zz-copy.jpg")
  copy = d / "zz-copy.jpg"
  day2 = _rows(out)
  table, errors = read_output(out)
  assert errors.num_rows == 0
  assert sorted(table.column("uri").to_pylist()) == sorted(str(p) for p in (original, changed, unchanged, copy))
  np.testing.assert_array_equal(day2[str(copy)][1], day2[str(original)][1])
  for p in (original, unchanged):  # the previous rows, as they were
    assert day2[str(p)][0] == day1[str(p)][0]
    np.testing.assert_array_equal(day2[str(p)][1], day1[str(p)][1])
  assert day2[str(changed)][0] == hashlib.sha256(changed.read_bytes()).hexdigest() != day1[str(changed)][0]
  assert relative_l2(day2[str(changed)][1][None], day1[str(changed)][1][None])[0] > 1e-3

  summary = read_summary(str(out))
  counts = summary["counts"]
  assert summary["status"] == "ok" and summary["refresh"]["reused"] is True
  # the copy rides on its original, whose bytes are unchanged: both carried
  assert (counts["matched"], counts["embedded"], counts["carried_over"], counts["failed"]) == (4, 1, 3, 0)
  assert counts["resumed"] == 0
  assert counts["matched"] == counts["embedded"] + counts["carried_over"] + counts["failed"]
  assert counts["deduplicated"] == 1 and counts["removed"] == 0


def test_dedupe_with_previous_carries_the_original_even_when_its_copy_sorts_first(tmp_path):
  d, (original, changed, unchanged), day1, out = _dedupe_refresh(tmp_path, "0-copy.jpg")
  day2 = _rows(out)
  np.testing.assert_array_equal(day2[str(d / "0-copy.jpg")][1], day2[str(original)][1])
  counts = read_summary(str(out))["counts"]
  assert (counts["matched"], counts["embedded"], counts["carried_over"], counts["failed"]) == (4, 1, 3, 0)
