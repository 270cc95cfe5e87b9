"""Decode isolation: untrusted bytes are decoded in child processes under a memory ceiling and a timeout that kill only that file.

A hostile image can declare a small size and allocate gigabytes inside a loader, decode for
minutes, or crash a codec outright. None of that can be stopped from a thread, so each worker
process keeps a small pool of decode processes:

- started as fresh interpreters (`python -m transforms.decode_pool`), never forked from the
  TensorFlow process; the child imports only Pillow, numpy and `transforms.decode`;
- each under `RLIMIT_AS` set in the child alone, at its size after imports plus the ceiling, so
  an allocation over it fails there as a MemoryError (`too_large`); Pillow's own size guard stays
  on at `max_pixels`, with `DecompressionBombWarning` raised as an error;
- driven over its stdin/stdout pipes by this module, one request at a time, so a decode past its
  deadline is stopped by killing that one child (`decode_timeout`), a child that dies (a codec's
  segfault or abort) costs only its file (`decoder_crashed`), and either is replaced at once
  without touching the rest of the pool (which `ProcessPoolExecutor` cannot do);
- tied to its parent with `PR_SET_PDEATHSIG`, so killing a worker (or Ctrl-C) leaves no orphan.

Linux gives all of the above. Elsewhere the pool still isolates crashes and timeouts, but the
memory ceiling and the parent-death signal are not enforced (a warning says so once).

`EMBED_IMAGES_DECODE_PLUGINS` (comma-separated module names) is imported in every decode
process before the first decode: the way to register extra Pillow plugins (pillow-heif,
pillow-avif) where the decoding happens, and how the tests load a plugin that misbehaves.
"""

import concurrent.futures
import logging
import os
import pickle
import queue
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from typing import Callable, Optional

_LOG = logging.getLogger(__name__)
PLUGINS_ENV = "EMBED_IMAGES_DECODE_PLUGINS"
_HEADER = struct.Struct(">Q")
_READY = b"ready"
# Most bytes of files sent to a decode process in one request (one file always goes, whatever its size).
_GROUP_BYTES = 8 << 20
# What the child itself needs on top of its ceiling: reply pickles, Pillow's per-call buffers.
_CHILD_HEADROOM = 64 << 20
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_memory_ceiling(max_pixels: Optional[int]) -> int:
  """Bytes of address space a decode process may add: 24 bytes a pixel of `max_pixels` (room for
  Pillow's 4-byte pixels, a mode conversion and an alpha composite), at least 1 GiB; 2 GiB when
  `max_pixels` is None (no pixel limit: the ceiling alone bounds a file)."""
  if not max_pixels:
    return 2 << 30
  return max(1 << 30, 24 * max_pixels)


class DecodeProcessError(Exception):
  """The decode process failed its file without a Python error: killed at the deadline, or died."""

  def __init__(self, error_type: str, message: str):
    super().__init__(message)
    self.error_type = error_type


