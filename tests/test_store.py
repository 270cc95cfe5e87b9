"""A flaky or dead store, end to end: gs:// -> gs:// command-line runs through tests/fault_proxy.py."""

import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystems import FileSystems

from tests.corpus import noise_jpeg
from tests.fault_proxy import fault_proxy
from tests.gcs_emulator import gcs_emulator
from transforms import store
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




def _cli(*args, retry_seconds=None):
  """`python -m pipeline ARGS` in a fresh process: (exit status, stderr)."""
  env = dict(os.environ, PYTHONPATH=REPO)
  env.pop(store.ENV, None)
  if retry_seconds is not None:
    args = (*args, "--store-retry-seconds", str(retry_seconds))
  done = subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=REPO,
                        timeout=540, env=env)
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
def bucket():
  """(proxy, the images' uris): N_IMAGES small JPEGs in gs://store-bucket/photos/ (two folders deep)."""
  with gcs_emulator("store-bucket") as name, fault_proxy(seed=21) as proxy:
    bucket = f"gs://{name}"
    uris = [f"{bucket}/photos/{'a' if i % 2 else 'b'}/{i:03d}.jpg" for i in range(N_IMAGES)]
    for i, uri in enumerate(uris):
      _put(uri, noise_jpeg(i))
    proxy.bucket = bucket
    yield proxy, uris


@pytest.fixture(scope="module")
def clean_run(bucket):
  proxy, uris = bucket
  output = f"{proxy.bucket}/clean"
  proxy.reset_counts()
  status, stderr = _cli("--input", f"{proxy.bucket}/photos/**/*.jpg", "--output", output, *MODEL)
  assert status == 0, stderr
  return output, sum(proxy.counts.values())


def _flaky_run(proxy, forced, output, *args):
  """A command-line run into `output` through 10% 503s, 5% 429s and 2% resets on every kind of request, plus
  one fault for sure on each (kind, outcome) of `forced`: its summary's counts, once each forced fault was seen
  and the run ended `ok` with no row failed."""
  proxy.reset_counts()
  proxy.faults(p503=0.10, p429=0.05, p_reset=0.02)
  for kind, outcome in forced:
    proxy.once(kind, outcome)
  try:
    status, stderr = _cli("--input", f"{proxy.bucket}/photos/**/*.jpg", "--output", output, *MODEL, *args)
  finally:
    proxy.faults()
  print(f"\n{sum(proxy.counts.values())} requests, {proxy.injected()} faults injected: {sorted(proxy.outcomes.items())}")
  for kind, outcome in forced:
    assert proxy.outcomes[(kind, outcome)] >= 1, (kind, outcome)
  assert status == 0, stderr
  summary = read_summary(output)
  assert summary["status"] == "ok" and summary["counts"]["failed"] == 0
  return summary["counts"]


def _same_vectors(output, clean_output, uris):
  names, vectors = _vectors(output)
  clean_names, clean_vectors = _vectors(clean_output)
  assert names == clean_names == sorted(uris)
  return vectors, clean_vectors


def test_a_flaky_store_costs_requests_never_rows(bucket, clean_run):
  proxy, uris = bucket
  clean_output, clean_requests = clean_run
  output = f"{proxy.bucket}/flaky"
  # Every kind the run makes takes a fault: the listing, a read cut in half, a resumable upload
  # (Parquet files, checkpoints) reset before it is forwarded, a batch (deletes).
  counts = _flaky_run(proxy, (("list", "503"), ("read", "reset"), ("resumable", "reset"), ("batch", "429")), output,
                      "--checkpoint-every", "0.001")
  print(f"(without faults: {clean_requests} requests)")
  assert counts["embedded"] == N_IMAGES
  assert _table(output, "errors") is None or _table(output, "errors").num_rows == 0
  np.testing.assert_allclose(*_same_vectors(output, clean_output, uris), rtol=1e-5, atol=1e-6)


