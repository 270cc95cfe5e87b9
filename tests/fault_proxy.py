"""A fault-injecting, counting HTTP forwarder on 127.0.0.1 in front of the GCS emulator, for tests.

Point STORAGE_EMULATOR_HOST at `FaultProxy.url` (or use `pointed_at`) and every gs:// request of
this process and of the children it starts (Beam's GcsIO, google-cloud-storage, transforms/read.py)
goes through it. It counts each request by kind (`KINDS`) and by outcome, and can answer with faults:

* `faults(p503=, p429=, p_reset=, kinds=)`: a seeded fraction of requests answers 503 or 429, or
  has its connection reset. A read (a GET: media download, metadata, listing) is forwarded and cut:
  the client gets the headers and half the body, then the connection closes. A write (anything
  else) is reset BEFORE it is forwarded: after the emulator has finished a resumable upload, a
  retried final request gets 404 where real GCS answers 200, so a fault after forwarding a write
  would test the emulator, not the client.
* `once(kind, outcome)`: the next request of `kind` gets `outcome` ("503", "429" or "reset") for
  sure, so that a test covers that kind whatever the draws.
* `latency_s`: seconds added to each forwarded request (in parallel across requests), for benchmarks;
* `down(kind=None, status=503)`: from now on every request (of that kind) answers `status`;
  `down(..., after=N)` starts after N more requests of that kind have gone through; `up()` ends it.
* `deny(uri, status)`: an object answers 404 or 403 for good (its reads and metadata; a listing
  still shows it, as when it is deleted between the listing and the read).

Faults are drawn from `random.Random(seed)` in the order requests arrive. The server is threaded
and lives in the test's process; the emulator it forwards to serves one request at a time.
"""

import collections
import contextlib
import http.client
import http.server
import os
import random
import re
import socket
import socketserver
import struct
import threading
import time
import urllib.parse

KINDS = ("list", "read", "metadata", "upload", "resumable", "delete", "copy", "batch", "bucket", "other")
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection", "host"}
_OBJECT = re.compile(r"^(?:/download|/upload)?/storage/v1/b/([^/]+)/o(?:/([^/]+))?(/.*)?$")


def request_kind(method: str, path: str) -> tuple:
  """(kind, object uri or None) of a JSON-API request, as GCS (and the emulator) spells paths."""
  url = urllib.parse.urlsplit(path)
  query = urllib.parse.parse_qs(url.query)
  if url.path.startswith("/batch/"):
    return "batch", None
  match = _OBJECT.match(url.path)
  if match is None:
    return ("bucket" if re.match(r"^/storage/v1/b/[^/]+$", url.path) else "other"), None
  bucket, name, rest = match.group(1), match.group(2), match.group(3)
  if url.path.startswith("/upload/"):
    resumable = "upload_id" in query or query.get("uploadType") == ["resumable"]
    name = (query.get("name") or [None])[0]
    return ("resumable" if resumable else "upload"), (f"gs://{bucket}/{name}" if name else None)
  if name is None:
    return ("list" if method == "GET" else "upload"), None
  uri = f"gs://{bucket}/{urllib.parse.unquote(name)}"
  if rest and re.match(r"^/(rewriteTo|copyTo|compose)\b", rest):
    return "copy", uri
  if method == "DELETE":
    return "delete", uri
  if method == "GET":
    return ("read" if query.get("alt") == ["media"] or url.path.startswith("/download/") else "metadata"), uri
  return "other", uri