class _Child:
  """One decode process and its two pipe ends."""

  def __init__(self, memory: Optional[int], env: dict):
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "transforms.decode_pool", str(os.getpid()), str(memory or 0)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True,
        # Its own session: a terminal's Ctrl-C reaches the job's main process, which stops the
        # pool; the child must not die first and turn the file in hand into a "crash".
        start_new_session=True)
    self.pid = self.proc.pid
    self.ready = False
    self.peak_rss = 0
    # A 224x224 reply is ~150 KB: through the default 64 KB pipe it crosses in three writes, each
    # waiting for the reader to wake (measured: 0.65 ms a file). 1 MiB (Linux's default
    # pipe-max-size) lets a reply cross in one.
    for stream in (self.proc.stdin, self.proc.stdout):
      _widen_pipe(stream.fileno())

  def send(self, payload: bytes):
    self.proc.stdin.write(_HEADER.pack(len(payload)))
    self.proc.stdin.write(payload)
    self.proc.stdin.flush()

  def receive(self, deadline: Optional[float], clock: Callable[[], float]) -> bytes:
    header = self._read_exactly(_HEADER.size, deadline, clock)
    return self._read_exactly(_HEADER.unpack(header)[0], deadline, clock)

  def _read_exactly(self, n, deadline, clock):
    fd = self.proc.stdout.fileno()
    chunks, remaining = [], n
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    while remaining:
      if deadline is not None:
        left = deadline - clock()
        if left <= 0:
          raise TimeoutError
        # Woken at least every 100 ms to read the clock again: an injected clock (tests) moves
        # on its own schedule, not poll's.
        if not poller.poll(min(100, max(1, int(left * 1000)))):
          continue
      chunk = os.read(fd, min(remaining, 1 << 20))
      if not chunk:
        raise EOFError
      chunks.append(chunk)
      remaining -= len(chunk)
    return b"".join(chunks)

  def kill(self) -> str:
    """Kills the process if it still runs, reaps it, and says how it ended."""
    self.peak_rss = self.live_peak_rss()
    try:
      os.kill(self.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
    return self.reap()

  def reap(self) -> str:
    try:
      _, status = os.waitpid(self.pid, 0)
    except ChildProcessError:  # reaped already
      return "ended"
    self.proc.returncode = os.waitstatus_to_exitcode(status)
    for stream in (self.proc.stdin, self.proc.stdout):
      try:
        stream.close()
      except OSError:
        pass
    if os.WIFSIGNALED(status):
      number = os.WTERMSIG(status)
      try:
        return f"killed by signal {number} ({signal.Signals(number).name})"
      except ValueError:
        return f"killed by signal {number}"
    return f"exited with status {os.WEXITSTATUS(status)}"

  def live_peak_rss(self) -> int:
    """Its peak RSS: read from /proc while it lives, else the last one it reported."""
    return max(self.peak_rss, _vm_hwm(self.pid))


def _widen_pipe(fd: int, size: int = 1 << 20):
  try:
    import fcntl
    fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), size)
  except (ImportError, OSError):  # not Linux, or over the system's pipe-max-size: slower, not wrong
    pass