def test_a_refresh_on_a_flaky_store_copies_the_previous_files_whole_and_loses_no_row(bucket, clean_run):
  # An unchanged refresh copies the previous run's files whole (a rewrite inside the store): the copies
  # take faults too, as do the listing, the index reads and the summary's writes.
  proxy, uris = bucket
  clean_output, _ = clean_run
  output = f"{proxy.bucket}/flaky-refresh"
  counts = _flaky_run(proxy, (("list", "503"), ("copy", "503"), ("copy", "reset"), ("read", "reset")), output,
                      "--previous", clean_output)
  assert (counts["carried_over"], counts["embedded"]) == (N_IMAGES, 0)
  assert not [uri for kind, uri in proxy.requests if kind == "read" and uri.startswith(f"{proxy.bucket}/photos/")]
  copied = [_get(m.path) for m in FileSystems.match([f"{output}/embeddings-*.parquet"])[0].metadata_list]
  previous = [_get(m.path) for m in FileSystems.match([f"{clean_output}/embeddings-*.parquet"])[0].metadata_list]
  # Each previous file copied whole, byte for byte; beside them, the embed step's own file has no row.
  assert sorted(data for data in copied if data in previous) == sorted(previous)
  assert all(pq.read_metadata(pa.BufferReader(data)).num_rows == 0 for data in copied if data not in previous)
  np.testing.assert_array_equal(*_same_vectors(output, clean_output, uris))


@pytest.mark.parametrize("status", [404, 403])
def test_a_permanent_answer_is_one_read_error_row_naming_the_status(bucket, status):
  proxy, uris = bucket
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


# --- the outage deadline, alone ----------------------------------------------------------------

class _Clock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def _http_error(code):
  from google.api_core import exceptions as api_exceptions
  return api_exceptions.from_http_status(code, "injected")


def test_outage_runs_from_the_first_failure_until_a_success():
  clock = _Clock()
  outage = store.Outage(seconds=10, clock=clock)
  assert outage.failed(_http_error(503)) and not outage.expired
  clock.now = 9.9
  assert outage.failed(_http_error(429))  # across calls: the first failure started it
  clock.now = 10.0
  assert outage.expired and not outage.failed(_http_error(503))
  assert "last status: 503 ServiceUnavailable" in str(outage.error())
  outage.succeeded()  # one answer: the store is back, a new outage starts from zero
  assert not outage.expired
  clock.now = 19.0
  assert outage.failed(_http_error(503)) and not outage.expired


def test_unavailable_is_found_inside_the_text_beam_wraps_it_in():
  error = store.StoreUnavailable("gs://b", "503 ServiceUnavailable", 120)
  wrapped = RuntimeError(f"Pipeline failed [while running 'Embed']: {error!r} ...")
  assert store.unavailable_in(wrapped) == ("gs://b", "503 ServiceUnavailable")
  assert store.unavailable_in(RuntimeError("no such object")) is None


def test_a_store_that_stays_down_is_given_up_on_only_once_the_deadline_has_passed(monkeypatch):
  # google's own `timeout` gives up when its next sleep would pass the deadline: up to a whole sleep
  # early, while the message says no request succeeded for the whole deadline. The real clock here:
  # what is checked is a lower bound that holds however fast this machine is.
  import time
  monkeypatch.setattr(store, "OUTAGE", store.Outage(seconds=0.4))
  failures = []

  def down():
    failures.append(time.monotonic())
    raise _http_error(503)

  with pytest.raises(store.StoreUnavailable, match="last status: 503") as raised:
    store.retry()(down)()
  assert failures[-1] - failures[0] >= 0.4, [round(t - failures[0], 3) for t in failures]
  assert raised.value.seconds == 0.4 and len(failures) >= 3


def test_retry_gives_up_once_the_deadline_passed_and_permanent_answers_at_once(monkeypatch):
  clock = _Clock()
  # The deadline is read off the injected clock; 0.1 s only scales the backoff's real sleeps down.
  monkeypatch.setattr(store, "OUTAGE", store.Outage(seconds=0.1, clock=clock))
  calls = []

  def failing(code):
    def call():
      calls.append(code)
      if code == 503 and len(calls) == 3:
        clock.now += 0.1  # the third try is past the deadline
      raise _http_error(code)
    return call

  with pytest.raises(store.StoreUnavailable, match="last status: 503"):
    store.retry()(failing(503))()
  assert len(calls) == 3
  calls.clear()
  with pytest.raises(store.StoreUnavailable):  # the outage goes on: the next call does not retry
    store.retry()(failing(503))()
  assert len(calls) == 1
  calls.clear()
  from google.api_core import exceptions as api_exceptions
  with pytest.raises(api_exceptions.NotFound):
    store.retry()(failing(404))()
  assert len(calls) == 1
  assert store.retry()(lambda: "ok")() == "ok" and not store.OUTAGE.expired


# --- a store that stays down ----------------------------------------------------------------------
# A deadline of 2 s (--store-retry-seconds 2) in place of 120: what is asserted is where the
# run stops and what it says, and how many requests it made, never how long it took.

def _last_line(stderr):
  return stderr.strip().splitlines()[-1]


