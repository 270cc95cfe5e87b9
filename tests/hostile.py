"""Hostile image files made here: containers that declare a small image and hold a huge one,
pixel bombs, and files for the test-only Pillow plugin (tests/hostile_plugin.py) that crash or
hang the decoder, which no real file does to current Pillow."""

import struct
import zlib

from tests.corpus import _png_chunks

ABORT_MAGIC = b"EMBEDTEST-ABORT\n"  # the plugin calls os.abort(): a codec's crash
BLOCK_MAGIC = b"EMBEDTEST-BLOCK\n"  # the plugin blocks forever: an endless decode
PLUGIN_MODULE = "tests.hostile_plugin"


def blank_png(width: int, height: int, color_type: int = 6, complete: bool = True) -> bytes:
  """An all-zero 8-bit PNG (colour type 6 = RGBA, 2 = RGB, 0 = grey), its rows streamed through
  zlib so the picture is never held here. Incomplete: only the first 1000 rows of data."""
  channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
  rows = min(height, 1000)
  block = bytes((width * channels + 1) * rows)
  compressor = zlib.compressobj(9)
  parts = [compressor.compress(block) for _ in range(height // rows if complete else 1)]
  if complete and height % rows:
    parts.append(compressor.compress(bytes((width * channels + 1) * (height % rows))))
  parts.append(compressor.flush())
  return _png_chunks(width, height, 8, color_type, b"".join(parts))


def icns_with_inner_png(inner: bytes) -> bytes:
  """An ICNS whose only icon is the 256x256 PNG slot (`ic08`), holding `inner` whatever its size:
  the header says 256x256, and Pillow learns the true size only inside its loader."""
  entry = b"ic08" + struct.pack(">I", 8 + len(inner)) + inner
  return b"icns" + struct.pack(">I", 8 + len(entry)) + entry


def plugin_file(magic: bytes, size: int = 1024) -> bytes:
  return magic + bytes(size)