class DecodePool:
  """`processes` decode processes; `decode(data, spec)` from any number of threads, at most
  `processes` decodes at once (a caller waits for a free process).

  `clock` (monotonic seconds) is what deadlines are measured with; tests pass their own.
  """

  def __init__(self, processes: int, memory: Optional[int], clock: Callable[[], float] = time.monotonic):
    if processes < 1:
      raise ValueError(f"`processes` must be at least 1; Received: processes={processes!r}")
    self.processes = processes
    self.memory = memory
    self._clock = clock
    self._env = _child_environment()
    self._lock = threading.Lock()
    self._closed = False
    self._children = set()
    self._idle = queue.SimpleQueue()
    self._ended = []  # peak RSS of children already reaped
    self.started = self.replaced = 0
    # PR_SET_PDEATHSIG fires when the *thread* that started a child ends, not its process:
    # every child is started from this one thread, which lives as long as the pool.
    self._spawner = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="decode-spawner")
    for _ in range(processes):  # they start in parallel and are waited for at first use
      self._idle.put(self._start())

  def _start(self) -> _Child:
    child = self._spawner.submit(_Child, self.memory, self._env).result()
    with self._lock:
      self._children.add(child)
      self.started += 1
    return child

  def _retire(self, child: _Child, how: Callable[[_Child], str]) -> str:
    ending = how(child)
    with self._lock:
      self._children.discard(child)
      self._ended.append(child.peak_rss)
    return ending

  def _replace(self, child: _Child, how) -> tuple:
    """(how the child ended, its replacement or None once the pool is closed)."""
    ending = self._retire(child, how)
    with self._lock:
      if self._closed:
        return ending, None
      self.replaced += 1
    try:
      return ending, self._start()
    except RuntimeError:  # the spawner was shut down: closed meanwhile
      return ending, None

  def decode(self, data: bytes, spec):
    """A `decode.DecodedImage`; raises `decode.DecodeError` for bad data and
    `DecodeProcessError` for a decode stopped at `spec.timeout`, a process that died, or a
    pool closed while the file waited (`decoder_stopped`)."""
    result = self.decode_many([data], spec)[0]
    if isinstance(result, BaseException):
      raise result
    return result

  def decode_many(self, datas, spec) -> list:
    """`decode` of each file, in one round trip to one decode process: per file, a
    `decode.DecodedImage` or the exception `decode` would raise for it, in order.

    One request per file cost the caller a thread hand-off, a queue and two pipe round trips
    under the GIL that the model's thread needs; a group pays them once. Limits stay per file:
    each file's deadline runs from the reply before it, and a file that is killed at its deadline
    or crashes the process costs only itself: the files after it go to the replacement."""
    results = []
    while len(results) < len(datas):
      # Bounded in bytes as well: a request is held whole by the decode process, under its ceiling.
      group, size = [], 0
      for data in datas[len(results):]:
        if group and size + len(data) > _GROUP_BYTES:
          break
        group.append(data)
        size += len(data)
      results.extend(self._decode_on_one_child(group, spec))
    return results

  def _decode_on_one_child(self, datas, spec) -> list:
    """Results for a prefix of `datas` (at least one): all of them, or up to and including the
    one whose decode process was killed or died."""
    request = pickle.dumps((datas, spec), protocol=pickle.HIGHEST_PROTOCOL)
    results = []
    child = self._idle.get()
    try:
      if child is None or self._closed:  # closed while this call waited
        return [_stopped()] * len(datas)
      if not child.ready:
        self._wait_ready(child)
      try:
        child.send(request)
      except (OSError, ValueError):
        # Died while idle (killed from outside): nothing of these files was decoded yet, so a
        # fresh process gets them.
        _, child = self._replace(child, _Child.kill)
        if child is None:
          return [_stopped()] * len(datas)
        self._wait_ready(child)
        child.send(request)
      for _ in datas:
        deadline = self._clock() + spec.timeout if spec.timeout else None
        try:
          reply = child.receive(deadline, self._clock)
          child.peak_rss = max(child.peak_rss, _HEADER.unpack(reply[-_HEADER.size:])[0])
          status, value = _parse_reply(memoryview(reply)[:-_HEADER.size])
        except TimeoutError:
          _, child = self._replace(child, _Child.kill)
          results.append(DecodeProcessError(
              "decode_timeout",
              f"decoding took longer than {spec.name('timeout')}={spec.timeout:g}s; the decode "
              "process was killed and replaced"))
          return results
        except Exception as e:
          # Dead (EOF), or a reply out of protocol: either way the process can't be trusted with
          # another file. One that may still live is killed before it is reaped.
          ending, child = self._replace(child, _Child.reap if isinstance(e, EOFError) else _Child.kill)
          if child is None:
            return results + [_stopped()] * (len(datas) - len(results))
          results.append(DecodeProcessError(
              "decoder_crashed",
              f"the decoder crashed on this file: its decode process {ending}; the process was "
              "replaced and no other file was affected"))
          return results
        results.append(value)
    finally:
      self._idle.put(child)
    return results

  def _wait_ready(self, child: _Child):
    try:
      if child.receive(None, self._clock) == _READY:
        child.ready = True
        return
    except (EOFError, OSError):
      pass
    ending = self._retire(child, _Child.reap)
    raise RuntimeError(f"a decode process failed to start: it {ending} (its stderr is above)")

  def peak_rss(self) -> dict:
    """{"max": bytes, "sum": bytes} of every decode process's peak RSS so far, dead or alive (one
    that crashed counts with what it last reported)."""
    with self._lock:
      peaks = list(self._ended) + [c.live_peak_rss() for c in self._children]
    return {"max": max(peaks, default=0), "sum": sum(peaks)}

  def close(self):
    """Stops every process now, busy or not; calls waiting for one raise DecodeProcessError."""
    with self._lock:
      self._closed = True
      children = list(self._children)
    for child in children:
      self._retire(child, _Child.kill)
    self._idle.put(None)
    self._spawner.shutdown(wait=False)


# A decoded image crosses back as raw pixels, not as a pickled DecodedImage: unpickling the dataclass
# and its arrays cost the parent ~0.07 ms of its GIL a file, as much as the rest of the round trip.
# Layout: status byte, width, height, array count, then per array its height, width, bands and
# bytes; an error is its status byte and the pickled exception.
_OK, _ERROR = 0, 1
_IMAGE = struct.Struct(">BIII")
_ARRAY = struct.Struct(">III")


def _encode_image(image) -> list:
  parts = [_IMAGE.pack(_OK, image.width, image.height, len(image.arrays))]
  for size, array in image.arrays.items():
    h, w, c = array.shape
    parts.append(struct.pack(">I", size) + _ARRAY.pack(h, w, c))
    parts.append(array.tobytes())
  return parts


