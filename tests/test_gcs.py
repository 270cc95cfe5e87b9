"""End to end on gs://: the real pipeline reads photos, weights and writes Parquet through the local GCS emulator."""

import hashlib
import io
import json
import pathlib
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystems import FileSystems
from PIL import Image

from pipeline.main import run
from tests.gcs_emulator import gcs_emulator
from transforms.backbones import build_backbone
from transforms.write import LAYOUT_KEY, embedding_matrix, read_summary

SAMPLES = pathlib.Path(__file__).resolve().parent.parent / "samples"
BROKEN = b"<html>an error page saved as .jpg</html>"
SEED = 7


def _write(path, data):
  with FileSystems.create(path, compression_type="uncompressed") as f:
    f.write(data)


def _read(path):
  with FileSystems.open(path, compression_type="uncompressed") as f:
    return f.read()


def _tables(output, prefix):
  files = sorted(m.path for m in FileSystems.match([f"{output}/{prefix}-*.parquet"])[0].metadata_list)
  assert files, f"no {prefix}-*.parquet in {output}"
  return files, pa.concat_tables(pq.read_table(pa.BufferReader(_read(f))) for f in files)


@pytest.fixture(scope="module")
def bucket():
  with gcs_emulator("test-bucket") as name:
    yield "gs://" + name


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
  """mobilenet_v2.weights.h5 as model.save_weights writes it, from a seeded model: not --weights random's."""
  import keras
  keras.utils.set_random_seed(SEED)
  path = tmp_path_factory.mktemp("weights") / "mobilenet_v2.weights.h5"
  build_backbone("mobilenet_v2", 224, "avg", None).save_weights(str(path))
  return path


@pytest.fixture(scope="module")
def photos(bucket):
  """uri -> bytes: the shipped photos, some a folder down, and one file that is not an image."""
  files = {}
  for i, path in enumerate(sorted(SAMPLES.glob("*.jpg"))):
    files[f"{bucket}/photos/{'sub/' if i % 2 else ''}{path.name}"] = path.read_bytes()
  files[f"{bucket}/photos/sub/broken.jpg"] = BROKEN
  for uri, data in files.items():
    _write(uri, data)
  return files


def _args(inputs, output, weights, *extra):
  return ["--input", inputs, "--output", output, "--backbones", "mobilenet_v2", "--weights", weights,
          "--batch-size", "4", "--max-failure-fraction", "0.2", *extra]


@pytest.fixture(scope="module")
def gcs_run(bucket, photos, weights_file):
  _write(f"{bucket}/weights/{weights_file.name}", weights_file.read_bytes())
  output = f"{bucket}/runs/2026-11-20"
  assert run(_args(f"{bucket}/photos/**", output, f"{bucket}/weights")) == 0
  return output


def test_gcs_run_writes_every_row_errors_and_summary(gcs_run, photos, weights_file):
  files, table = _tables(gcs_run, "embeddings")
  _, errors = _tables(gcs_run, "errors")
  images = {uri: data for uri, data in photos.items() if data != BROKEN}

  assert sorted(table.column("uri").to_pylist()) == sorted(images)
  assert table.schema.field("embedding").type == pa.list_(pa.float32(), 1280)
  for row in table.select(["uri", "sha256", "width", "height"]).to_pylist():
    data = images[row["uri"]]
    assert row["sha256"] == hashlib.sha256(data).hexdigest()
    assert (row["width"], row["height"]) == Image.open(io.BytesIO(data)).size
  vectors = embedding_matrix(table.column("embedding"))
  assert np.isfinite(vectors).all() and np.abs(vectors).sum(axis=1).min() > 0

  assert errors.to_pylist() == [{
      "uri": f"{gcs_run.rsplit('/runs/', 1)[0]}/photos/sub/broken.jpg", "stage": "decode",
      "error_type": "unidentified_image", "message": errors.column("message")[0].as_py()}]

  summary = read_summary(gcs_run)
  assert summary["status"] == "ok"
  assert {k: summary["counts"][k] for k in ("matched", "embedded", "failed", "failed_by_stage")} == {
      "matched": len(photos), "embedded": len(images), "failed": 1, "failed_by_stage": {"decode": 1}}
  assert sorted(summary["files"]) == sorted(FileSystems.split(f)[1] for f in files + _tables(gcs_run, "errors")[0])
  # The weights came from the gs:// directory: the file's own digest, as Parquet metadata says too.
  [backbone] = summary["layout"]["backbones"]
  assert backbone["weights"] == "weights_h5"
  assert backbone["weights_fingerprint"] == "sha256:" + hashlib.sha256(weights_file.read_bytes()).hexdigest()
  assert json.loads(table.schema.metadata[LAYOUT_KEY]) == summary["layout"]


def _local_copy(photos, root):
  """The same files on local disk, same relative names."""
  for uri, data in photos.items():
    path = root / uri.split("/photos/", 1)[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
  return root


def _by_name(table):
  names = [uri.split("/photos/", 1)[1] for uri in table.column("uri").to_pylist()]
  order = np.argsort(names)
  return [names[i] for i in order], embedding_matrix(table.column("embedding"))[order]


def test_gcs_run_equals_a_local_run_with_the_same_weights(gcs_run, photos, weights_file, tmp_path):
  local_photos = _local_copy(photos, tmp_path / "photos")
  local_weights = tmp_path / "weights"
  local_weights.mkdir()
  shutil.copy(weights_file, local_weights / weights_file.name)
  out = tmp_path / "out"
  assert run(_args(f"{local_photos}/**", str(out), str(local_weights))) == 0

  gcs_names, gcs_vectors = _by_name(_tables(gcs_run, "embeddings")[1])
  local_names, local_vectors = _by_name(pq.read_table(sorted(out.glob("embeddings-*.parquet"))))
  assert gcs_names == local_names
  np.testing.assert_allclose(gcs_vectors, local_vectors, rtol=1e-5, atol=1e-6)
  gcs_layout, local_layout = read_summary(gcs_run)["layout"], read_summary(str(out))["layout"]
  assert gcs_layout["backbones"] == local_layout["backbones"]  # same file, same fingerprint


def test_multi_process_run_on_gcs_gives_the_same_rows(gcs_run, bucket):
  # SDK worker processes are fresh interpreters: gs:// reaches them through the
  # environment (emulator host, credentials file) and the run's config through the DoFn.
  output = f"{bucket}/runs/multi"
  assert run(_args(f"{bucket}/photos/**", output, f"{bucket}/weights",
                   "--direct_running_mode=multi_processing", "--direct_num_workers=2")) == 0
  one_names, one = _by_name(_tables(gcs_run, "embeddings")[1])
  two_names, two = _by_name(_tables(output, "embeddings")[1])
  assert one_names == two_names
  np.testing.assert_allclose(two, one, rtol=1e-5, atol=1e-6)
  assert read_summary(output)["counts"]["failed"] == 1
