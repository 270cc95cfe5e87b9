"""Checkpoints and --resume: rows durable as they are made, a killed run resumed to the rows a clean run gives."""

import contextlib
import io
import json
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystems import FileSystems

from pipeline.main import run
from tests.corpus import SAMPLES
from tests.gcs_emulator import gcs_emulator
from tests.recipe import relative_l2
from tests.test_decode_pool import wait_for
from transforms import checkpoint
from transforms.listing import Listed
from transforms.write import embedding_matrix, rows_to_table

MODEL = ("--backbones", "mobilenet_v2", "--weights", "random", "--image-size", "96")
REPO = pathlib.Path(__file__).resolve().parent.parent


class FakeClock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def _table(uris):
  n = len(uris)
  return rows_to_table(uris, ["ab" * 32] * n, [4] * n, [3] * n, np.ones((n, 2), np.float32),
                       listings=[Listed(10, mtime_ns=1_500_000_000)] * n)


def test_a_writer_commits_every_n_rows_and_every_t_seconds_atomically(tmp_path):
  clock = FakeClock()
  writer = checkpoint.CheckpointWriter(str(tmp_path), "run1", every_seconds=30, every_rows=4, clock=clock)
  writer.start_bundle("a.jpg")
  writer.add(_table(["a", "b", "c"]))
  assert checkpoint.files(str(tmp_path)) == []  # 3 rows, 0 s: nothing yet, and no folder made
  writer.add(_table(["d"]))  # the 4th row commits
  first = checkpoint.files(str(tmp_path))
  assert [os.path.basename(p) for p in first] == [
      f"embeddings-run1-{__import__('hashlib').sha1(b'a.jpg').hexdigest()[:16]}-000000.parquet"]
  assert pq.read_table(first[0]).column("uri").to_pylist() == ["a", "b", "c", "d"]
  writer.add(_table(["e"]))
  clock.now += 29.9
  writer.add(None, [{"uri": "x", "stage": "decode", "error_type": "truncated_image", "message": "m",
                     "sha256": "cd" * 32, "size": 5, "mtime": 2.0}])
  assert len(checkpoint.files(str(tmp_path))) == 1
  clock.now += 0.2  # 30 s since the last commit
  writer.add(None)
  names = sorted(os.path.basename(p) for p in checkpoint.files(str(tmp_path)))
  assert len(names) == 3 and names[0].startswith("embeddings-") and names[2].startswith("errors-")
  assert not [p for p in os.listdir(tmp_path / "_checkpoints") if p.startswith(".")]  # no temporary left
  assert checkpoint.committed_rows(str(tmp_path)) == 6
  # A retry of the bundle (same first item) writes the same names again.
  again = checkpoint.CheckpointWriter(str(tmp_path), "run1", every_seconds=30, every_rows=4, clock=clock)
  again.start_bundle("a.jpg")
  again.add(_table(["a", "b", "c", "d"]))
  assert len(checkpoint.files(str(tmp_path))) == 3


def test_the_writers_clock_runs_from_the_bundles_start_not_its_first_item(tmp_path):
  # The first batch arrives after the model's build: if that took `every_seconds`, the batch is
  # committed as it is added, not `every_seconds` later.
  clock = FakeClock()
  writer = checkpoint.CheckpointWriter(str(tmp_path), "run1", every_seconds=5, every_rows=4096, clock=clock)
  clock.now += 5.0
  writer.start_bundle("a.jpg")
  writer.add(_table(["a"]))
  assert checkpoint.committed_rows(str(tmp_path)) == 1
  writer.add(_table(["b"]))  # 0 s since that commit
  assert checkpoint.committed_rows(str(tmp_path)) == 1


# --- a real run, killed and resumed ---------------------------------------------------


@pytest.fixture(scope="module")
def many_photos(tmp_path_factory):
  """1400 files: the shipped photos linked 200 times over, in label folders."""
  root = tmp_path_factory.mktemp("many")
  photos = sorted(SAMPLES.glob("*.jpg"))
  for i in range(200):
    folder = root / f"label{i % 3}"
    folder.mkdir(exist_ok=True)
    for p in photos:
      (folder / f"{i:03d}-{p.name}").symlink_to(p)
  return root


def _start(inputs, out, *extra):
  return subprocess.Popen(
      [sys.executable, "-m", "pipeline", "--input", f"{inputs}/**", "--output", str(out), *MODEL,
       "--label-from-dir", "--checkpoint-every", "0.3", *extra],
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO)


