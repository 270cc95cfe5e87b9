"""A test-only Pillow plugin, imported into decode processes through EMBED_IMAGES_DECODE_PLUGINS:
files starting with ABORT_MAGIC crash the process (os.abort, as a codec's segfault would) and
files starting with BLOCK_MAGIC never finish decoding. It touches `<file>.started` beside
EMBEDTEST_MARKER_DIR when it blocks, so a test can wait on that event rather than a sleep."""

import os
import select
import time

from PIL import Image, ImageFile

from tests.hostile import ABORT_MAGIC, BLOCK_MAGIC


def _accept(prefix: bytes) -> bool:
  return prefix.startswith((ABORT_MAGIC, BLOCK_MAGIC))


class HostileImageFile(ImageFile.ImageFile):
  format = "EMBEDTEST"
  format_description = "test-only misbehaving decoder"

  def _open(self):
    self._magic = self.fp.read(len(ABORT_MAGIC))
    self._mode = "RGB"
    self._size = (16, 16)

  def load(self):
    if self._magic == ABORT_MAGIC:
      os.abort()
    marker = os.environ.get("EMBEDTEST_MARKER_DIR")
    if marker:
      with open(os.path.join(marker, f"blocked-{os.getpid()}-{time.monotonic_ns()}"), "w"):
        pass
    while True:  # an endless decode: only killing the process stops it
      select.select([], [], [], 3600)


Image.register_open(HostileImageFile.format, HostileImageFile, _accept)
