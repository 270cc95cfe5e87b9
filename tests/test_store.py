"""A flaky or dead store, end to end: gs:// -> gs:// command-line runs through tests/fault_proxy.py."""

import io
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystems import FileSystems
from PIL import Image

from tests.fault_proxy import fault_proxy
from tests.gcs_emulator import gcs_emulator
from transforms.write import embedding_matrix, read_summary

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_IMAGES = 24
MODEL = ("--backbones", "mobilenet_v3_small", "--image-size", "32", "--weights", "random", "--batch-size", "8")


def _put(uri, data):
  with FileSystems.create(uri, compression_type="uncompressed") as f:
    f.write(data)


def _get(uri):
  with FileSystems.open(uri, compression_type="uncompressed") as f:
    return f.read()


def _jpeg(seed):
  pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, format="JPEG", quality=90)
  return out.getvalue()


def _cli(*args):
  """`python -m pipeline ARGS` in a fresh process: (exit status, stderr)."""
  done = subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=REPO,
                        timeout=540, env=dict(os.environ, PYTHONPATH=REPO))
  return done.returncode, done.stderr


def _table(output, prefix):
  files = sorted(m.path for m in FileSystems.match([f"{output}/{prefix}-*.parquet"])[0].metadata_list)
  if not files:
    return None
  return pa.concat_tables(pq.read_table(pa.BufferReader(_get(f))) for f in files)


def _vectors(output):
  table = _table(output, "embeddings")
  order = np.argsort(table.column("uri").to_pylist())
  return [table.column("uri").to_pylist()[i] for i in order], embedding_matrix(table.column("embedding"))[order]


@pytest.fixture(scope="module")
def store():
  """(proxy, the images' uris): N_IMAGES small JPEGs in gs://store-bucket/photos/ (two folders deep)."""
  with gcs_emulator("store-bucket") as name, fault_proxy(seed=21) as proxy:
    bucket = f"gs://{name}"
    uris = [f"{bucket}/photos/{'a' if i % 2 else 'b'}/{i:03d}.jpg" for i in range(N_IMAGES)]
    for i, uri in enumerate(uris):
      _put(uri, _jpeg(i))
    proxy.bucket = bucket
    yield proxy, uris


@pytest.fixture(scope="module")
def clean_run(store):
  proxy, uris = store
  output = f"{proxy.bucket}/clean"
  proxy.reset_counts()
  status, stderr = _cli("--input", f"{proxy.bucket}/photos/**/*.jpg", "--output", output, *MODEL)
  assert status == 0, stderr
  return output, sum(proxy.counts.values())


def test_a_flaky_store_costs_requests_never_rows(store, clean_run):
  proxy, uris = store
  clean_output, clean_requests = clean_run
  output = f"{proxy.bucket}/flaky"
  proxy.reset_counts()
  proxy.faults(p503=0.10, p429=0.05, p_reset=0.02)
  # The draws aside, one fault for sure on each kind the run makes: the listing, a read cut in half,
  # a resumable upload (Parquet files, checkpoints) reset before it is forwarded, a batch (deletes).
  for kind, outcome in (("list", "503"), ("read", "reset"), ("resumable", "reset"), ("batch", "429")):
    proxy.once(kind, outcome)
  try:
    status, stderr = _cli("--input", f"{proxy.bucket}/photos/**/*.jpg", "--output", output, *MODEL,
                          "--checkpoint-every", "0.001")
  finally:
    proxy.faults()
  injected = proxy.injected()
  print(f"\nflaky store: {sum(proxy.counts.values())} requests ({clean_requests} without faults), "
        f"{injected} faults injected: {sorted(proxy.outcomes.items())}")
  assert status == 0, stderr
  assert injected > 0
  # every kind of request the run makes took faults: listing, reads, writes
  for kind, outcome in (("list", "503"), ("read", "reset"), ("resumable", "reset"), ("batch", "429")):
    assert proxy.outcomes[(kind, outcome)] >= 1, (kind, outcome)

  summary = read_summary(output)
  assert summary["status"] == "ok"
  assert summary["counts"]["embedded"] == N_IMAGES and summary["counts"]["failed"] == 0
  assert _table(output, "errors") is None or _table(output, "errors").num_rows == 0
  names, vectors = _vectors(output)
  clean_names, clean_vectors = _vectors(clean_output)
  assert names == clean_names == sorted(uris)
  np.testing.assert_allclose(vectors, clean_vectors, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("status", [404, 403])
def test_a_permanent_answer_is_one_read_error_row_naming_the_status(store, status):
  proxy, uris = store
  output = f"{proxy.bucket}/denied-{status}"
  denied = uris[3]
  proxy.reset_counts()
  proxy.deny(denied, status)
  try:
    code, stderr = _cli("--input", f"{proxy.bucket}/photos/**/*.jpg", "--output", output, *MODEL,
                        "--max-failure-fraction", "0.5")
  finally:
    proxy.deny(denied, None)
  assert code == 0, stderr
  errors = _table(output, "errors").to_pylist()
  assert [(e["uri"], e["stage"]) for e in errors] == [(denied, "read")]
  assert str(status) in errors[0]["message"], errors[0]
  assert proxy.outcomes[("read", f"deny {status}")] == 1  # answered once, not retried
  summary = read_summary(output)
  assert (summary["counts"]["embedded"], summary["counts"]["failed"]) == (N_IMAGES - 1, 1)