def _kill_once_committed(proc, out, more_than=0):
  """SIGKILLs `proc` once its checkpoints hold more than `more_than` rows; returns the rows
  committed when it died."""
  try:
    wait_for(lambda: proc.poll() is None and checkpoint.committed_rows(str(out)) > more_than
             or proc.poll() is not None, "rows to be committed", limit=300)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()[-500:]
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.wait(60)
  assert proc.returncode == -signal.SIGKILL
  return checkpoint.committed_rows(str(out))


def _quiet_run(*argv):
  stderr = io.StringIO()
  with contextlib.redirect_stderr(stderr):
    status = run([str(a) for a in argv])
  return status, stderr.getvalue()


def _rows(out):
  table = pq.read_table(sorted(pathlib.Path(out).glob("embeddings-*.parquet")))
  return table, dict(zip(table.column("uri").to_pylist(), embedding_matrix(table.column("embedding"))))


def test_a_run_killed_twice_resumes_to_a_clean_runs_rows(tmp_path, many_photos):
  out = tmp_path / "out"
  total = sum(1 for _ in many_photos.rglob("*.jpg"))
  committed = _kill_once_committed(_start(many_photos, out), out)
  assert 0 < committed < total
  assert not (out / "_SUCCESS.json").exists()
  status, stderr = _quiet_run("--input", f"{many_photos}/**", "--output", out, *MODEL, "--label-from-dir")
  assert status == 2 and "pass --resume to go on from it" in stderr

  # Resume, and kill the resume too once it has committed rows of its own.
  second = _kill_once_committed(_start(many_photos, out, "--resume"), out, more_than=committed)
  assert second > committed

  status, stderr = _quiet_run("--input", f"{many_photos}/**", "--output", out, *MODEL, "--label-from-dir",
                              "--resume")
  assert status == 0, stderr[-2000:]
  summary = json.loads((out / "_SUCCESS.json").read_text())
  counts = summary["counts"]
  print(f"killed at {committed} committed rows, then at {second}; the last resume: {counts}")
  assert counts["matched"] == total == counts["embedded"] + counts["resumed"] + counts["failed"]
  assert counts["failed"] == 0
  # Every row committed by the two killed runs was reused (unread: the files' listings are
  # unchanged), and only the rest was embedded. A local run retries no bundle, so no row was
  # committed twice.
  assert (counts["resumed"], counts["embedded"]) == (second, total - second)
  assert sorted(p.name for p in out.iterdir()) == sorted(
      ["_SUCCESS.json"] + [p.name for p in out.glob("embeddings-*.parquet")] + [p.name for p in out.glob("errors-*.parquet")])

  table, resumed = _rows(out)
  uris = table.column("uri").to_pylist()
  assert len(uris) == len(set(uris)) == total  # each input exactly once
  assert set(table.column("label").to_pylist()) == {"label0", "label1", "label2"}
  for uri, label in zip(uris, table.column("label").to_pylist()):
    assert pathlib.Path(uri).parent.name == label
  status, _ = _quiet_run("--input", f"{many_photos}/**", "--output", tmp_path / "clean", *MODEL, "--label-from-dir")
  assert status == 0
  _, clean = _rows(tmp_path / "clean")
  worst = max(float(relative_l2(resumed[u], clean[u])) for u in clean)
  print(f"resumed rows against a clean run's: max relative L2 {worst:.1e}")
  assert worst < 1e-5

  # Resuming a finished run does nothing, and says so.
  status, stderr = _quiet_run("--input", f"{many_photos}/**", "--output", out, *MODEL, "--label-from-dir",
                              "--resume")
  assert status == 0 and stderr.strip().splitlines()[-1] == (
      f"embed-images: --resume: {out} holds a finished run (_SUCCESS.json); nothing to do")


def _fake_interrupted_run(out, photos, *model):
  """The state a killed run leaves: checkpoints of some rows, a partial shard, Beam's temp folder."""
  status, _ = _quiet_run("--input", f"{photos}/*.jpg", "--output", out, *model, "--checkpoint-every", "0",
                         "--overwrite")
  assert status == 0
  table = pq.read_table(sorted(pathlib.Path(out).glob("embeddings-*.parquet"))).slice(0, 3)
  assert table.column("listing").null_count == 0  # the run recorded each file's listing
  layout = json.loads((pathlib.Path(out) / "_SUCCESS.json").read_text())["layout"]
  for p in pathlib.Path(out).iterdir():
    p.unlink()
  checkpoint.write_layout(str(out), layout)
  pq.write_table(table, pathlib.Path(out) / "_checkpoints" / "embeddings-x-y-000000.parquet")
  # Killed while it wrote its final shards: one is there, cut short, and Beam's temp folder too.
  (pathlib.Path(out) / "embeddings-00000-of-00002.parquet").write_bytes(b"PAR1 cut short")
  (pathlib.Path(out) / "beam-temp-embeddings-0123").mkdir()
  (pathlib.Path(out) / "beam-temp-embeddings-0123" / "part").write_bytes(b"partial")
  return table


