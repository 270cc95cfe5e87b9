"""A gs:// listing of many objects: one range after another against ranges split across threads.

    python benchmarks/listing.py [--n 61440] [--latency-ms 30,100] [--shapes digits,hex] [--rounds 3]
    python benchmarks/listing.py --simulate [--n 3072,30720,300000,1000000] [--shapes digits,hex,folders,dates,words]

Lists `--n` objects (empty, under `photos/`) with `transforms.listing.match_gcs` on the GCS emulator
behind tests/fault_proxy.py, which holds each request for `--latency-ms` (in parallel across
requests) as a stand-in for a real store's time to answer a page. Each round lists once with
LIST_THREADS = 1 (one range: the listing before the split, page after page) and once with the
module's LIST_THREADS, alternated, and reports the fastest of the rounds, the list requests each
made, and that both listed the same uris once each. The names' shape decides where splits land:
`digits` is photos/0000123.jpg, `hex` a uuid4's hex (photos/3f2a...jpg).

The emulator answers one request at a time and builds its whole listing for every page (about
N / 1,000 pages, each a pass over all N objects), so its own time per page is the floor here, at
any number of threads. Real GCS answers pages in parallel; its per-page time was not measured.

`--simulate` runs the splitting (`transforms.listing._split_points`, LIST_THREADS ranges at most)
over sorted name lists in memory, every request taking one unit of time, no store at all: how many
page-times the listing takes against one range's, and how many requests, for four shapes of names
(`dates`: photos/2026/MM/DD/imgNNNNN.jpg; `folders`: photos/NNN/NNNNNN.jpg, 1,024 a folder, as
`refresh.py` names them; `words`: photos/<animal>/<letter><n>.jpg).
"""

