"""Read stage: a file's bytes and their sha256, through Beam's FileSystems (local or gs://)."""

import hashlib

from apache_beam.io.filesystems import FileSystems

_CHUNK = 8 << 20


def read_bytes(uri: str) -> bytes:
  """Whole file contents; FileSystems so gs:// and every Beam filesystem work, not just local paths."""
  with FileSystems.open(uri, compression_type="uncompressed") as f:
    chunks = []
    while True:
      chunk = f.read(_CHUNK)
      if not chunk:
        break
      chunks.append(chunk)
  return b"".join(chunks)


def sha256_hex(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()