def test_resume_refuses_another_model_and_verify_rereads(tmp_path):
  photos = tmp_path / "in"
  photos.mkdir()
  for p in sorted(SAMPLES.glob("*.jpg")):
    (photos / p.name).write_bytes(p.read_bytes())
  out = tmp_path / "out"
  committed = _fake_interrupted_run(out, photos, *MODEL)
  status, stderr = _quiet_run("--input", f"{photos}/*.jpg", "--output", out, *MODEL[:-1], "128", "--resume")
  assert status == 2 and stderr.strip().splitlines()[-1] == (
      f"embed-images: error: --resume: the checkpoints in {str(out)!r} were made with another model "
      "(mobilenet_v2 input_size changed: 96 -> 128); pass --overwrite to start over")

  # A committed file rewritten in place, same size and mtime: trusted unless --resume-verify.
  changed = committed.column("uri").to_pylist()[0]
  stat = os.stat(changed)
  data = bytearray(pathlib.Path(changed).read_bytes())
  data[-3] ^= 0xFF  # inside the JPEG's entropy data: still decodes, to other pixels
  pathlib.Path(changed).write_bytes(bytes(data))
  os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns))
  status, stderr = _quiet_run("--input", f"{photos}/*.jpg", "--output", out, *MODEL, "--resume",
                              "--resume-verify")
  assert status == 0, stderr
  counts = json.loads((out / "_SUCCESS.json").read_text())["counts"]
  assert (counts["resumed"], counts["embedded"]) == (2, 5)  # the changed file was embedded again
  # Nothing but the outputs: the rows made and the rows reused numbered as one set of shards.
  assert sorted(p.name for p in out.iterdir()) == ["_SUCCESS.json", "embeddings-00000-of-00002.parquet",
                                                   "embeddings-00001-of-00002.parquet", "errors-00000-of-00001.parquet"]
  table, rows = _rows(out)
  sha = dict(zip(table.column("uri").to_pylist(), table.column("sha256").to_pylist()))
  assert sha[changed] == __import__("hashlib").sha256(bytes(data)).hexdigest()

  # Without --resume-verify the listing is trusted: the committed row is reused unread.
  _fake_interrupted_run(out, photos, *MODEL)
  pathlib.Path(changed).write_bytes(bytes(data[:-3] + bytes([data[-3] ^ 0xFF]) + data[-2:]))
  os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns))
  status, _ = _quiet_run("--input", f"{photos}/*.jpg", "--output", out, *MODEL, "--resume")
  assert status == 0
  assert json.loads((out / "_SUCCESS.json").read_text())["counts"]["resumed"] == 3

  # --resume on an empty output is a run from scratch; --overwrite with another model starts over.
  status, _ = _quiet_run("--input", f"{photos}/*.jpg", "--output", tmp_path / "empty", *MODEL, "--resume")
  assert status == 0 and json.loads((tmp_path / "empty" / "_SUCCESS.json").read_text())["counts"]["embedded"] == 7
  _fake_interrupted_run(out, photos, *MODEL)
  status, _ = _quiet_run("--input", f"{photos}/*.jpg", "--output", out, *MODEL[:-1], "128", "--resume",
                         "--overwrite")
  assert status == 0 and json.loads((out / "_SUCCESS.json").read_text())["counts"]["embedded"] == 7


