"""The item: one input on its way from a listing to a row, with what is known of it so far."""

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class Item:
  """An input to embed. `uri` is where its bytes are; everything else rides along to its row.

  - `columns`: pass-through output columns (a manifest's, `label`), by name;
  - `sha256`: its digest when already known (--dedupe hashed it), else None;
  - `size`, `mtime`: the file as listed (bytes, seconds), when the listing said: a resume reuses a
    committed row without reading a file whose listing is unchanged;
  - `previous_sha256`: the digest of its row in --previous: if the bytes still have it, that row
    is carried over and the file is not decoded;
  - `resume_sha256`: the digest of its row committed by an interrupted run of this output (--resume):
    if the bytes still have it, that row is reused and the file is not decoded;
  - `duplicates`: Items with the same bytes (--dedupe), which get this item's row or error;
  - `shard_format`: 'tar', 'parquet' or 'tfrecord' when `uri` is a shard of many images (each becomes
    an item of its own, `uri#key`, inside the embed stage), None for one image file;
  - `previous_members`: a shard's images' digests in --previous, by uri: those whose bytes still have
    it are carried over;
  - `resume_members`: a shard's images' digests committed by an interrupted run (--resume), by uri:
    those whose bytes still have it reuse that row;
  - `member_duplicates`: a shard's images that other inputs duplicate (--dedupe), by uri: Items that
    get that image's row;
  - `skip_members`: a shard's images that are another input's duplicates (--dedupe): not embedded here;
  - `row_groups`: (first, stop, first row) when the item is a slice of a Parquet shard's row groups,
    else None (the whole shard).
  """
  uri: str
  columns: dict = dataclasses.field(default_factory=dict)
  sha256: Optional[str] = None
  size: Optional[int] = None
  mtime: Optional[float] = None
  previous_sha256: Optional[str] = None
  resume_sha256: Optional[str] = None
  duplicates: tuple = ()
  shard_format: Optional[str] = None
  previous_members: dict = dataclasses.field(default_factory=dict)
  resume_members: dict = dataclasses.field(default_factory=dict)
  member_duplicates: dict = dataclasses.field(default_factory=dict)
  skip_members: frozenset = frozenset()
  row_groups: Optional[tuple] = None

  def rows(self):
    """(uri, columns) of every row this item makes: its own, then its duplicates'."""
    for item in self.items():
      yield item.uri, item.columns

  def items(self):
    """This item, then its duplicates."""
    yield self
    yield from self.duplicates

  def replace(self, **changes) -> "Item":
    return dataclasses.replace(self, **changes)
