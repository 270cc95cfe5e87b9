"""--dedupe: files with the same bytes are embedded once; every uri still gets its own row."""

import concurrent.futures

import apache_beam as beam

from transforms.item import Item
from transforms.read import read_bytes, sha256_hex


def _digest(uri):
  try:
    return sha256_hex(read_bytes(uri))
  except Exception:  # unreadable now: the embed stage reads it again and reports why
    return None


class HashFilesDoFn(beam.DoFn):
  """Batches of Items in; (sha256 or a unique key for unreadable files, item) out; reads several
  files at once. (The embed stage reads each file again: its digest is the one that counts.)"""

  def __init__(self, threads):
    self._threads = threads

  def setup(self):
    self._executor = concurrent.futures.ThreadPoolExecutor(self._threads, thread_name_prefix="hash")

  def process(self, batch):
    for item, digest in zip(batch, self._executor.map(_digest, [item.uri for item in batch])):
      yield (digest or f"unreadable:{item.uri}"), item

  def teardown(self):
    self._executor.shutdown(wait=False)


def representative(grouped) -> Item:
  """One item per content; the others ride along as its duplicates. The one whose row can be
  reused goes first (the same bytes in --previous, then in an interrupted run's checkpoints),
  else the smallest uri: a new copy of an unchanged file must not make it re-embed."""
  digest, items = grouped
  first, *rest = sorted(items, key=lambda item: (item.previous_sha256 != digest, item.resume_sha256 != digest,
                                                 item.uri))
  return first.replace(duplicates=tuple(rest)) if rest else first


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
