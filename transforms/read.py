"""Read stage: a file's bytes and their sha256; gs:// with one request per file, every other scheme through Beam's FileSystems."""

import errno
import hashlib
import io
import os
import stat
import threading
from typing import Optional

from apache_beam.io.filesystems import FileSystems

from transforms import store

_CHUNK = 8 << 20
_GCS_PREFIX = "gs://"

# One storage client per thread: FileSystems.open on gs:// builds a new GcsIO and
# storage.Client per call (credentials lookup, a background bucket-metadata GET), then
# sends a metadata GET, a media GET and an empty media GET at EOF: three to four
# round trips per file where one does. Per thread rather than per process because
# requests.Session is not documented as thread-safe and its connection pool keeps 10
# connections, fewer than the --read-threads (16) reads in flight.
_clients = threading.local()
# Every process that reads (the launcher, each worker) imports this module: Beam's GcsIO in it
# (listing, Parquet sinks, checkpoints) retries under the same outage deadline as these reads.
store.install()


class NotARegularFile(OSError):
  """A local path that names a FIFO, a socket or a device: its read could wait for a writer, or never end."""


class FileTooLarge(Exception):
  """A file larger than the caller will hold (`max_bytes`, or the size its listing gave): not read."""

  def __init__(self, size: int, limit: int, exact: bool = True):
    # Not `exact`: a download stopped past `limit`, its size unknown (more than `limit`).
    self.what = f"{size:,} bytes" if exact else f"more than {limit:,} bytes"
    super().__init__(f"the file is {self.what}, over the {limit:,} allowed")
    self.size, self.limit = size, limit


class _CappedBuffer(io.BytesIO):
  """A read's buffer that holds at most `limit` bytes (None: any): the write that would pass it raises
  FileTooLarge, which stops a download there (no retry policy retries it)."""

  def __init__(self, limit: Optional[int]):
    super().__init__()
    self._limit = limit

  def write(self, data) -> int:
    if self._limit is not None and self.tell() + len(data) > self._limit:
      raise FileTooLarge(self._limit + 1, self._limit, exact=False)
    return super().write(data)


def read_bytes(uri: str, max_bytes=None, listed_size=None) -> bytes:
  """Whole file contents: local paths, gs:// and every other Beam filesystem.

  Nothing over `max_bytes` is read (FileTooLarge): on any filesystem by `listed_size` (what its
  listing said, where known), and a local path by fstat, and only when it names a regular file
  (else NotARegularFile, or IsADirectoryError): a FIFO, /dev/zero or a 20 GB file in an input
  folder costs its own error, not a read thread or the worker's memory. Where no size is known (a
  manifest's row), a download stops at the first chunk past `max_bytes`.
  """
  if max_bytes is not None and listed_size is not None and listed_size > max_bytes:
    raise FileTooLarge(listed_size, max_bytes)
  if uri.startswith(_GCS_PREFIX):
    client = _gcs_client()
    if client is not None:
      storage_client, retry = client
      bucket, _, name = uri[len(_GCS_PREFIX):].partition("/")
      if bucket and name:
        # raw_download: the stored bytes, as Beam's reader returns them, even for objects
        # GCS would otherwise gunzip on the fly; the download's crc32c is still checked.
        blob = storage_client.bucket(bucket).blob(name)
        if max_bytes is None:
          return blob.download_as_bytes(raw_download=True, retry=retry)
        # download_as_bytes' own download into a buffer that stops past the ceiling; one request
        # still, and the whole object's crc32c checked as before when it fits.
        buffer = _CappedBuffer(max_bytes)
        blob.download_to_file(buffer, raw_download=True, retry=retry)
        return buffer.getvalue()
  if FileSystems.get_scheme(uri) is None:
    # A local path: what Beam's LocalFileSystem does in the end, without its per-call lookups of
    # the filesystem and compression (~0.05 ms a file, under the GIL the model's thread needs).
    return _read_local(uri, max_bytes)
  return _read_through_filesystems(uri, max_bytes)


def _read_local(path: str, max_bytes) -> bytes:
  # O_NONBLOCK: opening a FIFO must not wait for a writer (a regular file ignores the flag).
  fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
  try:
    info = os.fstat(fd)
    if stat.S_ISDIR(info.st_mode):
      raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    if not stat.S_ISREG(info.st_mode):
      raise NotARegularFile(f"not a regular file (a FIFO, a socket or a device), so it was not read: {path!r}")
    if max_bytes is not None and info.st_size > max_bytes:
      raise FileTooLarge(info.st_size, max_bytes)
  except BaseException:
    os.close(fd)
    raise
  with open(fd, "rb") as f:
    return f.read()


def _read_through_filesystems(uri: str, max_bytes=None) -> bytes:
  buffer = _CappedBuffer(max_bytes)
  with FileSystems.open(uri, compression_type="uncompressed") as f:
    # Never a chunk of more than the one byte past the ceiling that tells the file is over it.
    while chunk := f.read(_CHUNK if max_bytes is None else min(_CHUNK, max_bytes + 1 - buffer.tell())):
      buffer.write(chunk)
  return buffer.getvalue()


def _gcs_options():
  # The options FileSystems would hand a GCSFileSystem: the pipeline's when it set
  # them (local runner), else the worker's runtime options (Dataflow, portable runners).
  from apache_beam.options.value_provider import RuntimeValueProvider
  return FileSystems._pipeline_options or RuntimeValueProvider.runtime_options


def _gcs_client():
  """(storage.Client, retry) for this thread, built the way Beam's GcsIO builds its own;
  None when Beam's GCP extra is not installed (FileSystems then says what is missing)."""
  options = _gcs_options()
  # Rebuilt when what it was built from changes: another pipeline's options in this
  # process, a forked child (sockets must not be shared), another emulator in tests.
  key = (os.getpid(), os.environ.get("STORAGE_EMULATOR_HOST"), store.OUTAGE)
  cached = getattr(_clients, "entry", None)
  if cached is not None and cached[0] is options and cached[1] == key:
    return cached[2]
  try:
    from apache_beam.io.gcp import gcsio
    from apache_beam.options.pipeline_options import PipelineOptions
  except ImportError:
    return None
  if options is None:
    view = PipelineOptions([])
  elif isinstance(options, dict):
    view = PipelineOptions.from_dictionary(options)
  else:
    view = options
  client = (gcsio.create_storage_client(view), store.retry())
  _clients.entry = (options, key, client)
  return client


def sha256_hex(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()
