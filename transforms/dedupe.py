"""--dedupe: files (and images inside shards) with the same bytes are embedded once; every uri still gets its own row."""

import concurrent.futures

import apache_beam as beam

from transforms import shards
from transforms.item import Item
from transforms.read import read_bytes, sha256_hex


def _digest(uri, max_bytes=None, listed_size=None):
  """The sha256 of the bytes at `uri`, or None where they can't be read, or are over `max_bytes`
  by their listing or on disk (the embed stage then reads them again, or not, and reports why)."""
  try:
    return sha256_hex(read_bytes(uri, max_bytes=max_bytes, listed_size=listed_size))
  except Exception:  # unreadable now: the embed stage reads it again and reports why
    return None


class HashFilesDoFn(beam.DoFn):
  """Batches of Items in; (sha256 or a unique key for unreadable files, item) out; reads several
  files at once. (The embed stage reads each file again: its digest is the one that counts.)
  `max_bytes`: the decode processes' memory ceiling; a file over it is not read here either."""

  def __init__(self, threads, max_bytes=None):
    self._threads, self._max_bytes = threads, max_bytes

  def setup(self):
    self._executor = concurrent.futures.ThreadPoolExecutor(self._threads, thread_name_prefix="hash")

  def process(self, batch):
    digests = self._executor.map(lambda item: _digest(item.uri, self._max_bytes, item.listed_size), batch)
    for item, digest in zip(batch, digests):
      yield (digest or f"unreadable:{item.uri}"), item

  def teardown(self):
    self._executor.shutdown(wait=False)


def representative(grouped) -> Item:
  """One item per content; the others ride along as its duplicates. The one whose row can be
  reused goes first (the same bytes in --previous, then in an interrupted run's checkpoints),
  else the smallest uri: a new copy of an unchanged file must not make it re-embed."""
  digest, items = grouped
  def rank(item):
    sources = [ref.source for ref in item.reuse if ref.sha256 == digest]
    return "previous" not in sources, "resume" not in sources, item.uri
  first, *rest = sorted(items, key=rank)
  return first.replace(duplicates=tuple(rest)) if rest else first


# --- with shards: an image inside a shard is deduplicated like a file ------------------------------


class HashShardsDoFn(beam.DoFn):
  """Shard items in; (sha256, (shard path, Item of one of its images)) out, for every image the shard
  holds that can be read: the shard is read once more for this. Members that can't be read are left
  to the embed stage, which reads the shard again and reports them."""

  def __init__(self, layouts, extra_fields):
    self._layouts, self._extra_fields = layouts, extra_fields

  def process(self, shard: Item):
    for member, uri, columns in shards.shard_images(shard, self._layouts, self._extra_fields):
      if uri is None or member.error is not None:
        continue
      digest = _digest(member.source) if member.data is None else sha256_hex(member.data)
      if digest is None:
        continue
      yield digest, (shard.uri, Item(uri, columns=columns, reuse=shard.members.get(uri, ())))


def _resolve(grouped):
  """One content's inputs -> the file to embed (tagged "files"), or for a shard's image, what its shard
  must know: (shard, (uri, duplicates)) tagged "duplicates", (shard, uri) tagged "skip" for each image
  that is another's duplicate; and the number of duplicates (tagged "count")."""
  digest, entries = grouped
  entries = list(entries)
  shard_of = {item.uri: shard for shard, item in entries}
  first = representative((digest, [item for _, item in entries]))
  if shard_of[first.uri] is None:
    yield beam.pvalue.TaggedOutput("files", first)
  elif first.duplicates:
    yield beam.pvalue.TaggedOutput("duplicates", (shard_of[first.uri], (first.uri, first.duplicates)))
  for duplicate in first.duplicates:
    if shard_of[duplicate.uri] is not None:
      yield beam.pvalue.TaggedOutput("skip", (shard_of[duplicate.uri], duplicate.uri))
  yield beam.pvalue.TaggedOutput("count", len(first.duplicates))


def _attach_dedupe(joined):
  _, groups = joined
  duplicates, skip = dict(groups["duplicates"]), frozenset(groups["skip"])
  for item in groups["shards"]:
    yield item.replace(member_duplicates=duplicates, skip_members=skip) if duplicates or skip else item


class DedupeWithShards(beam.PTransform):
  """--dedupe over files and the images inside shards alike: each content is embedded once, by a file
  or a shard; every uri still gets its row. Returns (items, counts of duplicates: their sum is the run's)."""

  def __init__(self, threads, layouts, extra_fields, max_bytes=None):
    super().__init__()
    self._threads, self._layouts, self._extra_fields = threads, layouts, extra_fields
    self._max_bytes = max_bytes

  def expand(self, items):
    files, shard_items = items | "FilesOrShards" >> beam.Partition(lambda item, n: int(bool(item.shard_format)), 2)
    hashed_files = (files
                    | "Batch" >> beam.BatchElements(min_batch_size=16, max_batch_size=256)
                    | "Hash" >> beam.ParDo(HashFilesDoFn(self._threads, self._max_bytes))
                    | "FromFiles" >> beam.MapTuple(lambda digest, item: (digest, (None, item))))
    hashed_members = (shard_items
                      | "SpreadShards" >> beam.Reshuffle()
                      | "HashShards" >> beam.ParDo(HashShardsDoFn(self._layouts, self._extra_fields)))
    resolved = ((hashed_files, hashed_members)
                | "AllHashed" >> beam.Flatten()
                | "GroupByContent" >> beam.GroupByKey()
                | "Resolve" >> beam.FlatMap(_resolve).with_outputs("files", "duplicates", "skip", "count"))
    shards_out = ({"shards": shard_items | "KeyShards" >> beam.Map(lambda item: (item.uri, item)),
                   "duplicates": resolved.duplicates, "skip": resolved.skip}
                  | "JoinByShard" >> beam.CoGroupByKey()
                  | "AttachDedupe" >> beam.FlatMap(_attach_dedupe))
    return (resolved.files, shards_out) | "FilesAndShards" >> beam.Flatten(), resolved.count