class FaultProxy:
  """The proxy; see the module's docstring. `counts[kind]`, `outcomes[(kind, outcome)]`: outcome is
  "ok" (forwarded and answered below 400), the upstream's status ("404"), or the fault injected
  ("503", "429", "reset", "down 503", "deny 404"); `requests`: (kind, object uri or None) of each
  request, in order."""

  def __init__(self, upstream: str, seed: int = 0):
    self.upstream = upstream.rstrip("/")
    target = urllib.parse.urlsplit(self.upstream)
    self._target = (target.hostname, target.port)
    self._random = random.Random(seed)
    self._lock = threading.Lock()
    # The emulator has a listen backlog of 5 and serves one request at a time: more connects at
    # once get their SYNs dropped and retried a second later, an artefact, not a fault.
    self._upstream_slots = threading.BoundedSemaphore(4)
    self.counts = collections.Counter()
    self.outcomes = collections.Counter()
    self.requests = []
    self.paths = []  # (kind, path with its query) of each request
    self.latency_s = 0.0
    self._fractions = {"503": 0.0, "429": 0.0, "reset": 0.0}
    self._fault_kinds = None
    self._down = {}  # kind or None -> [status, requests still let through]
    self._once = collections.defaultdict(list)  # kind -> outcomes its next requests get
    self._denied = {}  # object uri -> status
    proxy = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"  # keep-alive, as the storage client uses it

      def setup(self):
        super().setup()
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

      def log_message(self, *args):
        pass

      def handle_one(self):
        proxy._handle(self)

      do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = handle_one

    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
      daemon_threads = True
      request_queue_size = 128

      def handle_error(self, request, client_address):
        pass  # a client that gives up on a cut or reset connection is what the faults are for

    self._server = Server(("127.0.0.1", 0), Handler)
    self.url = "http://127.0.0.1:%d" % self._server.server_address[1]
    self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
    self._thread.start()

  # ---------------------------------------------------------------- what the test sets

  def faults(self, p503=0.0, p429=0.0, p_reset=0.0, kinds=None):
    """Transient faults from now on, on requests of `kinds` (default: every kind)."""
    with self._lock:
      self._fractions = {"503": p503, "429": p429, "reset": p_reset}
      self._fault_kinds = set(kinds) if kinds else None

  def once(self, kind, outcome):
    """The next request of `kind` gets `outcome`: "503", "429" or "reset"."""
    with self._lock:
      self._once[kind].append(outcome)

  def down(self, kind=None, status=503, after=0):
    """Every request of `kind` (None: every request) answers `status`, after `after` more go through."""
    with self._lock:
      self._down[kind] = [status, after]

  def up(self):
    with self._lock:
      self._down.clear()

  def deny(self, uri: str, status=404):
    """`uri`'s reads and metadata answer `status` for good (None: answered again)."""
    with self._lock:
      if status is None:
        self._denied.pop(uri, None)
      else:
        self._denied[uri] = status

  def reset_counts(self):
    with self._lock:
      self.counts.clear()
      self.outcomes.clear()
      self.requests.clear()
      self.paths.clear()

  def injected(self) -> int:
    """How many requests got a fault rather than the upstream's answer."""
    with self._lock:
      return sum(n for (_, outcome), n in self.outcomes.items() if outcome in ("503", "429", "reset")
                 or outcome.startswith(("down ", "deny ")))

  def close(self):
    self._server.shutdown()
    self._server.server_close()

  # ---------------------------------------------------------------- serving

  def _verdict(self, kind, uri):
    """None (forward), ("status", code, label) or ("reset", None, "reset"); counts the request."""
    with self._lock:
      self.counts[kind] += 1
      self.requests.append((kind, uri))
      for key in (kind, None):
        down = self._down.get(key)
        if down is not None:
          if down[1] > 0:
            down[1] -= 1
          else:
            return "status", down[0], f"down {down[0]}"
      if uri in self._denied and kind in ("read", "metadata"):
        return "status", self._denied[uri], f"deny {self._denied[uri]}"
      if self._once.get(kind):
        label = self._once[kind].pop(0)
        return ("reset", None, "reset") if label == "reset" else ("status", int(label), label)
      if self._fault_kinds is None or kind in self._fault_kinds:
        draw, edge = self._random.random(), 0.0
        for label, fraction in self._fractions.items():
          edge += fraction
          if draw < edge:
            return ("reset", None, "reset") if label == "reset" else ("status", int(label), label)
    return None

  def _count(self, kind, outcome):
    with self._lock:
      self.outcomes[(kind, outcome)] += 1

  def _handle(self, handler):
    kind, uri = request_kind(handler.command, handler.path)
    with self._lock:
      self.paths.append((kind, handler.path))
    body = _read_body(handler)
    verdict = self._verdict(kind, uri)
    if verdict is not None and verdict[0] == "status":
      self._count(kind, verdict[2])
      message = b'{"error": {"code": %d, "message": "injected by the fault proxy"}}' % verdict[1]
      return _reply(handler, verdict[1], [("Content-Type", "application/json")], message)
    cut = verdict is not None
    if cut and handler.command != "GET":
      self._count(kind, "reset")
      return _reset(handler)  # a write: reset before the emulator sees it
    if self.latency_s:
      time.sleep(self.latency_s)  # a benchmark's stand-in for a round trip to a real store
    status, headers, data = self._forward(handler, body)
    if cut:
      self._count(kind, "reset")
      return _reply(handler, status, headers, data, cut=True)
    self._count(kind, "ok" if status < 400 else str(status))
    _reply(handler, status, headers, data)

  def _forward(self, handler, body):
    headers = {k: v for k, v in handler.headers.items() if k.lower() not in _HOP_BY_HOP}
    if body is not None:
      headers["Content-Length"] = str(len(body))
    with self._upstream_slots:
      conn = http.client.HTTPConnection(*self._target, timeout=120)
      try:
        conn.request(handler.command, handler.path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        status, received = response.status, response.getheaders()
      finally:
        conn.close()
    upstream, here = self.upstream.encode(), self.url.encode()
    # Object metadata (mediaLink, selfLink) and resumable sessions (Location) carry the emulator's
    # own address: point them back at the proxy, or later requests would go around it.
    if "json" in dict((k.lower(), v) for k, v in received).get("content-type", ""):
      data = data.replace(upstream, here)
    out = [(k, v.replace(self.upstream, self.url)) for k, v in received if k.lower() not in _HOP_BY_HOP]
    return status, out, data


def _read_body(handler):
  if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
    chunks = []
    while True:
      size = int(handler.rfile.readline().split(b";")[0].strip() or b"0", 16)
      if size == 0:
        handler.rfile.readline()
        return b"".join(chunks)
      chunks.append(handler.rfile.read(size))
      handler.rfile.readline()
  length = int(handler.headers.get("Content-Length") or 0)
  return handler.rfile.read(length) if length else None


def _reply(handler, status, headers, data, cut=False):
  handler.send_response(status)
  for k, v in headers:
    handler.send_header(k, v)
  handler.send_header("Content-Length", str(len(data)))
  if cut:
    handler.send_header("Connection", "close")
  handler.end_headers()
  if handler.command == "HEAD":
    return
  if not cut:
    handler.wfile.write(data)
    return
  handler.wfile.write(data[:len(data) // 2])
  handler.wfile.flush()
  # A plain close (FIN), not a reset: a reset may discard the half already sent.
  handler.close_connection = True
  with contextlib.suppress(OSError):
    handler.request.shutdown(socket.SHUT_RDWR)


def _reset(handler):
  """Closes the client's connection with a TCP reset, whatever it was in the middle of."""
  handler.close_connection = True
  with contextlib.suppress(OSError):
    handler.request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    handler.request.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def pointed_at(proxy: FaultProxy):
  """STORAGE_EMULATOR_HOST set to the proxy while inside (this process and children started meanwhile)."""
  saved = os.environ.get("STORAGE_EMULATOR_HOST")
  os.environ["STORAGE_EMULATOR_HOST"] = proxy.url
  try:
    yield proxy
  finally:
    if saved is None:
      os.environ.pop("STORAGE_EMULATOR_HOST", None)
    else:
      os.environ["STORAGE_EMULATOR_HOST"] = saved


@contextlib.contextmanager
def fault_proxy(seed=0):
  """A FaultProxy in front of the emulator STORAGE_EMULATOR_HOST names now, pointed at while inside."""
  proxy = FaultProxy(os.environ["STORAGE_EMULATOR_HOST"], seed=seed)
  try:
    with pointed_at(proxy):
      yield proxy
  finally:
    proxy.close()
