"""--dedupe: one model run per distinct content, one row per uri."""

import pathlib
import shutil

import numpy as np

from pipeline import read_embeddings
from pipeline.main import run
from transforms.dedupe import representative
from transforms.item import Item
from transforms.reuse import Ref
from transforms.write import read_summary

SAMPLES = pathlib.Path(__file__).resolve().parent.parent / "samples"


def test_representative_is_the_smallest_uri_with_the_others_as_duplicates():
  b, a = Item("b.jpg", columns={"id": 2}), Item("a.jpg", columns={"id": 1})
  first = representative(("abc", [b, a]))
  assert first == Item("a.jpg", columns={"id": 1}, duplicates=(b,))
  assert list(first.rows()) == [("a.jpg", {"id": 1}), ("b.jpg", {"id": 2})]
  assert representative(("abc", [a])) == a
  # The item whose row --previous (or a resume) can reuse goes first, whatever its name.
  unchanged = Item("z.jpg", reuse=(Ref("previous", "day1.parquet", 3, "row", "abc", None),))
  assert representative(("abc", [a, unchanged])) == unchanged.replace(duplicates=(a,))
  resumed = Item("y.jpg", reuse=(Ref("resume", "ckpt.parquet", 0, "row", "abc", None),))
  assert representative(("abc", [resumed, a])).uri == "y.jpg"
  # A row of other bytes earns nothing.
  other = Item("c.jpg", reuse=(Ref("previous", "day1.parquet", 4, "row", "def", None),))
  assert representative(("abc", [other, a])).uri == "a.jpg"


def test_dedupe_embeds_each_content_once_and_every_uri_gets_its_row(tmp_path):
  d = tmp_path / "in"
  d.mkdir()
  photos = sorted(SAMPLES.glob("*.jpg"))[:3]
  for p in photos:
    shutil.copy(p, d / p.name)
    shutil.copy(p, d / f"copy-{p.name}")
  shutil.copy(photos[0], d / f"another-{photos[0].name}")
  (d / "broken.jpg").write_bytes(b"")
  (d / "broken-copy.jpg").write_bytes(b"")
  out = tmp_path / "out"
  status = run(["--input", f"{d}/*.jpg", "--output", str(out), "--backbones", "mobilenet_v2", "--weights",
                "random", "--image-size", "64", "--dedupe", "--max-failure-fraction", "0.5"])
  assert status == 0
  emb = read_embeddings(str(out))
  assert sorted(emb.uris) == sorted(str(p) for p in d.glob("*.jpg") if "broken" not in p.name)
  by_sha = {}
  for sha, vector in zip(emb.column("sha256"), emb.vectors):
    by_sha.setdefault(sha, []).append(vector)
  assert len(by_sha) == 3
  for vectors in by_sha.values():
    for v in vectors[1:]:
      np.testing.assert_array_equal(v, vectors[0])
  summary = read_summary(str(out))
  assert summary["counts"]["matched"] == 9 and summary["counts"]["embedded"] == 7
  assert summary["counts"]["failed_by_type"] == {"empty_file": 2}
  # 4 copies of good files and 1 of the empty one reused another uri's outcome
  assert summary["counts"]["deduplicated"] == 5


def test_hashing_for_dedupe_reads_no_fifo_and_no_file_over_the_ceiling(tmp_path):
  import hashlib
  import os
  import threading

  from transforms.dedupe import HashFilesDoFn
  from transforms.listing import Listed
  (tmp_path / "a.jpg").write_bytes(b"same bytes")
  (tmp_path / "b.jpg").write_bytes(b"same bytes")
  os.mkfifo(tmp_path / "fifo.jpg")  # read, it would wait for a writer for good
  with open(tmp_path / "big.jpg", "wb") as f:
    f.truncate(64 << 20)  # sparse: 64 MiB on the listing and on disk, nothing stored
  items = [Item(str(tmp_path / "a.jpg")), Item(str(tmp_path / "b.jpg")), Item(str(tmp_path / "fifo.jpg")),
           Item(str(tmp_path / "big.jpg")), Item("gs://no-such-bucket/huge.jpg", listed=Listed(size=20 << 30))]
  hashing = HashFilesDoFn(threads=2, max_bytes=32 << 20)
  hashing.setup()
  got = []
  worker = threading.Thread(target=lambda: got.extend(hashing.process(items)), daemon=True)
  worker.start()
  worker.join(120)  # bounds only a broken build, which would wait on the FIFO forever
  hashing.teardown()
  assert not worker.is_alive(), "a read is still waiting"
  keys = [key for key, _ in got]
  assert keys[0] == keys[1] == hashlib.sha256(b"same bytes").hexdigest()
  assert keys[2:] == [f"unreadable:{item.uri}" for item in items[2:]]  # the embed stage says why, unread
