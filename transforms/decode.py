"""Decode stage: image bytes -> uint8 RGB arrays, one per target size, equal to Keras's load_img on plain files."""

import dataclasses
import io
import operator
from collections.abc import Mapping, Sequence
from typing import Optional

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError, features

# Read once at import: the default of --max-pixels, whatever a caller later does
# to Pillow's global.
PIL_MAX_PIXELS = Image.MAX_IMAGE_PIXELS
RESIZE_POLICIES = ("squash", "center-crop", "pad")
# The size key of the full decoded image, unresized (EXIF-transposed, alpha on white, RGB): for a
# KerasHub preset, whose own converter resizes it in float (transforms/hub.py).
FULL = 0

# Register every plugin now so the allow-list below sees them all; plugins
# registered later (pillow-heif, ...) still count, since it is rebuilt per call.
Image.init()
# Pillow renders EPS by running Ghostscript in a subprocess: never on untrusted bytes.
_REFUSED_FORMATS = frozenset({"EPS"})

_WHITE = (255, 255, 255)
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
# Pillow's 16-bit and 32-bit integer greys; "I" is what PGM/PNM and older
# Pillows give for 16-bit data, so it is read as 16-bit too (clipped).
_WIDE_GREY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


class DecodeError(Exception):
  """Bad image data; `error_type` is a short snake_case reason for the errors output."""

  def __init__(self, error_type: str, message: str):
    super().__init__(message)
    self.error_type = error_type
    self.message = message

  def __reduce__(self):
    # Exceptions pickle as cls(*args); ours takes two arguments, and Beam
    # pickles whatever crosses a worker boundary.
    return (DecodeError, (self.error_type, self.message))


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
  """How a run decodes: the arguments of `decode_and_resize`, plus the limits a decode process
  enforces (seconds of wall time, bytes of address space) and the names the caller's users know
  these arguments by (e.g. {"max_pixels": "--max-pixels"}), used only to word error messages."""
  sizes: tuple
  resize: str = "squash"
  max_pixels: Optional[int] = PIL_MAX_PIXELS
  fast: bool = False
  timeout: float = 60.0
  memory: Optional[int] = None
  option_names: tuple = ()  # ((argument, name), ...): hashable, so the spec is too

  def name(self, argument: str) -> str:
    return dict(self.option_names).get(argument, argument)


@dataclasses.dataclass
class DecodedImage:
  """Size of the decoded image (after EXIF orientation, before resizing) and one array per target size."""
  width: int
  height: int
  arrays: dict[int, np.ndarray]  # size -> uint8 (size, size, 3); FULL -> (height, width, 3); C-contiguous, read-only


def decode_and_resize(
    data: bytes,
    sizes: Sequence[int],
    resize: str = "squash",
    max_pixels: Optional[int] = PIL_MAX_PIXELS,
    fast: bool = False,
    option_names: Optional[Mapping[str, str]] = None,
) -> DecodedImage:
  """Decodes `data` once and resizes it (bilinear) to each distinct square size; size FULL (0) is
  the decoded image itself, unresized (and then `fast`'s reduced decode is not used).

  With resize="squash" and fast=False, a plain 8-bit RGB or grey file without alpha
  or EXIF orientation gives exactly
  `img_to_array(load_img(path, target_size=(s, s), interpolation="bilinear"))`.
  Beyond that recipe: EXIF orientation is applied, alpha is composited on white,
  16-bit greys are scaled (not clipped) to 8 bits, animations give their first frame.

  Raises DecodeError for any bad data, ValueError for bad arguments. Messages name the
  arguments as `option_names` says (a command line passes {"max_pixels": "--max-pixels"}).
  """
  if resize not in RESIZE_POLICIES:
    raise ValueError(f"`resize` must be one of {RESIZE_POLICIES}; Received: resize={resize!r}")
  try:
    targets = sorted({operator.index(s) for s in sizes})
  except TypeError:
    raise ValueError(f"`sizes` must be integers; Received: sizes={sizes!r}") from None
  if not targets or targets[0] < FULL:
    raise ValueError(f"`sizes` must be a non-empty sequence of positive integers (or {FULL}, the full image); "
                     f"Received: sizes={sizes!r}")
  if max_pixels is not None and max_pixels < 1:
    raise ValueError(f"`max_pixels` must be positive or None (no limit); Received: max_pixels={max_pixels!r}")
  if not data:
    raise DecodeError("empty_file", "the file is empty (0 bytes)")
  name = (option_names or {}).get("max_pixels", "max_pixels")
  try:
    return _decode(data, targets, resize, max_pixels, fast, name)
  except DecodeError:
    raise
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    # Pillow's own guard, which its loaders apply to what they are about to allocate: an
    # inner image of a container (ICNS, ICO, ...) larger than the size its header declares.
    # A decode process turns the warning (over Image.MAX_IMAGE_PIXELS) into this error too.
    raise DecodeError(
        "decompression_bomb",
        f"{e} (Pillow's own check, at Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS or 0:,}; "
        f"a decode process sets it to {name}); the image was not decoded.") from e
  except UnidentifiedImageError as e:
    raise DecodeError("unidentified_image", _unidentified_message(data)) from e
  except MemoryError as e:
    raise DecodeError(
        "too_large",
        "ran out of memory decoding the image (in a decode process: over its memory ceiling); "
        "the file is hostile or larger than the ceiling allows") from e
  except (OSError, SyntaxError) as e:
    # Pillow says "image file is truncated" when the bytes stop early, and
    # "broken/unrecognized data stream" (its codec status) or SyntaxError
    # ("broken PNG file") when they are damaged; nothing else tells them apart.
    text = str(e)
    if isinstance(e, OSError) and "truncated" in text:
      raise DecodeError(
          "truncated_image",
          f"the image data ends early ({text}); the file is incomplete, copy or download it again") from e
    if isinstance(e, SyntaxError) or "data stream" in text or text.startswith("decoder error"):
      raise DecodeError(
          "corrupt_image",
          f"the image data is damaged ({type(e).__name__}: {text}); the file is corrupt, "
          "copy or download it again") from e
    raise DecodeError("decode_error", f"Pillow could not decode the image: {type(e).__name__}: {text}") from e
  except Exception as e:  # whatever a plugin throws on hostile bytes stays this file's failure
    raise DecodeError("decode_error", f"Pillow could not decode the image: {type(e).__name__}: {e}") from e


