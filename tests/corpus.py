"""A corpus of image files of every kind the pipeline meets, built from samples/, with what each should give."""

import dataclasses
import io
import pathlib
import struct
import zlib
from typing import Optional

import numpy as np
from PIL import Image, ImageCms, features

SAMPLES = pathlib.Path(__file__).resolve().parent.parent / "samples"


@dataclasses.dataclass(frozen=True)
class Expected:
  ok: bool
  error_type: Optional[str] = None
  # A plain file (8-bit RGB/grey, no alpha, no orientation) holding the pixels this
  # one should decode to: equal for lossless kinds, close for lossy ones.
  twin: Optional[str] = None
  # The plain Keras recipe reads this file correctly, so decode (and the
  # pipeline's embedding) must equal the recipe's exactly.
  recipe: bool = False

  @property
  def stage(self) -> Optional[str]:
    """The errors output's stage for a failure: every corpus failure is in the bytes themselves."""
    return None if self.ok else "decode"


def build_corpus(root: pathlib.Path) -> dict[str, Expected]:
  """Writes the corpus under `root`; returns {relative posix name: Expected}."""
  root = pathlib.Path(root)
  corpus: dict[str, Expected] = {}

  def write(name, data, expected):
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    corpus[name] = expected

  def save(name, img, expected, fmt, **params):
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    write(name, buf.getvalue(), expected)

  plain = Expected(True, recipe=True)
  baseline = (SAMPLES / "astronaut.jpg").read_bytes()
  with Image.open(io.BytesIO(baseline)) as img:
    full = img.convert("RGB")  # 500x375
  # Lossless kinds weigh ~6 bytes a pixel: a smaller photo keeps the corpus a few MB.
  photo = full.resize((320, 240), Image.LANCZOS)
  with Image.open(SAMPLES / "coins.jpg") as img:
    grey = img.convert("L")  # 384x303
  with Image.open(SAMPLES / "rocket.jpg") as img:
    other = img.convert("RGB").resize(photo.size)  # second frame / page: must not be the one decoded

  # JPEG variants; the sample files themselves are real-world encodes.
  write("jpeg_baseline.jpg", baseline, plain)
  write("jpeg_grey.jpg", (SAMPLES / "coins.jpg").read_bytes(), plain)
  write("jpeg_odd_size.jpg", (SAMPLES / "chelsea.jpg").read_bytes(), plain)  # 451x300
  write("jpeg_portrait.jpg", (SAMPLES / "grace_hopper.jpg").read_bytes(), plain)
  save("jpeg_progressive.jpg", full, plain, "JPEG", quality=90, progressive=True)
  save("jpeg_q5.jpg", full, plain, "JPEG", quality=5)
  save("jpeg_q100.jpg", full, plain, "JPEG", quality=100, subsampling=0)
  # Pillow's CMYK->RGB is naive (no ICC) in both Keras's path and ours.
  save("jpeg_q90.jpg", full, plain, "JPEG", quality=90)
  save("jpeg_cmyk.jpg", full.convert("CMYK"), Expected(True, twin="jpeg_q90.jpg", recipe=True), "JPEG",
       quality=90)
  # What cameras, editors and downloads add around the pixels; Keras ignores all of it, and so do we.
  broken_exif = b"Exif\x00\x00II*\x00" + struct.pack("<I", 99_999) + b"\xff" * 20  # IFD offset past the end
  write("jpeg_broken_exif.jpg", _with_app_segment(baseline, 0xE1, broken_exif), plain)
  write("jpeg_trailing_bytes.jpg", baseline + np.random.default_rng(2).bytes(1000), plain)  # data after EOI
  srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
  save("jpeg_icc_profile.jpg", full, plain, "JPEG", quality=90, icc_profile=srgb)
  # A camera's MPO (stereo / multi-picture JPEG): the first picture is jpeg_q90's encode.
  save("camera.mpo", full, Expected(True, twin="jpeg_q90.jpg", recipe=True), "MPO", quality=90, save_all=True,
       append_images=[other.resize(full.size)])

  # Lossless formats holding exactly `photo`'s pixels.
  lossless = Expected(True, twin="png_rgb.png", recipe=True)
  save("png_rgb.png", photo, plain, "PNG", compress_level=1)
  save("png_grey.png", grey, plain, "PNG", compress_level=1)
  save("webp_lossless.webp", photo, lossless, "WEBP", lossless=True, quality=0, method=0)
  save("webp_lossy.webp", photo, Expected(True, twin="png_rgb.png", recipe=True), "WEBP", quality=85)
  if features.check("avif"):  # in Pillow's wheels since 11.3
    save("avif.avif", photo, Expected(True, twin="png_rgb.png", recipe=True), "AVIF", quality=85)
  else:  # an AVIF file all the same, from the ISO-BMFF header on; Pillow cannot tell what it is
    write("avif.avif", b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf" + bytes(1000),
          Expected(False, "unidentified_image"))
  save("bmp.bmp", photo, lossless, "BMP")
  save("tiff.tif", photo, lossless, "TIFF", compression="tiff_adobe_deflate")
  save("tiff_lzw.tif", photo, lossless, "TIFF", compression="tiff_lzw")
  save("tiff_multipage.tiff", photo, lossless, "TIFF", compression="tiff_adobe_deflate",
       save_all=True, append_images=[other])

  # Palette and 1-bit: Keras's convert("RGB") is right for these.
  quantized = photo.quantize(256)
  save("png_palette.png", quantized, Expected(True, twin="png_rgb.png", recipe=True), "PNG", compress_level=1)
  save("gif.gif", photo, Expected(True, twin="png_rgb.png", recipe=True), "GIF")
  save("gif_animated.gif", photo, Expected(True, twin="png_rgb.png", recipe=True), "GIF",
       save_all=True, append_images=[other], duration=100, loop=0)
  bits = grey.convert("1")  # Floyd-Steinberg dithered
  save("twins/png_1bit.png", bits.convert("L"), plain, "PNG", compress_level=1)
  save("png_1bit.png", bits, Expected(True, twin="twins/png_1bit.png", recipe=True), "PNG")

  # Transparency: composited on white; twins are composited here independently
  # (float formula, round half up) of decode's Pillow alpha_composite.
  h, w = photo.height, photo.width
  ramp = np.broadcast_to(np.linspace(0, 255, w).round().astype(np.uint8), (h, w)).copy()
  ramp[: h // 4, : w // 4] = 0  # a fully transparent corner: white, whatever the colour under it
  rgba = np.dstack([np.asarray(photo), ramp])
  save("png_rgba.png", Image.fromarray(rgba, "RGBA"), Expected(True, twin="twins/png_rgba.png"), "PNG",
       compress_level=1)
  save("twins/png_rgba.png", Image.fromarray(_on_white(rgba[..., :3], ramp), "RGB"), plain, "PNG",
       compress_level=1)
  grey_ramp = np.broadcast_to(np.linspace(255, 0, grey.width).round().astype(np.uint8),
                              (grey.height, grey.width))
  la = np.dstack([np.asarray(grey), grey_ramp])
  save("png_la.png", Image.fromarray(la, "LA"), Expected(True, twin="twins/png_la.png"), "PNG", compress_level=1)
  save("twins/png_la.png", Image.fromarray(_on_white(la[..., 0], grey_ramp), "L"), plain, "PNG",
       compress_level=1)
  keyed = photo.quantize(255)  # index 255 left free for the transparent colour
  hole = (w // 3, h // 3, 2 * w // 3, 2 * h // 3)
  keyed_img = keyed.copy()
  keyed_img.paste(255, hole)
  palette = keyed.getpalette()
  keyed_img.putpalette(palette + [0] * (255 * 3 - len(palette)) + [0, 0, 0])  # black under the hole: must not show
  save("png_palette_transparent.png", keyed_img, Expected(True, twin="twins/png_palette_transparent.png"), "PNG",
       transparency=255)
  keyed_rgb = np.asarray(keyed.convert("RGB")).copy()
  keyed_rgb[hole[1]: hole[3], hole[0]: hole[2]] = 255
  save("twins/png_palette_transparent.png", Image.fromarray(keyed_rgb, "RGB"), plain, "PNG", compress_level=1)

  # 16 bits per sample. Grey: 257*g plus a low-byte offset in [-100, 100] so
  # that only round-to-nearest of v*255/65535 gives back g (clipping gives
  # white, truncating to the high byte gives g-1 or g+1 at the ends).
  yy, xx = np.mgrid[: grey.height, : grey.width]
  offset = ((xx * 7 + yy * 13) % 201) - 100
  wide = np.clip(np.asarray(grey).astype(np.int64) * 257 + offset, 0, 65535).astype(np.uint16)
  save("png_16bit_grey.png", Image.fromarray(wide), Expected(True, twin="png_grey.png"), "PNG", compress_level=1)
  # RGB: Pillow cannot write 48-bit PNG; written by hand. Pillow reads it as
  # 8-bit RGB keeping the high byte, so expect png_rgb +-1, not exactly.
  yy, xx = np.mgrid[:h, :w]
  offset = (((xx * 7 + yy * 13) % 201) - 100)[..., None]
  wide_rgb = np.clip(np.asarray(photo).astype(np.int64) * 257 + offset, 0, 65535).astype(">u2")
  write("png_16bit_rgb.png", _png(w, h, 16, 2, wide_rgb.reshape(h, w * 3)), Expected(True, twin="png_rgb.png"))

  # EXIF orientation: the pixels are stored rotated, the tag makes them upright.
  # Twin: jpeg_q90.jpg, the upright photo at the same quality.
  for orientation, stored in ((6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270)):
    exif = Image.Exif()
    exif[0x0112] = orientation
    save(f"exif_orientation_{orientation}.jpg", full.transpose(stored), Expected(True, twin="jpeg_q90.jpg"),
         "JPEG", quality=90, exif=exif)

  # Sizes: both resize directions, extreme aspect ratios, a 12-megapixel photo.
  save("tiny_10x7.jpg", full.resize((10, 7), Image.LANCZOS), plain, "JPEG", quality=90)
  save("wide_4000x50.jpg", full.resize((4000, 50), Image.BILINEAR), plain, "JPEG", quality=90)
  save("tall_50x4000.jpg", full.resize((50, 4000), Image.BILINEAR), plain, "JPEG", quality=90)
  save("large_4000x3000.jpg", full.resize((4000, 3000), Image.BILINEAR), plain, "JPEG", quality=85)

  # Names and extensions: content decides, never the name. Beam globs read [ ] as a
  # character class, so "photo [1].jpg" is found by a ** glob but never by its own name.
  for name in ("photo.JPG", "photo.JPEG", "photo.jpe", "no_extension", "jpeg_named.png",
               "name with spaces.jpg", 'café, "quoted" photo.jpg', "it's (1).jpg", "日本語の写真.jpg",
               "photo [1].jpg", "a/b/c/d/e/f/g/h/i/j/deep.jpg"):
    write(name, baseline, plain)
  save("png_named.jpg", photo, lossless, "PNG", compress_level=1)

  # Failures.
  write("empty.jpg", b"", Expected(False, "empty_file"))
  write("truncated.jpg", baseline[: len(baseline) * 6 // 10], Expected(False, "truncated_image"))
  png_bytes = (root / "png_rgb.png").read_bytes()
  write("truncated.png", png_bytes[: len(png_bytes) * 6 // 10], Expected(False, "truncated_image"))
  # 64 random bytes over the middle of the PNG's compressed data. (The same
  # damage to a JPEG decodes silently: libjpeg resynchronises, as in Keras.)
  damaged = bytearray(png_bytes)
  damaged[len(damaged) * 6 // 10: len(damaged) * 6 // 10 + 64] = np.random.default_rng(1).bytes(64)
  write("corrupt.png", bytes(damaged), Expected(False, "corrupt_image"))
  write("html_saved_as.jpg",
        b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>"
        b"<body><h1>Not Found</h1></body></html>\n",
        Expected(False, "unidentified_image"))
  write("random_bytes.jpg", np.random.default_rng(0).bytes(4096), Expected(False, "unidentified_image"))
  # iPhone photos: HEIC, which Pillow cannot read.
  write("iphone.heic", b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(1000),
        Expected(False, "unidentified_image"))
  write("vector.svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>\n',
        Expected(False, "unidentified_image"))
  # Decompression bombs: valid all-black 1-bit PNGs, tens of KB on disk. 100
  # megapixels is over PIL_MAX_PIXELS (89.5M) but under Pillow's own refusal at
  # twice that, so decode's header check is what stops it; 400 megapixels
  # makes Image.open itself refuse.
  write("bomb_100mp.png", _blank_1bit_png(10_000, 10_000), Expected(False, "decompression_bomb"))
  write("bomb_400mp.png", _blank_1bit_png(20_000, 20_000), Expected(False, "decompression_bomb"))
  return corpus


def _with_app_segment(jpeg: bytes, marker: int, body: bytes) -> bytes:
  """`jpeg` with an APPn segment inserted right after SOI."""
  return jpeg[:2] + struct.pack(">BBH", 0xFF, marker, len(body) + 2) + body + jpeg[2:]


def _on_white(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
  a = alpha.astype(np.float64) / 255.0
  if color.ndim == 3:
    a = a[..., None]
  return np.floor(color * a + 255.0 * (1.0 - a) + 0.5).astype(np.uint8)


def _png(width: int, height: int, bit_depth: int, color_type: int, rows: np.ndarray) -> bytes:
  """A PNG from raw rows (filter type 0), for what Pillow cannot write."""
  raw = np.concatenate([np.zeros((height, 1), np.uint8), rows.view(np.uint8).reshape(height, -1)], axis=1)
  return _png_chunks(width, height, bit_depth, color_type, zlib.compress(raw.tobytes(), 6))


def _blank_1bit_png(width: int, height: int) -> bytes:
  # Stream the zero rows so that the bomb is never materialised here either.
  row_block = bytes(((width + 7) // 8 + 1) * 1000)
  compressor = zlib.compressobj(9)
  parts = [compressor.compress(row_block) for _ in range(height // 1000)]
  parts.append(compressor.compress(bytes(((width + 7) // 8 + 1) * (height % 1000))))
  parts.append(compressor.flush())
  return _png_chunks(width, height, 1, 0, b"".join(parts))


def _png_chunks(width, height, bit_depth, color_type, idat):
  def chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

  header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
  return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def noise_jpeg(seed: int, size: int = 32) -> bytes:
  """A size x size JPEG of seeded random pixels: distinct bytes per seed, for store and refresh runs."""
  pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, format="JPEG", quality=90)
  return out.getvalue()