def test_a_store_down_at_launch_is_one_line_naming_it_and_its_status(store_down_at_launch):
  code, stderr, requests = store_down_at_launch
  assert code == 2, stderr
  line = _last_line(stderr)
  assert line.startswith("embed-images: error: --input ")
  assert "gs://store-bucket" in line and "unavailable" in line and "503" in line, line
  assert "matched no file" not in stderr and "Traceback" not in stderr
  assert requests["list"] <= 20, requests  # one call's retries, then every call fails at once


@pytest.fixture(scope="module")
def store_down_at_launch(bucket):
  proxy, _ = bucket
  proxy.reset_counts()
  proxy.down(status=503)
  try:
    code, stderr = _cli("--input", f"{proxy.bucket}/photos/**/*.jpg", "--output", f"{proxy.bucket}/down",
                        *MODEL, retry_seconds=2)
  finally:
    proxy.up()
  return code, stderr, dict(proxy.counts)


def test_reads_down_after_the_listing_stop_the_run_and_resume_goes_on(bucket, clean_run):
  proxy, uris = bucket
  output = f"{proxy.bucket}/reads-down"
  # One read thread: the first batch's 8 reads (one decode group) go through and its rows are
  # committed, then every read fails.
  args = ("--input", f"{proxy.bucket}/photos/**/*.jpg", "--output", output, *MODEL, "--checkpoint-every", "0.001",
          "--read-threads", "1", "--decode-threads", "1")
  proxy.reset_counts()
  proxy.down(kind="read", status=503, after=8)
  try:
    code, stderr = _cli(*args, retry_seconds=2)
  finally:
    proxy.up()
  line = _last_line(stderr)
  assert code == 1, stderr
  assert line.startswith("embed-images: error: the store gs://store-bucket is unavailable"), line
  assert "503" in line and "--resume" in line, line
  assert proxy.counts["read"] < 8 + 16 * 12, dict(proxy.counts)  # the reads in flight, each a few tries
  with pytest.raises(Exception):
    read_summary(output)  # partial: no _SUCCESS.json
  assert not _table(output, "errors") or not _table(output, "errors").num_rows  # no row blames a file

  proxy.reset_counts()
  code, stderr = _cli(*args, "--resume")
  assert code == 0, stderr
  summary = read_summary(output)
  assert summary["status"] == "ok" and summary["counts"]["failed"] == 0
  assert summary["counts"]["embedded"] + summary["counts"].get("resumed", 0) == N_IMAGES
  assert summary["counts"].get("resumed", 0) == 8  # what the stopped run committed went on from there
  names, vectors = _vectors(output)
  clean_names, clean_vectors = _vectors(clean_run[0])
  assert names == clean_names
  np.testing.assert_allclose(vectors, clean_vectors, rtol=1e-5, atol=1e-6)
  print(f"\nreads down after 8: resumed {summary['counts'].get('resumed', 0)}, "
        f"{proxy.counts['read']} reads on --resume")


def test_opening_a_file_for_reading_retries_its_metadata_under_the_deadline(bucket, monkeypatch):
  # Beam's reader (the previous run's Parquet, checkpoints) reloads the object's metadata first,
  # with google's default retry (120 s) unless transforms/store.py hands it ours.
  from google.api_core.retry import retry_base, retry_unary

  from transforms import read  # noqa: F401  (installs the policy in this process, as every worker does)
  proxy, uris = bucket
  # One injected clock for the outage deadline and google's retry loop: it moves only by the
  # backoff's sleeps, which are not slept, so how many tries fit is this machine's speed's business no more.
  clock, slept = _Clock(), []

  def sleep(seconds):
    slept.append(seconds)
    clock.now += seconds

  monkeypatch.setattr(retry_unary, "time", type("FakeTime", (), {"monotonic": staticmethod(clock), "sleep": staticmethod(sleep)}))
  monkeypatch.setattr(retry_base, "time", retry_unary.time)
  monkeypatch.setattr(store, "OUTAGE", store.Outage(seconds=2, clock=clock))
  proxy.reset_counts()
  proxy.down(kind="metadata", status=503)
  try:
    with pytest.raises(store.StoreUnavailable, match="last status: 503"):
      FileSystems.open(uris[0], compression_type="uncompressed")
  finally:
    proxy.up()
  assert len(slept) >= 2, slept  # retried with backoff...
  assert proxy.counts["metadata"] == len(slept) + 1, (dict(proxy.counts), slept)  # ...each try reached the store...
  # ...and gave up at the first try past the 2 s deadline: at most one sleep (the backoff's cap, 0.5 s) after it.
  assert 2 <= sum(slept) < 2 + 0.5, slept
  assert _get(uris[0]) == noise_jpeg(0)  # the store back: the same call reads again