def open_image(data: bytes, formats):
  """Image.open over the bytes; a decode process swaps in `open_image_for_header_check`."""
  return Image.open(io.BytesIO(data), formats=formats)


def open_image_for_header_check(data: bytes, formats):
  """Image.open without Pillow's size check on the declared size, which `_decode` makes itself
  with a message that names the dimensions and the limit; the loaders' own checks (inner images,
  tiles) still run at load. Only where nothing else uses Pillow meanwhile: a decode process."""
  limit = Image.MAX_IMAGE_PIXELS
  Image.MAX_IMAGE_PIXELS = None
  try:
    return Image.open(io.BytesIO(data), formats=formats)
  finally:
    Image.MAX_IMAGE_PIXELS = limit


def _decode(data, targets, resize, max_pixels, fast, max_pixels_name):
  formats = [f for f in Image.ID if f not in _REFUSED_FORMATS]
  with open_image(data, formats) as img:
    # Image.open has read the header only: the check costs nothing and runs
    # before a single pixel is decompressed.
    width, height = img.size
    if max_pixels is not None and width * height > max_pixels:
      raise DecodeError(
          "decompression_bomb",
          f"the image declares {width}x{height} = {width * height:,} pixels, over the limit of "
          f"{max_pixels:,} ({max_pixels_name}); it was not decoded. If the file is trusted, raise "
          f"{max_pixels_name}.")
    if fast and targets[0] != FULL and isinstance(img, JpegImagePlugin.JpegImageFile):
      # libjpeg's DCT scaling by 1/2, 1/4 or 1/8, chosen so both sides stay >= the
      # largest target: not exact, but skips most of the decode of big photos.
      img.draft("RGB", (targets[-1], targets[-1]))
    img.load()
    if _transpose_for_exif(img):
      width, height = height, width
    work = _to_rgb_or_grey(img)
    arrays = {}
    for size in targets:
      resized = work if size == FULL else _resize(work, size, resize)
      if resized.mode != "RGB":
        # Grey is resized as one band and widened after: the same bytes as
        # Keras's convert-then-resize, for a third of the work.
        resized = resized.convert("RGB")
      arrays[size] = np.asarray(resized)
  return DecodedImage(width=width, height=height, arrays=arrays)


def resize_array(array: np.ndarray, sizes, resize: str = "squash") -> dict:
  """A decoded uint8 HxWx3 (RGB) or HxW (grey) array at each size, as `decode_and_resize` resizes
  the image it decodes: {size: uint8 (size, size, 3)}; FULL: the image itself, as RGB."""
  array = np.asarray(array)
  if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
    raise ValueError(f"an image must be a uint8 array of shape (H, W, 3) or (H, W); received: "
                     f"{array.dtype} {array.shape}")
  work = Image.fromarray(np.ascontiguousarray(array), "L" if array.ndim == 2 else "RGB")
  arrays = {}
  for size in sizes:
    resized = work if size == FULL else _resize(work, size, resize)
    arrays[size] = np.asarray(resized if resized.mode == "RGB" else resized.convert("RGB"))
  return arrays