def _parse_reply(reply: memoryview) -> tuple:
  """("ok", DecodedImage) or ("error", the exception); the arrays are read-only views of `reply`."""
  if reply[0] == _ERROR:
    return "error", pickle.loads(reply[1:])
  import numpy as np
  from transforms.decode import DecodedImage
  _, width, height, count = _IMAGE.unpack_from(reply)
  offset, arrays = _IMAGE.size, {}
  for _ in range(count):
    size, = struct.unpack_from(">I", reply, offset)
    h, w, c = _ARRAY.unpack_from(reply, offset + 4)
    offset += 4 + _ARRAY.size
    if offset + h * w * c > len(reply):
      raise ValueError(f"a decode reply of {len(reply)} bytes announced a {h}x{w}x{c} array at {offset}")
    arrays[size] = np.frombuffer(reply, np.uint8, h * w * c, offset).reshape(h, w, c)
    offset += h * w * c
  if offset != len(reply):
    raise ValueError(f"a decode reply of {len(reply)} bytes held {offset}")
  return "ok", DecodedImage(width=width, height=height, arrays=arrays)


def _stopped():
  return DecodeProcessError("decoder_stopped", "the decode pool was closed (the run is stopping)")


# One pool per worker process, shared by the DoFn instances (threads) in it: a Dataflow SDK
# process runs many, and each must not start its own set of processes.
_pools_lock = threading.Lock()
_pools = {}  # (processes, memory) -> [pool, users]


def acquire_pool(processes: int, memory: Optional[int]) -> DecodePool:
  with _pools_lock:
    entry = _pools.get((processes, memory))
    if entry is None:
      entry = _pools[(processes, memory)] = [DecodePool(processes, memory), 0]
    entry[1] += 1
    return entry[0]


def release_pool(pool: DecodePool):
  with _pools_lock:
    entry = _pools.get((pool.processes, pool.memory))
    if entry is None or entry[0] is not pool:
      return
    entry[1] -= 1
    if entry[1] > 0:
      return
    del _pools[(pool.processes, pool.memory)]
  pool.close()


class PoolWhenNeeded:
  """A shared pool (acquire_pool) acquired at the first `decode_many`, not before: a stage that
  gets nothing to decode (an unchanged refresh reuses every row unread) starts no process. Each
  start costs a process's imports (~0.3 s of CPU) while the run's own work wants both cores."""

  def __init__(self, processes: int, memory: Optional[int]):
    self._args, self._pool, self._lock = (processes, memory), None, threading.Lock()
    self._released = False

  def decode_many(self, datas, spec):
    with self._lock:
      if self._pool is None and not self._released:
        self._pool = acquire_pool(*self._args)
      pool = self._pool
    if pool is None:  # a read-ahead task still running after the stage's teardown: start nothing
      return [_stopped()] * len(datas)
    return pool.decode_many(datas, spec)  # released: closed once its last user released it, then stopped results

  def release(self):
    with self._lock:
      if self._released:
        return
      self._released = True
      pool = self._pool
    if pool is not None:
      release_pool(pool)


def process_stats() -> dict:
  """This process's decode processes: their peak RSS (max and sum), started and replaced."""
  with _pools_lock:
    pools = [entry[0] for entry in _pools.values()]
  peaks = [pool.peak_rss() for pool in pools]
  return {"peak_rss": {"max": max((p["max"] for p in peaks), default=0), "sum": sum(p["sum"] for p in peaks)},
          "started": sum(pool.started for pool in pools), "replaced": sum(pool.replaced for pool in pools)}


def close_all_pools():
  """Stops every decode process of this process: for a run that is interrupted."""
  with _pools_lock:
    pools = [entry[0] for entry in _pools.values()]
    _pools.clear()
  for pool in pools:
    pool.close()


def _child_environment() -> dict:
  env = dict(os.environ)
  # The child imports transforms.decode by module name: make this checkout importable even
  # when it is not installed (tests, a notebook beside the repository).
  path = env.get("PYTHONPATH")
  env["PYTHONPATH"] = _PACKAGE_ROOT + (os.pathsep + path if path else "")
  # One decode per process: no BLAS or OpenMP thread pools (their stacks count in RLIMIT_AS).
  for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    env[name] = "1"
  return env


# --- the child ------------------------------------------------------------------


