"""What `EmbedImages` gives: an `Embedding` per image, an `ImageError` per failure, and batches of them for column sinks."""

import dataclasses
from typing import Optional

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class Embedding:
  """One image's vector. `uri`: the input string unchanged, None for bytes input; `width` and
  `height`: the decoded image before resizing (after EXIF orientation); `embedding`: float32 of
  `EmbedImages.layout["dim"]`, the backbones' features concatenated in order."""
  uri: Optional[str]
  sha256: str
  width: int
  height: int
  embedding: np.ndarray

  def __eq__(self, other):
    if not isinstance(other, Embedding):
      return NotImplemented
    return ((self.uri, self.sha256, self.width, self.height) == (other.uri, other.sha256, other.width, other.height)
            and np.array_equal(self.embedding, other.embedding))

  def __hash__(self):
    return hash((self.uri, self.sha256))


@dataclasses.dataclass(frozen=True)
class ImageError:
  """An input that could not be embedded: the values of an errors Parquet row. `stage` is read,
  decode or embed; `uri` is None for bytes input; `sha256`: of the bytes, when they were read."""
  uri: Optional[str]
  stage: str
  error_type: str
  message: str
  sha256: Optional[str] = None

  @classmethod
  def from_row(cls, row: dict, sha256: Optional[str] = None) -> "ImageError":
    return cls(row["uri"], row["stage"], row["error_type"], row["message"], sha256)

  def row(self) -> dict:
    """As an errors Parquet row."""
    return {"uri": self.uri, "stage": self.stage, "error_type": self.error_type, "message": self.message}


@dataclasses.dataclass(frozen=True, eq=False)
class EmbeddingBatch:
  """Embeddings of one model batch in one window, as columns: for sinks that write columns
  (Parquet) without a Python object per row. `keys[i]` is the i-th input's key (None unkeyed)."""
  keys: tuple
  uris: tuple
  sha256s: tuple
  widths: tuple
  heights: tuple
  embeddings: np.ndarray  # float32 [len(keys), dim]

  def __len__(self):
    return len(self.keys)

  def rows(self):
    """(key, Embedding) per row."""
    for i, key in enumerate(self.keys):
      yield key, Embedding(self.uris[i], self.sha256s[i], int(self.widths[i]), int(self.heights[i]),
                           self.embeddings[i])


class ImageFailed(ValueError):
  """A bad image in an `EmbedImages` without `with_exception_handling()`: fails the pipeline, naming it."""


@dataclasses.dataclass(frozen=True)
class Reused:
  """An input whose bytes hash to a digest `known_digests` gave for its key: not embedded again."""
  sha256: str
