"""The object store's retries: google-cloud-storage's policy and Beam's, under one outage deadline per process.

google-cloud-storage retries each call for up to 120 s, and a run makes many calls: a store that
stays down cost a launch 633 s and a run's reads more than 900 s. Here every retried call of the
process shares one `Outage`: from the first transient failure (a 429, a 5xx, a reset connection)
with no success since, the store has `seconds` (EMBED_IMAGES_STORE_RETRY_SECONDS, default
DEFAULT_RETRY_SECONDS) to answer one request; then the failing call raises `StoreUnavailable`,
and so does every later call's first transient failure until a request succeeds again. A flaky
store never gets there: a success ends the outage. Permanent answers (404, 403) are never retried.

`retry()` is that policy as a `google.api_core.retry.Retry`, for the calls this package makes
itself (transforms/read.py, transforms/listing.py); `install()` makes Beam's GcsIO (listing,
Parquet sinks, checkpoints, FileSystems) use it too, in place of `gcsio_retry.get_retry`'s.
"""

import functools
import os
import re
import threading
import time

ENV = "EMBED_IMAGES_STORE_RETRY_SECONDS"
DEFAULT_RETRY_SECONDS = 120.0
_MAX_BACKOFF = 16.0  # below google's 60 s, so that a sleep never overshoots the deadline by much
# The first sleep's cap (google's: 1 s; each sleep is drawn from [0, cap], the cap doubling per try).
# A flaky store's faults come one or two in a row, and a run's serial steps (launch checks, listing pages,
# the writes at the end) wait out each: benchmarks/store_outage.py's flaky run (64 objects, 34 faults)
# took 4.4-4.5x a 4.4 s fault-free run with 1 s, 1.9-2.0x with 0.25 s. A store that stays down still
# backs off to _MAX_BACKOFF by its seventh sleep.
_INITIAL_BACKOFF = 0.25


class StoreUnavailable(IOError):
  """The store failed every request for `seconds` in a row; `status` is its last answer."""

  def __init__(self, store: str, status: str, seconds: float):
    super().__init__(f"store {store} unavailable: no request succeeded for {seconds:.0f} s of retries "
                     f"(--store-retry-seconds {seconds:g}); last status: {status}")
    self.store, self.status, self.seconds = store, status, seconds

  def __reduce__(self):  # raised in a worker, re-raised where it is pickled back
    return type(self), (self.store, self.status, self.seconds)


_MESSAGE = re.compile(r"store (\S+) unavailable: .*?; last status: ([^\n'\"\[;]+)")