import argparse
import os
import random
import sys
import time
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _names(shape, n):
  rng = random.Random(20261207)
  if shape == "digits":
    return [f"photos/{i:07d}.jpg" for i in range(n)]
  if shape == "hex":
    return [f"photos/{uuid.UUID(int=rng.getrandbits(128), version=4).hex}.jpg" for _ in range(n)]
  if shape == "dates":
    days = [(m, d) for m in range(1, 13) for d in range(1, 29)]
    return [f"photos/2026/{m:02d}/{d:02d}/img{i:05d}.jpg" for i, (m, d) in enumerate(days * (n // len(days) + 1))][:n]
  if shape == "folders":
    return [f"photos/{i // 1024:03d}/{i:06d}.jpg" for i in range(n)]
  if shape == "words":
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    return [f"photos/{rng.choice(['cat', 'dog', 'bird', 'fish', 'horse'])}/{rng.choice(letters)}{i}.jpg"
            for i in range(n)]
  raise SystemExit(f"--shapes: unknown shape {shape!r} (digits, hex, dates, folders, words)")


def simulate(names, page=1000, prefix="photos/"):
  """(page-times, requests) of listing `names` split as transforms/listing.py splits (its
  `_split_points`, LIST_THREADS and `_SPLIT_AFTER_PAGES`), every request taking one unit of time:
  an event per request, in time order."""
  import bisect
  import heapq

  from transforms import listing
  names = sorted(names)
  threads, high_of_prefix = listing.LIST_THREADS, listing._above_prefix(prefix)
  events = [(1, 0, bisect.bisect_left(names, prefix), None)]  # (ends at, order, first index, range end)
  order, requests, ranges, last_end, seen, boundaries = 1, 1, 1, 0, 0, 0
  while events:
    at, _, index, end = heapq.heappop(events)
    stop = len(names) if end is None else bisect.bisect_left(names, end)
    got = names[index:min(index + page, stop)]
    seen, index, last_end = seen + len(got), index + len(got), max(last_end, at)
    if index < stop and got:  # a page with more after it: where the listing may split
      boundaries += 1
      if boundaries >= listing._SPLIT_AFTER_PAGES:
        starts = listing._split_points(got[0], got[-1], end if end is not None else high_of_prefix, threads - ranges)
        for start, until in zip(starts, starts[1:] + [end]):
          heapq.heappush(events, (at + 1, order, bisect.bisect_left(names, start), until))
          order, requests, ranges = order + 1, requests + 1, ranges + 1
        if starts:
          end = starts[0]
          stop = bisect.bisect_left(names, end)
    if index >= stop:
      ranges -= 1
      continue
    heapq.heappush(events, (at + 1, order, index, end))
    order, requests = order + 1, requests + 1
  assert seen == len(names), (seen, len(names))
  return last_end, requests


def _simulate(args):
  from transforms import listing
  print(f"simulated: {listing.LIST_THREADS} threads at most, pages of 1,000, each request one unit of time")
  for n in (int(x) for x in args.n.split(",")):
    for shape in args.shapes.split(","):
      pages = -(-n // 1000)
      took, requests = simulate(_names(shape, n))
      print(f"  N={n:>9,} {shape:<7} {took:>4} page-times against {pages:>4} for one range ({took / pages:.2f}); "
            f"{requests:>5} requests ({requests / pages - 1:+.0%} on the pages)")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", default=None, help="objects (--simulate: comma-separated)")
  parser.add_argument("--latency-ms", default="30,100", help="comma-separated: ms added to each request")
  parser.add_argument("--shapes", default=None)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--simulate", action="store_true", help="the splitting alone, in memory: no store")
  args = parser.parse_args(argv)
  if args.simulate:
    args.n, args.shapes = args.n or "3072,30720,300000,1000000", args.shapes or "digits,hex,dates,folders,words"
    return _simulate(args)
  args.n, args.shapes = int(args.n or 61440), args.shapes or "digits,hex"

  from benchmarks.refresh import _fast_put_all
  from tests.fault_proxy import fault_proxy
  from tests.gcs_emulator import gcs_emulator
  from transforms import listing, read

  def put(uri, data):  # one request an object
    client, _ = read._gcs_client()
    bucket, _, name = uri[len("gs://"):].partition("/")
    client.bucket(bucket).blob(name).upload_from_string(data)

  threads = listing.LIST_THREADS
  print(f"machine: {os.cpu_count()} cores; N={args.n:,} objects a shape; LIST_THREADS 1 against {threads}; "
        f"fastest of {args.rounds} alternated rounds")
  for shape in args.shapes.split(","):
    with gcs_emulator("listing-bench") as bucket, fault_proxy() as proxy:
      started = time.perf_counter()
      _fast_put_all(proxy, put, [(f"gs://{bucket}/{name}", b"") for name in _names(shape, args.n)])
      print(f"\n{shape}: {args.n:,} objects written in {time.perf_counter() - started:.0f} s (untimed set-up)")
      for latency_ms in (float(x) for x in args.latency_ms.split(",")):
        proxy.latency_s = latency_ms / 1000
        best, requests, listed = {}, {}, {}
        for _ in range(args.rounds):
          for count in (1, threads):
            listing.LIST_THREADS = count
            proxy.reset_counts()
            started = time.perf_counter()
            uris = [uri for uri, _ in listing.match_gcs(f"gs://{bucket}/photos/**")]
            took = time.perf_counter() - started
            best[count] = min(best.get(count, took), took)
            requests[count] = proxy.counts["list"]
            listed[count] = uris
        listing.LIST_THREADS = threads
        same = sorted(listed[1]) == sorted(listed[threads]) and len(set(listed[1])) == len(listed[1]) == args.n
        print(f"  +{latency_ms:g} ms a request: one range {best[1]:.2f} s ({requests[1]} requests); "
              f"{threads} threads {best[threads]:.2f} s ({requests[threads]} requests): "
              f"{best[1] / best[threads]:.2f}x; the same {len(listed[1]):,} uris once each: {same}")


if __name__ == "__main__":
  main()