def _transpose_for_exif(img) -> bool:
  """Applies EXIF orientation in place; True when it swapped width and height."""
  try:
    orientation = img.getexif().get(0x0112, 1)
  except Exception:  # a broken EXIF block must not cost a decodable photo (Keras ignores EXIF too)
    return False
  if orientation not in (2, 3, 4, 5, 6, 7, 8):
    return False
  ImageOps.exif_transpose(img, in_place=True)
  return orientation in (5, 6, 7, 8)


def _to_rgb_or_grey(img):
  """An "RGB" or "L" image with alpha composited on white and wide samples scaled to 8 bits."""
  mode = img.mode
  if mode in ("RGB", "L"):
    if "transparency" not in img.info:
      return img
  elif mode == "1":
    return img.convert("L")
  elif mode in _WIDE_GREY_MODES:
    # Pillow's own convert("L") clips 16-bit values at 255 (a near-white
    # picture); scale the full range instead, rounding to nearest.
    wide = np.asarray(img)
    if mode == "I":
      wide = np.clip(wide, 0, 65535)
    grey = (wide.astype(np.uint32) * 255 + 32767) // 65535
    return Image.fromarray(grey.astype(np.uint8), "L")
  elif mode == "F":
    # Float images are either 0..1 (scientific) or 0..255 (Pillow's own
    # conversions); pick the scale from the data since the mode cannot tell.
    values = np.nan_to_num(np.asarray(img, dtype=np.float32))
    scale = 255.0 if values.size and values.max() <= 1.0 and values.min() >= 0.0 else 1.0
    grey = np.clip(np.rint(values * scale), 0, 255)
    return Image.fromarray(grey.astype(np.uint8), "L")
  if mode in _ALPHA_MODES or "transparency" in img.info:
    # Composite before resizing, so that colours hidden under alpha 0 never
    # bleed into visible pixels.
    rgba = img.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
  return img.convert("RGB")  # P, CMYK, YCbCr, ...


def _resize(img, size, policy):
  width, height = img.size
  if policy == "squash":
    if (width, height) == (size, size):
      return img  # Keras skips resizing here too
    return img.resize((size, size), Image.BILINEAR)
  if policy == "center-crop":
    if (width, height) == (size, size):
      return img
    # Resampling the centre square straight to size x size is "short side to
    # size, then crop the centre" without rounding the long side first.
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return img.resize((size, size), Image.BILINEAR, box=(left, top, left + side, top + side))
  scale = size / max(width, height)
  inner_size = (max(1, round(width * scale)), max(1, round(height * scale)))
  inner = img if inner_size == (width, height) else img.resize(inner_size, Image.BILINEAR)
  if inner_size == (size, size):
    return inner
  canvas = Image.new(img.mode, (size, size), 255 if img.mode == "L" else _WHITE)
  canvas.paste(inner, ((size - inner_size[0]) // 2, (size - inner_size[1]) // 2))
  return canvas


def _unidentified_message(data: bytes) -> str:
  head = data[:16]
  if data[4:8] == b"ftyp" and data[8:12] in (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1"):
    return (f"HEIC/HEIF image (starts with {head!r}): Pillow cannot decode it; convert it to JPEG, "
            "or install and register the pillow-heif plugin on the workers")
  if data[4:8] == b"ftyp" and data[8:12] in (b"avif", b"avis"):
    if features.check("avif"):
      return f"AVIF image (starts with {head!r}) that Pillow's AVIF decoder cannot read: damaged or truncated"
    return (f"AVIF image (starts with {head!r}): this Pillow has no AVIF support; use Pillow 11.3 or "
            "later on the workers (its wheels include it), or convert it to JPEG")
  if data.startswith((b"%!PS", b"\xc5\xd0\xd3\xc6")):
    return f"EPS/PostScript (starts with {head!r}) is refused: rendering it would run Ghostscript"
  stripped = data[:512].lstrip().lower()
  if stripped.startswith((b"<!doctype html", b"<html", b"<?xml", b"<svg", b"{")):
    return (f"not an image but text/markup (starts with {head!r}), often an error page or "
            "API response saved under an image name")
  return (f"Pillow cannot identify an image format in these {len(data):,} bytes "
          f"(they start with {head!r})")
