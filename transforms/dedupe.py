"""--dedupe: files with the same bytes are embedded once; every uri still gets its own row."""

import concurrent.futures

import apache_beam as beam

from transforms.embed import item_parts
from transforms.read import read_bytes, sha256_hex


def _digest(uri):
  try:
    return sha256_hex(read_bytes(uri))
  except Exception:  # unreadable now: the embed stage reads it again and reports why
    return None


class HashFilesDoFn(beam.DoFn):
  """(sha256 or a unique key for unreadable files, item); reads several files at once."""

  def __init__(self, threads):
    self._threads = threads

  def setup(self):
    self._executor = concurrent.futures.ThreadPoolExecutor(self._threads, thread_name_prefix="hash")

  def process(self, batch):
    items = [item_parts(element) for element in batch]
    for (uri, info), digest in zip(items, self._executor.map(_digest, [uri for uri, _ in items])):
      yield (digest or f"unreadable:{uri}"), (uri, info)

  def teardown(self):
    self._executor.shutdown(wait=False)


def representative(grouped):
  """One item per content: the smallest uri embeds, the others ride along as its duplicates."""
  _, items = grouped
  items = sorted(items, key=lambda item: item[0])
  (uri, info), rest = items[0], items[1:]
  if rest:
    info = dict(info, duplicates=[(u, i.get("columns") or {}) for u, i in rest])
  return uri, info


class Dedupe(beam.PTransform):
  def __init__(self, threads=16):
    super().__init__()
    self._threads = threads

  def expand(self, items):
    return (items
            | "Batch" >> beam.BatchElements(min_batch_size=16, max_batch_size=256)
            | "Hash" >> beam.ParDo(HashFilesDoFn(self._threads))
            | "GroupByContent" >> beam.GroupByKey()
            | "Representative" >> beam.Map(representative))