def _die_with_parent(parent: int):
  try:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    return
  if os.getppid() != parent:  # the parent died before prctl took effect
    os._exit(1)


def _limit_memory(ceiling: int) -> bool:
  try:
    import resource
    with open("/proc/self/status") as f:
      size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    limit = size + ceiling + _CHILD_HEADROOM
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    if hard != resource.RLIM_INFINITY:
      limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    return True
  except (ImportError, OSError, ValueError, StopIteration):
    return False


def _vm_hwm(pid="self") -> int:
  """VmHWM of a process in bytes (0 where /proc can't say): its own peak RSS since exec."""
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 0


def own_peak_rss() -> int:
  """This process's own peak RSS since exec. (ru_maxrss is no use: after fork + exec it starts at
  the parent's RSS, a TensorFlow process's gigabyte.)"""
  return _vm_hwm()


def _serve(parent: int, ceiling: int):
  import importlib
  import warnings

  from PIL import Image

  from transforms import decode
  _die_with_parent(parent)
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  requests = os.fdopen(os.dup(0), "rb", buffering=0)
  replies = os.fdopen(os.dup(1), "wb", buffering=0)
  os.dup2(2, 1)  # a plugin's print() must not corrupt the protocol
  for module in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
    importlib.import_module(module)
  Image.init()
  warnings.simplefilter("error", Image.DecompressionBombWarning)
  decode.open_image = decode.open_image_for_header_check  # single-threaded here: safe
  if ceiling and not _limit_memory(ceiling):
    print("embed-images decode process: could not set a memory ceiling on this platform", file=sys.stderr)

  def reply(*parts):
    # A raw write may write less than asked (a signal arriving mid-write): what is left must follow,
    # or the parent reads the next reply out of step.
    data = memoryview(b"".join([_HEADER.pack(sum(map(len, parts))), *parts]))
    while data:
      data = data[replies.write(data):]

  def read_exactly(n):
    chunks = []
    while n:
      chunk = requests.read(n)
      if not chunk:
        sys.exit(0)  # the parent closed the pipe: the pool is done
      chunks.append(chunk)
      n -= len(chunk)
    return b"".join(chunks)

  reply(_READY)
  served = 0
  while True:
    datas, spec = pickle.loads(read_exactly(_HEADER.unpack(read_exactly(_HEADER.size))[0]))
    datas.reverse()  # popped as served, so a served file's bytes are freed before the next decode
    while datas:
      served += 1
      reply(*_serve_one(datas.pop(), spec, ceiling, served))


def _serve_one(data, spec, ceiling, served) -> list:
  """The reply's parts for one file."""
  from PIL import Image

  from transforms import decode
  # Pillow's guard stays on, at the run's limit; None (max_pixels 0) lifts it, and only the
  # memory ceiling is left.
  Image.MAX_IMAGE_PIXELS = spec.max_pixels
  try:
    result = ("ok", decode.decode_and_resize(
        data, spec.sizes, resize=spec.resize, max_pixels=spec.max_pixels, fast=spec.fast,
        option_names=dict(spec.option_names)))
  except decode.DecodeError as e:
    result = ("error", e)
  except MemoryError:  # outside decode_and_resize's own mapping (the arrays' copies)
    result = ("error", decode.DecodeError("too_large", "ran out of memory decoding the image"))
  if result[0] == "error" and result[1].error_type == "too_large" and ceiling:
    result = ("error", decode.DecodeError("too_large", (
        f"decoding needed more memory than the decode process's ceiling of {ceiling / (1 << 30):.2f} GiB "
        f"({spec.name('memory')}); the file is hostile or larger than that allows")))
  del data
  try:
    parts = _encode_image(result[1]) if result[0] == "ok" else [bytes([_ERROR]), pickle.dumps(result[1])]
  except MemoryError:
    parts = [bytes([_ERROR]), pickle.dumps(decode.DecodeError("too_large", "ran out of memory returning the image"))]
  # VmHWM is a high-water mark, so reading it now and then loses no peak; only a process that
  # dies before its next reading is reported at its previous one.
  peak = own_peak_rss() if result[0] == "error" or served % 32 == 1 else 0
  del result
  return parts + [_HEADER.pack(peak)]


if __name__ == "__main__":
  _serve(int(sys.argv[1]), int(sys.argv[2]))
