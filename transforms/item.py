"""The item: one input on its way from a listing to a row, with what is known of it so far."""

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class Item:
  """An input to embed. `uri` is where its bytes are; everything else rides along to its row.

  - `columns`: pass-through output columns (a manifest's, `label`), by name;
  - `sha256`: its digest when already known (--dedupe hashed it), else None;
  - `previous_sha256`: the digest of its row in --previous: if the bytes still have it, that row
    is carried over and the file is not decoded;
  - `duplicates`: Items with the same bytes (--dedupe), which get this item's row or error.
  """
  uri: str
  columns: dict = dataclasses.field(default_factory=dict)
  sha256: Optional[str] = None
  previous_sha256: Optional[str] = None
  duplicates: tuple = ()

  def rows(self):
    """(uri, columns) of every row this item makes: its own, then its duplicates'."""
    yield self.uri, self.columns
    for duplicate in self.duplicates:
      yield duplicate.uri, duplicate.columns

  def replace(self, **changes) -> "Item":
    return dataclasses.replace(self, **changes)
