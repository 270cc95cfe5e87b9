"""tests/fault_proxy.py against the GCS emulator: requests counted by kind, faults as asked, seeded."""

import http.client
import urllib.parse

import pytest
from apache_beam.io.filesystems import FileSystems
from google.api_core import exceptions as api_exceptions

from tests.fault_proxy import FaultProxy, request_kind
from transforms.read import read_bytes


def _write(path, data):
  with FileSystems.create(path, compression_type="uncompressed") as f:
    f.write(data)


def _raw_get(proxy, path):
  """(status, declared length, body received) of one GET, without any client's retries."""
  url = urllib.parse.urlsplit(proxy.url)
  conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
  try:
    conn.request("GET", path)
    response = conn.getresponse()
    try:
      return response.status, int(response.getheader("Content-Length")), response.read()
    except http.client.IncompleteRead as e:
      return response.status, int(response.getheader("Content-Length")), e.partial
  finally:
    conn.close()


def test_request_kinds_as_gcs_spells_paths():
  assert request_kind("GET", "/storage/v1/b/b/o?prefix=p%2F&pageToken=x") == ("list", None)
  assert request_kind("GET", "/download/storage/v1/b/b/o/a%2Fx.jpg?alt=media") == ("read", "gs://b/a/x.jpg")
  assert request_kind("GET", "/storage/v1/b/b/o/a%2Fx.jpg?alt=media") == ("read", "gs://b/a/x.jpg")
  assert request_kind("GET", "/storage/v1/b/b/o/a%2Fx.jpg?projection=noAcl") == ("metadata", "gs://b/a/x.jpg")
  assert request_kind("POST", "/upload/storage/v1/b/b/o?uploadType=multipart") == ("upload", None)
  assert request_kind("POST", "/upload/storage/v1/b/b/o?uploadType=resumable&name=a.bin")[0] == "resumable"
  assert request_kind("PUT", "/upload/storage/v1/b/b/o?uploadType=resumable&upload_id=7")[0] == "resumable"
  assert request_kind("DELETE", "/storage/v1/b/b/o/x") == ("delete", "gs://b/x")
  assert request_kind("POST", "/storage/v1/b/b/o/x/rewriteTo/b/b/o/y") == ("copy", "gs://b/x")
  assert request_kind("POST", "/batch/storage/v1") == ("batch", None)
  assert request_kind("GET", "/storage/v1/b/b") == ("bucket", None)


def test_counts_beams_and_the_readers_requests_by_kind(gcs_proxy):
  bucket = gcs_proxy.bucket
  _write(f"{bucket}/a/x.jpg", b"x" * 1000)
  _write(f"{bucket}/a/y.jpg", b"y" * 1000)
  assert gcs_proxy.counts["upload"] + gcs_proxy.counts["resumable"] >= 2
  gcs_proxy.reset_counts()

  assert sorted(m.path for m in FileSystems.match([f"{bucket}/a/*.jpg"])[0].metadata_list) == [
      f"{bucket}/a/x.jpg", f"{bucket}/a/y.jpg"]
  assert gcs_proxy.counts["list"] == 1
  assert read_bytes(f"{bucket}/a/x.jpg") == b"x" * 1000
  assert gcs_proxy.counts["read"] == 1
  FileSystems.delete([f"{bucket}/a/y.jpg"])
  assert gcs_proxy.counts["batch"] + gcs_proxy.counts["delete"] >= 1
  assert gcs_proxy.injected() == 0
  assert {outcome for _, outcome in gcs_proxy.outcomes} == {"ok"}


@pytest.mark.parametrize("status, error", [(404, api_exceptions.NotFound), (403, api_exceptions.Forbidden)])
def test_denied_object_is_listed_but_answers_its_status(gcs_proxy, status, error):
  uri = f"{gcs_proxy.bucket}/gone.jpg"
  _write(uri, b"bytes")
  gcs_proxy.deny(uri, status)
  assert [m.path for m in FileSystems.match([f"{gcs_proxy.bucket}/*.jpg"])[0].metadata_list] == [uri]
  with pytest.raises(error):
    read_bytes(uri)
  assert gcs_proxy.outcomes[("read", f"deny {status}")] == 1  # a permanent answer: not retried


def test_a_cut_read_gets_half_its_body_then_the_connection_closes(gcs_proxy):
  _write(f"{gcs_proxy.bucket}/big.bin", bytes(range(256)) * 400)
  gcs_proxy.faults(p_reset=1.0, kinds={"read"})
  status, length, body = _raw_get(gcs_proxy, "/download/storage/v1/b/test-bucket/o/big.bin?alt=media")
  assert (status, length, len(body)) == (200, 102400, 51200)
  assert body == (bytes(range(256)) * 400)[:51200]
  # google-cloud-storage retries the cut download and resumes it to the same bytes.
  gcs_proxy.faults(p_reset=0.5, kinds={"read"})
  assert read_bytes(f"{gcs_proxy.bucket}/big.bin") == bytes(range(256)) * 400
  assert gcs_proxy.outcomes[("read", "reset")] >= 1


def test_down_after_some_requests_and_up_again(gcs_proxy):
  _write(f"{gcs_proxy.bucket}/x.jpg", b"x")
  gcs_proxy.down(kind="list", status=503, after=2)
  path = "/storage/v1/b/test-bucket/o"
  assert [_raw_get(gcs_proxy, path)[0] for _ in range(4)] == [200, 200, 503, 503]
  assert _raw_get(gcs_proxy, "/download/storage/v1/b/test-bucket/o/x.jpg?alt=media")[0] == 200  # other kinds
  gcs_proxy.up()
  assert _raw_get(gcs_proxy, path)[0] == 200
  assert gcs_proxy.outcomes[("list", "down 503")] == 2


def test_once_faults_the_next_request_of_that_kind(gcs_proxy):
  _write(f"{gcs_proxy.bucket}/x.jpg", b"x")
  gcs_proxy.once("list", "429")
  gcs_proxy.once("list", "503")
  read = "/download/storage/v1/b/test-bucket/o/x.jpg?alt=media"
  assert _raw_get(gcs_proxy, read)[0] == 200
  assert [_raw_get(gcs_proxy, "/storage/v1/b/test-bucket/o")[0] for _ in range(3)] == [429, 503, 200]


def test_fault_choices_are_seeded(gcs_proxy):
  _write(f"{gcs_proxy.bucket}/x.jpg", b"x")

  def statuses(seed):
    other = FaultProxy(gcs_proxy.url, seed=seed)  # in front of the first: same emulator
    try:
      other.faults(p503=0.3, p429=0.2)
      return [_raw_get(other, "/storage/v1/b/test-bucket/o")[0] for _ in range(30)]
    finally:
      other.close()

  first = statuses(3)
  assert first == statuses(3)
  assert first != statuses(4)
  assert {200, 503, 429} == set(first)
