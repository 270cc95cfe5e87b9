"""Beam's own gs:// filesystem against a local `gcp-storage-emulator`, offline.

What it takes (apache-beam 2.77, google-cloud-storage 3.x):

* ``STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT``: Beam's GcsIO builds a plain
  ``google.cloud.storage.Client``, and that client sends every JSON/upload/download/
  batch request to the emulator when this variable is set. No Beam option needed.
* A credential that never touches the network. Beam's GCS filesystem always asks
  ``apache_beam.internal.gcp.auth`` for credentials (``--no_auth`` is honoured only by
  the Dataflow API client, not by GcsIO), which calls ``google.auth.default()`` under a
  retry decorator: with no credentials at all that is ~20-30 s of backoff per process
  before it gives up and goes anonymous. An authorized-user ADC file holding a static
  access token with a far expiry is "found" at once and is never refreshed, so nothing
  is sent to oauth2.googleapis.com; the emulator ignores the bearer header. Because it
  is an env var it also reaches the SDK worker subprocesses of
  ``--direct_running_mode=multi_processing``, which an in-process patch would not.
* The emulator runs as a subprocess: its HTTP server is single-threaded, and in-process
  it would also compete for the GIL with the pipeline under test.
"""

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

_ENV_KEYS = ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _reset_beam_credentials_cache():
  # Beam caches the first credential lookup for the life of the process; without a
  # reset, a lookup made earlier (real ADC, or None) would outlive our env change.
  try:
    from apache_beam.internal.gcp import auth
  except ImportError:
    return
  with auth._Credentials._credentials_lock:
    auth._Credentials._credentials_init = False
    auth._Credentials._credentials = None


# The emulator, as `python -m gcp_storage_emulator` starts it, with two changes:
# - less one cost: in memory, it serializes every object's metadata (its whole `.meta`, indented JSON)
#   after each write, which only a restart on disk reads back. That is quadratic in the objects held:
#   30,720 uploads did not finish in 27 minutes;
# - a listing in pages, as GCS answers one: at most `maxResults` objects (GCS's default and most, 1,000),
#   in name order, and a `nextPageToken` while more remain. The emulator answers every object in one
#   response, so a listing of 30,720 objects was one 30 MB answer, where GCS sends 31 pages.
#   (Only the objects are paged; a `delimiter`'s prefixes come whole, as before.) `startOffset`
#   (inclusive) and `endOffset` (exclusive) bound the names listed, as GCS's do; the emulator ignores them.
_LAUNCH = """
import sys
from gcp_storage_emulator import storage
from gcp_storage_emulator.handlers import objects
_write = storage.Storage._write_config_to_file
def _write_on_disk_only(self):
    if not self._use_memory_fs:
        _write(self)
storage.Storage._write_config_to_file = _write_on_disk_only
_ls = objects.ls
def _paged_ls(request, response, storage, *args, **kwargs):
    answer = response.json
    def paged(listing):
        query = request.query
        size = min(int(query["maxResults"][0]), 1000) if query.get("maxResults") else 1000
        items = sorted(listing.get("items") or [], key=lambda item: item["name"])
        if query.get("pageToken"):
            items = [item for item in items if item["name"] > query["pageToken"][0]]
        if query.get("startOffset"):
            items = [item for item in items if item["name"] >= query["startOffset"][0]]
        if query.get("endOffset"):
            items = [item for item in items if item["name"] < query["endOffset"][0]]
        page = dict(listing, items=items[:size])
        if len(items) > size:
            page["nextPageToken"] = items[size - 1]["name"]
        answer(page)
    response.json = paged
    return _ls(request, response, storage, *args, **kwargs)
objects.ls = _paged_ls  # before the server's routes take it
from gcp_storage_emulator import __main__ as emulator
sys.exit(emulator.main(sys.argv[1:]))
"""


def _start_emulator(bucket):
  # The port is chosen here and bound by the child, so another process could take
  # it in between; retry on a fresh port rather than fail the test.
  last_error = None
  for _ in range(5):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", _LAUNCH, "start",
         "--host", "127.0.0.1", "--port", str(port), "--in-memory",
         "--default-bucket", bucket, "--quiet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = "http://127.0.0.1:%d" % port
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and proc.poll() is None:
      try:
        with urllib.request.urlopen(url + "/", timeout=1) as r:
          if r.status == 200:
            return proc, url
      except OSError:
        time.sleep(0.05)
    last_error = (proc.stderr.read() if proc.poll() is not None else b"timeout")
    _stop_emulator(proc)
  raise RuntimeError("gcp-storage-emulator did not start: %r" % last_error[-2000:])


def _stop_emulator(proc):
  if proc.poll() is None:
    proc.terminate()
    try:
      proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
  if proc.stderr:
    proc.stderr.close()


@contextlib.contextmanager
def gcs_emulator(bucket="test-bucket"):
  """Runs a fresh in-memory emulator holding `bucket`; yields the bucket name.

  While inside, any gs:// access in this process or in children started meanwhile
  (Beam FileSystems, DirectRunner multi_processing workers, google-cloud-storage)
  goes to the emulator with a dummy token and never to Google.
  """
  saved = {k: os.environ.get(k) for k in _ENV_KEYS}
  proc, url = _start_emulator(bucket)
  with tempfile.TemporaryDirectory(prefix="gcs-emulator-") as tmp:
    adc = os.path.join(tmp, "adc.json")
    with open(adc, "w") as f:
      json.dump({
          "type": "authorized_user",
          "client_id": "emulator", "client_secret": "emulator",
          "refresh_token": "emulator",
          "token": "emulator",
          # A future expiry is what keeps google-auth from refreshing the token.
          "expiry": "2999-01-01T00:00:00Z",
      }, f)
    os.environ["STORAGE_EMULATOR_HOST"] = url
    os.environ["GOOGLE_APPLICATION_CREDENTIALS"] = adc
    _reset_beam_credentials_cache()
    try:
      yield bucket
    finally:
      for k, v in saved.items():
        if v is None:
          os.environ.pop(k, None)
        else:
          os.environ[k] = v
      _reset_beam_credentials_cache()
      _stop_emulator(proc)


@pytest.fixture
def gcs_bucket():
  """Yields "gs://test-bucket" served by a fresh emulator for this test."""
  with gcs_emulator("test-bucket") as bucket:
    yield "gs://" + bucket
