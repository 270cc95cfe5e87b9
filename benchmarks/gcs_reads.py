"""Reads of many small gs:// objects: FileSystems.open vs transforms.read.read_bytes, one at a time and 16 in flight.

Runs offline against the local GCS emulator (tests/gcs_emulator.py). Real GCS answers a
small GET in tens of milliseconds and serves many at once; the emulator answers in a millisecond
or two, one request at a time. Every read goes through a small HTTP proxy (a subprocess of this
script, so it doesn't share the GIL) that counts requests and connections and holds each request
for --latency-ms before forwarding it, in parallel across requests: 0 ms first, then the
simulated latency, then that plus --connect-ms per new connection, standing in for the TCP + TLS
handshake a fresh storage client pays on real GCS (the emulator speaks plain HTTP). Behind the
proxy the emulator still serves one request at a time, so with many reads in flight its own
service time is the floor. The thread pool lives across scenarios and is warmed first, as the
embed DoFn's pool lives across bundles.

    python benchmarks/gcs_reads.py [--n 200] [--size 50000] [--threads 16] [--latency-ms 30]
"""

import argparse
import concurrent.futures
import http.client
import http.server
import json
import os
import socket
import socketserver
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection"}


# ---------------------------------------------------------------- the latency proxy (child process)

def serve_proxy(upstream: str, latency_s: float, connect_s: float):
  target = urllib.parse.urlsplit(upstream)
  stats = {"requests": 0, "connections": 0}
  upstream_bytes, proxy_bytes = upstream.rstrip("/").encode(), []
  # The emulator serves one request at a time on a new connection each, with a listen
  # backlog of 5: more concurrent connects get SYNs dropped and retried a second later,
  # which would be the benchmark's artefact, not the client's. It serves no faster with more.
  upstream_slots = threading.BoundedSemaphore(4)
  lock = threading.Lock()

  class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the storage client uses with real GCS

    def setup(self):
      super().setup()
      # Headers and body go out in two writes: without this, Nagle's algorithm holds the
      # body until the client's delayed ACK (~40 ms) on a kept-alive connection.
      self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
      with lock:
        stats["connections"] += 1
      time.sleep(connect_s)

    def log_message(self, *args):
      pass

    def _forward(self):
      if self.path.startswith("/__stats"):
        with lock:
          body = json.dumps(stats).encode()
          if "reset" in self.path:
            stats.update(requests=0, connections=0, kinds={})
        return self._reply(200, [("Content-Type", "application/json")], body)
      with lock:
        stats["requests"] += 1
        kind = "%s %s" % (self.command, self.path.split("?")[0].split("/")[1])
        stats.setdefault("kinds", {})
        stats["kinds"][kind] = stats["kinds"].get(kind, 0) + 1
      length = int(self.headers.get("Content-Length") or 0)
      body = self.rfile.read(length) if length else None
      time.sleep(latency_s)
      headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP | {"host"}}
      conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
      upstream_slots.acquire()
      try:
        conn.request(self.command, self.path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        out_headers = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP]
        if "json" in (response.getheader("Content-Type") or ""):
          # Object metadata carries the emulator's own address in mediaLink, and Beam's
          # reader downloads from there: point it back at the proxy.
          data = data.replace(upstream_bytes, proxy_bytes[0])
        status = response.status
      finally:
        conn.close()
        upstream_slots.release()
      self._reply(status, out_headers, data)

    def _reply(self, status, headers, data):
      self.send_response(status)
      for k, v in headers:
        self.send_header(k, v)
      self.send_header("Content-Length", str(len(data)))
      self.end_headers()
      if self.command != "HEAD":
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward

  class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    request_queue_size = 128

  server = Server(("127.0.0.1", 0), Handler)
  proxy_bytes.append(("http://127.0.0.1:%d" % server.server_address[1]).encode())
  print(server.server_address[1], flush=True)
  server.serve_forever()


class LatencyProxy:
  def __init__(self, upstream, latency_ms, connect_ms=0.0):
    self.proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--serve-proxy", upstream,
         "--latency-ms", str(latency_ms), "--connect-ms", str(connect_ms)],
        stdout=subprocess.PIPE, text=True)
    self.url = "http://127.0.0.1:%d" % int(self.proc.stdout.readline())

  def stats(self, reset=False):
    with urllib.request.urlopen(self.url + ("/__stats?reset" if reset else "/__stats")) as r:
      return json.load(r)

  def close(self):
    self.proc.terminate()
    self.proc.wait(timeout=10)