def test_resume_on_gcs(tmp_path):
  with gcs_emulator("resume-bucket") as name:
    bucket = f"gs://{name}"
    photos = {}
    for p in sorted(SAMPLES.glob("*.jpg")):
      with FileSystems.create(f"{bucket}/photos/{p.name}") as f:
        f.write(p.read_bytes())
      photos[f"{bucket}/photos/{p.name}"] = p
    out = f"{bucket}/out"
    status, _ = _quiet_run("--input", f"{bucket}/photos/*.jpg", "--output", out, *MODEL, "--checkpoint-every", "0")
    assert status == 0
    with FileSystems.open(f"{out}/embeddings-00000-of-00001.parquet") as f:
      full = pq.read_table(io.BytesIO(f.read()))
    part = full.slice(0, 4)
    assert all(row["generation"] for row in part.column("listing").to_pylist())  # gs:// listings recorded
    with FileSystems.open(f"{out}/_SUCCESS.json") as f:
      layout = json.loads(f.read())["layout"]
    FileSystems.delete([m.path for m in FileSystems.match([f"{out}/*"])[0].metadata_list])
    checkpoint.write_layout(out, layout)
    sink = io.BytesIO()
    pq.write_table(part, sink)
    with FileSystems.create(f"{out}/_checkpoints/embeddings-x-y-000000.parquet") as f:
      f.write(sink.getvalue())
    status, stderr = _quiet_run("--input", f"{bucket}/photos/*.jpg", "--output", out, *MODEL, "--resume")
    assert status == 0, stderr
    with FileSystems.open(f"{out}/_SUCCESS.json") as f:
      counts = json.loads(f.read())["counts"]
    assert (counts["resumed"], counts["embedded"]) == (4, 3)
    assert not checkpoint.files(out)
    shards = sorted(m.path for m in FileSystems.match([f"{out}/embeddings-*.parquet"])[0].metadata_list)
    assert [s.rsplit("/", 1)[1] for s in shards] == ["embeddings-00000-of-00002.parquet",
                                                     "embeddings-00001-of-00002.parquet"]
    got = pa.concat_tables(pq.read_table(io.BytesIO(FileSystems.open(s).read())) for s in shards)
    assert got.num_rows == 7
    want = dict(zip(full.column("uri").to_pylist(), embedding_matrix(full.column("embedding"))))
    for uri, vector in zip(got.column("uri").to_pylist(), embedding_matrix(got.column("embedding"))):
      assert relative_l2(vector, want[uri]) < 1e-5


def test_resume_composes_with_previous_manifest_columns_and_dedupe(tmp_path):
  from PIL import Image
  photos = tmp_path / "in"
  photos.mkdir()
  for p in sorted(SAMPLES.glob("*.jpg")):
    (photos / p.name).write_bytes(p.read_bytes())
  status, _ = _quiet_run("--input", f"{photos}/*.jpg", "--output", tmp_path / "day1", *MODEL)
  assert status == 0
  # Day 2: two new pictures, one of them also under a second name.
  with Image.open(SAMPLES / "astronaut.jpg") as img:
    img.transpose(Image.FLIP_LEFT_RIGHT).save(photos / "new_a.png")
    img.transpose(Image.FLIP_TOP_BOTTOM).save(photos / "new_b.png")
  (photos / "new_b copy.png").write_bytes((photos / "new_b.png").read_bytes())
  uris = sorted(str(p) for p in photos.iterdir())
  manifest = tmp_path / "manifest.csv"
  manifest.write_text("uri,id\n" + "".join(f'"{u}",{i}\n' for i, u in enumerate(uris)))
  day2 = ("--input-manifest", manifest, *MODEL, "--previous", tmp_path / "day1", "--dedupe")
  status, _ = _quiet_run(*day2, "--output", tmp_path / "clean")
  assert status == 0
  clean_counts = json.loads((tmp_path / "clean" / "_SUCCESS.json").read_text())["counts"]
  assert (clean_counts["carried_over"], clean_counts["embedded"], clean_counts["deduplicated"]) == (7, 3, 1)
  clean_table, clean = _rows(tmp_path / "clean")

  # The state a kill leaves after new_b's rows (it and its copy) were committed.
  out = tmp_path / "out"
  committed = clean_table.filter(pa.compute.is_in(clean_table.column("uri"), pa.array(
      [str(photos / "new_b.png"), str(photos / "new_b copy.png")])))
  assert committed.column("listing").null_count == 2  # a manifest row has no listing
  checkpoint.write_layout(str(out), json.loads((tmp_path / "clean" / "_SUCCESS.json").read_text())["layout"])
  pq.write_table(committed, out / "_checkpoints" / "embeddings-x-y-000000.parquet")

  status, stderr = _quiet_run(*day2, "--output", out, "--resume")
  assert status == 0, stderr
  counts = json.loads((out / "_SUCCESS.json").read_text())["counts"]
  # A manifest lists no size or mtime: the committed files were read and hashed, then reused.
  assert (counts["carried_over"], counts["resumed"], counts["embedded"], counts["failed"]) == (7, 2, 1, 0)
  assert counts["matched"] == len(uris) == 10
  table, rows = _rows(out)
  assert sorted(table.column("uri").to_pylist()) == uris
  ids = dict(zip(table.column("uri").to_pylist(), table.column("id").to_pylist()))
  assert ids == {u: i for i, u in enumerate(uris)}  # each row keeps its own manifest columns
  for uri in uris:
    assert relative_l2(rows[uri], clean[uri]) < 1e-5, uri
