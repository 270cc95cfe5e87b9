"""Load stage: an image's bytes read, hashed and decoded ahead of the model, every failure a verdict, never an exception."""

import collections
import dataclasses
from typing import Optional

from transforms import decode
from transforms.decode_pool import DecodeProcessError
from transforms.read import FileTooLarge, read_bytes, sha256_hex
from transforms.store import StoreUnavailable
from transforms.write import error_row


@dataclasses.dataclass(frozen=True)
class LoadRequest:
  """One image to load: its bytes (`data`), or where to read them (`source`).

  `uri` names it in error rows (None for bytes given directly). `known`: digests of rows already
  made for it (a previous run's, an interrupted run's): bytes hashing to one of them are not
  decoded, their row stands. `size`: its size in bytes as its listing gave it, where known: an
  object over the decode processes' memory ceiling is not read, on any filesystem.
  """
  uri: Optional[str]
  source: Optional[str] = None
  data: Optional[bytes] = None
  known: tuple = ()
  size: Optional[int] = None


@dataclasses.dataclass
class Loaded:
  """What loading gave: an image to embed, an error row, or a digest already known (`reused`)."""
  uri: Optional[str]
  sha256: Optional[str] = None
  image: Optional[decode.DecodedImage] = None
  error: Optional[dict] = None
  reused: bool = False


class InProcessDecoder:
  """`decode_and_resize` in this process, without isolation: for trusted bytes and tests. Has the
  `decode_many` of transforms.decode_pool.DecodePool, which isolates each decode."""

  def decode_many(self, datas, spec: decode.DecodeSpec) -> list:
    results = []
    for data in datas:
      try:
        results.append(decode.decode_and_resize(data, spec.sizes, resize=spec.resize, max_pixels=spec.max_pixels,
                                                fast=spec.fast, option_names=dict(spec.option_names)))
      except Exception as e:  # mapped to an error row by `decoded`
        results.append(e)
    return results


class Loader:
  """Reads, hashes and decodes `LoadRequest`s with `decoder.decode_many` (one round trip a call)."""

  def __init__(self, decoder, spec: decode.DecodeSpec):
    self._decoder = decoder
    self._spec = spec

  def load(self, request: LoadRequest) -> Loaded:
    return self.load_many([request])[0]

  def load_many(self, requests) -> list:
    results, pending, datas = [], [], []
    for request in requests:
      loaded, data = read_and_hash(request, self._spec)
      results.append(loaded)
      if data is not None:
        pending.append(len(results) - 1)
        datas.append(data)
    if datas:
      for i, image in zip(pending, self._decoder.decode_many(datas, self._spec)):
        results[i] = decoded(results[i], image)
    return results


def read_and_hash(request: LoadRequest, spec: Optional[decode.DecodeSpec] = None):
  """(Loaded, the bytes to decode or None): the Loaded is final when it holds an error or is reused.

  A file over `spec.memory` bytes (the decode process's ceiling, which its bytes could not cross)
  is a `too_large` row, not read: by its listed size on any filesystem, by fstat for a local file."""
  uri, data = request.uri, request.data
  if data is None:
    ceiling = spec.memory if spec is not None else None
    try:
      data = read_bytes(request.source or uri, max_bytes=ceiling, listed_size=request.size)
    except StoreUnavailable:
      raise  # the store's fault, not the file's: the run stops, and --resume reads it again
    except FileTooLarge as e:
      return Loaded(uri, error=error_row(uri, "decode", "too_large", (
          f"the file is {e.what}, over the decode process's memory ceiling of {ceiling / (1 << 30):.2f} GiB "
          f"({spec.name('memory')}); it was not read"))), None
    except Exception as e:  # vanished, unreadable, permission: the file's own fault
      return Loaded(uri, error=error_row(uri, "read", type(e).__name__, f"could not read file: {e}")), None
  digest = sha256_hex(data)
  if digest in request.known:
    return Loaded(uri, digest, reused=True), None
  return Loaded(uri, digest), data


def decoded(loaded: Loaded, image) -> Loaded:
  """`loaded` with its image, or with a decode error row where `image` is an exception."""
  uri, digest = loaded.uri, loaded.sha256
  if isinstance(image, (decode.DecodeError, DecodeProcessError)):
    return Loaded(uri, digest, error=error_row(uri, "decode", image.error_type, str(image)))
  if isinstance(image, BaseException):  # decode_and_resize maps bad data itself; this is a last guard
    return Loaded(uri, digest, error=error_row(uri, "decode", type(image).__name__, str(image)))
  return Loaded(uri, digest, image=image)


class ReadAhead:
  """Loads requests in `executor` ahead of their use and hands them back in submission order.

  The model runs on one batch while the executor's threads read and decode the next ones. Every
  limit on a single file (its decode's memory and time) is enforced inside the load, so waiting
  for the oldest item always ends.

  `load_many` (a list of requests -> a list of results) runs `group` requests at a time, as one
  task: a thread hand-off and a decode round trip per group rather than per file. A group not
  yet full is sent when its oldest item is wanted.
  """

  def __init__(self, load_many, executor, group=1):
    self._load_many = load_many
    self._group = max(1, group)
    self._executor = executor
    self._pending = collections.deque()  # (item, future, index in its group's results)
    self._unsent = []

  def submit(self, item, request):
    self._unsent.append((item, request))
    if len(self._unsent) >= self._group:
      self._send()

  def _send(self):
    future = self._executor.submit(self._load_many, [request for _, request in self._unsent])
    self._pending.extend((item, future, i) for i, (item, _) in enumerate(self._unsent))
    self._unsent = []

  def __len__(self):
    return len(self._pending) + len(self._unsent)

  def oldest(self):
    """The item `next` would hand back, or None."""
    if self._pending:
      return self._pending[0][0]
    return self._unsent[0][0] if self._unsent else None

  def next(self):
    """(item, what loading gave for it) of the oldest submission."""
    if not self._pending:
      self._send()
    item, future, index = self._pending.popleft()
    return item, future.result()[index]


def load_file(uri: str, spec: decode.DecodeSpec, decoder=None, known=()) -> Loaded:
  """One file read, hashed and decoded (`decoder`: a DecodePool, or by default this process)."""
  return Loader(decoder or InProcessDecoder(), spec).load(LoadRequest(uri, known=tuple(known)))