# ---------------------------------------------------------------- the benchmark

def _time(fn):
  started = time.perf_counter()
  result = fn()
  return time.perf_counter() - started, result


def run_scenarios(paths, blobs, threads, counter):
  from transforms.read import _read_through_filesystems, read_bytes

  # One pool for all scenarios, as the embed DoFn keeps one for its lifetime; warmed so
  # that each of its threads has built its client, as after a worker's first bundle.
  pool = concurrent.futures.ThreadPoolExecutor(threads)
  list(pool.map(read_bytes, paths[:4 * threads]))

  def pooled(read):
    return list(pool.map(read, paths))

  scenarios = [
      ("FileSystems.open, one at a time", lambda: [_read_through_filesystems(p) for p in paths]),
      ("read_bytes, one at a time", lambda: [read_bytes(p) for p in paths]),
      (f"FileSystems.open, {threads} threads", lambda: pooled(_read_through_filesystems)),
      (f"read_bytes, {threads} threads", lambda: pooled(read_bytes)),
  ]
  read_bytes(paths[0])  # this thread's client: built once per worker thread in a real run
  results = []
  for name, fn in scenarios:
    counter(reset=True)
    seconds, got = _time(fn)
    assert got == blobs, name
    stats = counter()
    kinds = " + ".join(f"{count / len(paths):g} {kind.split()[1]}"
                       for kind, count in sorted(stats.get("kinds", {}).items(), reverse=True))
    results.append((name, seconds, kinds, stats["connections"]))
  pool.shutdown()
  return results


def report(title, results, n):
  base = results[0][1]
  print(f"\n{title}")
  print(f"  {'':34s} {'seconds':>7s} {'ms/read':>8s} {'speed-up':>8s}  {'new conns':>9s}  HTTP requests per read")
  for name, seconds, kinds, connections in results:
    print(f"  {name:34s} {seconds:7.2f} {1000 * seconds / n:8.1f} {base / seconds:7.1f}x  {connections:9d}  {kinds}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=200, help="objects to read")
  parser.add_argument("--size", type=int, default=50_000, help="bytes per object")
  parser.add_argument("--threads", type=int, default=16, help="reads in flight (--read-threads)")
  parser.add_argument("--latency-ms", type=float, default=30.0, help="added to every request")
  parser.add_argument("--connect-ms", type=float, default=60.0,
                      help="added once per new connection in the last scenario (0 skips it)")
  parser.add_argument("--serve-proxy", metavar="UPSTREAM", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.serve_proxy:
    return serve_proxy(args.serve_proxy, args.latency_ms / 1000, args.connect_ms / 1000)

  sys.path.insert(0, REPO)
  import logging
  logging.getLogger().setLevel(logging.ERROR)  # "No project ID could be determined", per client
  from apache_beam.io.filesystems import FileSystems
  from tests.gcs_emulator import gcs_emulator

  with gcs_emulator("bench-bucket") as bucket:
    paths = [f"gs://{bucket}/photos/{i // 50:02d}/{i:05d}.jpg" for i in range(args.n)]
    blobs = [os.urandom(args.size) for _ in paths]
    for path, data in zip(paths, blobs):
      with FileSystems.create(path, compression_type="uncompressed") as f:
        f.write(data)
    print(f"{args.n} objects of {args.size / 1000:.0f} kB on the local GCS emulator; "
          f"{args.threads} threads; {os.cpu_count()} CPU cores")

    direct = os.environ["STORAGE_EMULATOR_HOST"]
    # Every scenario goes through the proxy, 0 ms included, so all pay its own overhead alike.
    settings = [(0.0, 0.0), (args.latency_ms, 0.0)]
    if args.connect_ms:
      settings.append((args.latency_ms, args.connect_ms))
    for latency_ms, connect_ms in settings:
      proxy = LatencyProxy(direct, latency_ms, connect_ms)
      os.environ["STORAGE_EMULATOR_HOST"] = proxy.url  # read_bytes rebuilds its client on this
      try:
        title = (f"adding {latency_ms:g} ms to every request" if latency_ms else
                 "no added latency (the emulator: about 1-2 ms a request, one at a time)")
        if connect_ms:
          title += f" and {connect_ms:g} ms to every new connection (TCP + TLS)"
        report(title, run_scenarios(paths, blobs, args.threads, proxy.stats), args.n)
      finally:
        os.environ["STORAGE_EMULATOR_HOST"] = direct
        proxy.close()


if __name__ == "__main__":
  main()
