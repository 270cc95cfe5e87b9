"""The item: one input on its way from a listing to a row, with what is known of it so far."""

import dataclasses
import functools
import operator
from typing import Any, Optional


@dataclasses.dataclass(frozen=True)
class Item:
  """An input to embed. `uri` is where its bytes are; everything else rides along to its row.

  - `columns`: pass-through output columns (a manifest's, `label`), by name;
  - `sha256`: its digest when already known (--dedupe hashed it), else None;
  - `listed`: what the listing said of it (transforms.listing.Listed), None without one (a manifest
    row, a shard's image): recorded in its row, and a row of --previous or of an interrupted run
    (--resume) made from the same listing is reused without reading it;
  - `reuse`: committed rows made for this uri (transforms.reuse.Ref: an interrupted run's first,
    then --previous's) whose listing differs: if the bytes still hash as one of them, that row is
    reused and the file is not decoded;
  - `duplicates`: Items with the same bytes (--dedupe), which get this item's row or error;
  - `shard_format`: 'tar', 'parquet' or 'tfrecord' when `uri` is a shard of many images (each becomes
    an item of its own, `uri#key`, inside the embed stage), None for one image file;
  - `members`: a shard's images' committed rows (Refs, as `reuse`), by uri: those whose bytes
    still hash as one reuse it;
  - `member_duplicates`: a shard's images that other inputs duplicate (--dedupe), by uri: Items that
    get that image's row;
  - `skip_members`: a shard's images that are another input's duplicates (--dedupe): not embedded here;
  - `row_groups`: (first, stop, first row) when the item is a slice of a Parquet shard's row groups,
    else None (the whole shard).
  """
  uri: str
  columns: dict = dataclasses.field(default_factory=dict)
  sha256: Optional[str] = None
  listed: Any = None
  reuse: tuple = ()
  duplicates: tuple = ()
  shard_format: Optional[str] = None
  members: dict = dataclasses.field(default_factory=dict)
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

  @property
  def listed_size(self) -> Optional[int]:
    """The size its listing gave, None without a listing."""
    return None if self.listed is None else self.listed.size

  def digests(self) -> tuple:
    """The digests of the rows it may reuse (`reuse`), for EmbedImages' known_digests."""
    return tuple(ref.sha256 for ref in self.reuse)

  def replace(self, **changes) -> "Item":
    return dataclasses.replace(self, **changes)

  def __reduce__(self):
    # Every input crosses the listing's stages, the reuse join and the reshuffle as one of these.
    return by_position(self)


def by_position(instance):
  """A dataclass's __reduce__: pickled (Beam's coder for values it has no other coder for) as its
  class and its values by position, less the field names and the trailing values left at their
  defaults; a third the bytes of pickle's default for an Item with a listing.

  Called for every element at every stage boundary of the local runner (an unchanged refresh of
  30,720 objects pickled ~80,000 Items, before the reuse join moved them a bucket at a time): the
  fields and defaults are looked up once
  per class, and the values taken by one C-level attrgetter."""
  get, defaults = _positions(type(instance))
  values = get(instance)
  n = len(values)
  while n > 1 and values[n - 1] == defaults[n - 1]:
    n -= 1
  return type(instance), values[:n]


@functools.lru_cache(maxsize=None)
def _positions(cls):
  """(attrgetter of every field, in order, giving a tuple; each field's default value)."""
  fields = dataclasses.fields(cls)
  names = [f.name for f in fields]
  # attrgetter of one name returns the value, not a 1-tuple
  get = operator.attrgetter(*names) if len(names) > 1 else (lambda obj, name=names[0]: (getattr(obj, name),))
  return get, tuple(_default(f) for f in fields)


def _default(field):
  if field.default_factory is not dataclasses.MISSING:
    return field.default_factory()
  return field.default