def unavailable_in(error: BaseException):
  """(store, last status) when `error`, its causes or its text (Beam wraps a worker's exceptions in
  its own, as text) say the store was unavailable; else None."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, StoreUnavailable):
      return error.store, error.status
    details = getattr(error, "exception_details", None)  # BeamIOError: {path: exception}
    for inner in (details or {}).values():
      found = unavailable_in(inner) if isinstance(inner, BaseException) else None
      if found:
        return found
    match = _MESSAGE.search(str(error))
    if match:
      return match.group(1), match.group(2).strip().rstrip(".")
    error = error.__cause__ or error.__context__
  return None


def _status(error) -> str:
  code = getattr(error, "code", None)
  if not isinstance(code, int):  # google-resumable-media's InvalidResponse carries the response itself
    code = getattr(getattr(error, "response", None), "status_code", None)
  if isinstance(code, int):
    return f"{code} {type(error).__name__}"
  return f"{type(error).__name__} (no HTTP answer)"


def _store(error) -> str:
  for holder in (getattr(error, "response", None), getattr(error, "request", None)):
    url = getattr(holder, "url", None) or getattr(getattr(holder, "request", None), "url", None)
    match = re.search(r"/b/([^/?]+)", str(url or ""))
    if match:
      return f"gs://{match.group(1)}"
  return ""


class Outage:
  """When the store began failing with no success since, shared by every call of this process."""

  def __init__(self, seconds=None, clock=time.monotonic):
    self.seconds = float(os.environ.get(ENV, DEFAULT_RETRY_SECONDS)) if seconds is None else float(seconds)
    self.clock = clock
    self._lock = threading.Lock()
    self._since = None
    self.status, self.store = None, "gs://"

  def failed(self, error) -> bool:
    """Records a transient failure; whether it may still be retried."""
    with self._lock:
      now = self.clock()
      if self._since is None:
        self._since = now
      self.status = _status(error)
      self.store = _store(error) or self.store
      return now - self._since < self.seconds

  def succeeded(self):
    with self._lock:
      self._since = None

  @property
  def expired(self) -> bool:
    with self._lock:
      return self._since is not None and self.clock() - self._since >= self.seconds

  def error(self) -> StoreUnavailable:
    return StoreUnavailable(self.store, self.status, self.seconds)


OUTAGE = Outage()


def configure(seconds=None, clock=time.monotonic) -> Outage:
  """A fresh process-wide outage deadline (tests: a small one, an injected clock)."""
  global OUTAGE
  OUTAGE = Outage(seconds, clock)
  return OUTAGE


def _transient(error) -> bool:
  from google.cloud.storage.retry import _should_retry  # the library's own list: 408, 429, 5xx, resets
  return _should_retry(error)


def _predicate(error) -> bool:
  return _transient(error) and OUTAGE.failed(error)


@functools.lru_cache(maxsize=None)
def _retry_class():
  from google.api_core import retry as api_retry

  class OutageRetry(api_retry.Retry):
    """google's Retry whose calls share OUTAGE: a success ends an outage, an expired one raises."""

    def __call__(self, func, on_error=None):
      retried = super().__call__(func, on_error=on_error)

      @functools.wraps(func)
      def call(*args, **kwargs):
        try:
          result = retried(*args, **kwargs)  # no timeout of its own (retry()), so never a RetryError
        except Exception as e:
          if _transient(e) and OUTAGE.expired:
            raise OUTAGE.error() from e
          raise
        OUTAGE.succeeded()
        return result
      return call

  return OutageRetry


@functools.lru_cache(maxsize=None)
def _on_error():
  try:
    from apache_beam.io.gcp.gcsio_retry import ThrottlingHandler  # Beam's 429 counter
  except ImportError:
    return None
  return ThrottlingHandler()


def retry():
  """The policy as a Retry: google's predicate and backoff, each call bounded by the outage deadline
  (backoff scaled down with it, so that a deadline of a second or two, in tests, still retries).
  The deadline is the outage's alone (`_predicate`): google's own `timeout` gives up as soon as its
  next sleep would pass it, up to a whole sleep (16 s) before the store has been down that long, which
  the messages' "no request succeeded for N s" would then overstate. So a store that stays down is
  given up on at the first failure past the deadline: at most one sleep after it."""
  seconds = OUTAGE.seconds
  initial = min(_INITIAL_BACKOFF, seconds / 10) or 0.01
  return _retry_class()(predicate=_predicate, initial=initial, maximum=max(initial, min(_MAX_BACKOFF, seconds / 4)),
                        multiplier=2.0, timeout=None, on_error=_on_error())


_installed = []


def install():
  """Beam's GcsIO retries through `retry()` from now on in this process (idempotent)."""
  if _installed:
    return
  try:
    from apache_beam.io.gcp import gcsio_retry
  except ImportError:  # no [gcp] extra: no GcsIO either
    return
  # Beam's own choice is google's DEFAULT_RETRY with its 429 counter, which ours keeps (on_error).
  _installed.append(gcsio_retry.get_retry)
  gcsio_retry.get_retry = lambda pipeline_options: retry()
  _reload_under_the_deadline()


def _reload_under_the_deadline():
  """Beam's BeamBlobReader (every FileSystems.open of a gs:// file for reading: the previous run's
  Parquet, checkpoints) reloads the object's metadata with `blob.reload()`, google's default retry:
  up to 120 s a call, outside the outage deadline. Here that reload takes the reader's own retry,
  which `get_retry` above made ours."""
  from apache_beam.io.gcp import gcsio
  reader = gcsio.BeamBlobReader
  original = reader.__init__

  @functools.wraps(original)
  def __init__(self, blob, *args, **kwargs):
    given = kwargs.get("retry", args[2] if len(args) > 2 else None)  # (chunk_size, metric, retry, ...)
    blob.reload = functools.partial(blob.reload, retry=given or retry())
    try:
      original(self, blob, *args, **kwargs)
    finally:
      del blob.reload  # the instance's: Blob.reload again
  reader.__init__ = __init__
