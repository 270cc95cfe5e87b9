"""read_embeddings: uris, one float32 matrix and the layout, with one backbone's part sliced out."""

import pathlib

import numpy as np
import pytest

from pipeline import read_embeddings
from pipeline.main import run

SAMPLES = pathlib.Path(__file__).resolve().parent.parent / "samples"


def test_read_back_with_l2_normalised_parts(tmp_path):
  out = tmp_path / "out"
  assert run(["--input", f"{SAMPLES}/*.jpg", "--output", str(out), "--backbones", "mobilenet_v2,efficientnet_b0",
              "--weights", "random", "--image-size", "64", "--normalize", "l2", "--num-shards", "2"]) == 0
  assert len(list(out.glob("embeddings-*-of-00002.parquet"))) == 2
  emb = read_embeddings(str(out))
  assert emb.vectors.dtype == np.float32 and emb.vectors.shape == (len(list(SAMPLES.glob("*.jpg"))), 1280 + 1280)
  assert sorted(emb.uris) == sorted(str(p) for p in SAMPLES.glob("*.jpg"))
  assert emb.layout["normalize"] == "l2"
  first, second = emb.backbone("mobilenet_v2"), emb.backbone("efficientnet_b0")
  assert first.shape[1] == 1280 and np.shares_memory(first, emb.vectors)
  np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(second, axis=1), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(second, emb.vectors[:, 1280:])
  with pytest.raises(KeyError, match="resnet50"):
    emb.backbone("resnet50")


def test_missing_output_says_so(tmp_path):
  with pytest.raises(FileNotFoundError, match="no embeddings"):
    read_embeddings(str(tmp_path))
