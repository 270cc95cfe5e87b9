"""Shards as input: WebDataset tars, Parquet image columns and TFRecords, read by the real pipeline next to loose files."""

import contextlib
import hashlib
import io
import json
import os
import pathlib
import shutil
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.main import run
from tests.corpus import SAMPLES
from tests.recipe import relative_l2
from transforms import shards

SMALL_MODEL = ("--backbones", "mobilenet_v2", "--weights", "random", "--image-size", "32",
               "--max-failure-fraction", "1", "--progress", "off")
NAMES = sorted(p.stem for p in SAMPLES.glob("*.jpg"))
GARBAGE = b"\xff\xd8\xff\xe0 not a jpeg at all" * 4


def jpeg(name) -> bytes:
  return (SAMPLES / f"{name}.jpg").read_bytes()


def _tar_add(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_webdataset(path, groups):
  """groups: [(key, {extension: bytes})], in img2dataset's layout."""
  with tarfile.open(path, "w") as tar:
    for key, parts in groups:
      for extension, data in parts.items():
        _tar_add(tar, f"{key}.{extension}", data)


def tf_example(features: dict) -> bytes:
  import tensorflow as tf
  feature = {}
  for name, value in features.items():
    if isinstance(value, bytes):
      feature[name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
    elif isinstance(value, int):
      feature[name] = tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
    else:
      feature[name] = tf.train.Feature(float_list=tf.train.FloatList(value=[value]))
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_tfrecords(path, records, compression=None):
  import tensorflow as tf
  with tf.io.TFRecordWriter(str(path), options=compression) as writer:
    for record in records:
      writer.write(record)


def truncate(path, keep_bytes):
  data = pathlib.Path(path).read_bytes()
  pathlib.Path(path).write_bytes(data[:keep_bytes])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  """Loose copies of the samples, and the same images in every kind of shard, with broken members,
  and a truncated tar and TFRecord. Returns (root, expected) where expected maps each uri to
  ("ok", sample name) or ("error", stage, error_type)."""
  root = tmp_path_factory.mktemp("shards")
  expected = {}
  loose = root / "loose"
  loose.mkdir()
  for name in NAMES:
    shutil.copy(SAMPLES / f"{name}.jpg", loose / f"{name}.jpg")
    expected[str(loose / f"{name}.jpg")] = ("ok", name)

  (root / "web").mkdir()
  tar = root / "web" / "00000.tar"
  groups = []
  for i, name in enumerate(NAMES):
    key = f"{i:09d}"
    meta = {"caption": f"a photo of {name}", "width": 7 + i, "sha256": "not ours", "score": 0.5 + i}
    groups.append((key, {"jpg": jpeg(name), "json": json.dumps(meta).encode(), "txt": name.encode(),
                         "cls": str(i).encode()}))
    expected[f"{tar}#{key}"] = ("ok", name)
  groups.append(("broken", {"jpg": GARBAGE, "json": b"{}", "txt": b"broken"}))
  expected[f"{tar}#broken"] = ("error", "decode")
  groups.append(("noimage", {"json": b"{}", "txt": b"lost"}))
  expected[f"{tar}#noimage"] = ("error", "read", "missing_image")
  write_webdataset(tar, groups)

  cut = root / "web" / "00001.tar"
  write_webdataset(cut, [(f"c{i}", {"jpg": jpeg(NAMES[i]), "txt": b"x"}) for i in range(3)])
  # Cut inside the third image: the two groups before it stay, one error row names the shard.
  with tarfile.open(cut) as t:
    third = t.getmember("c2.jpg")
  truncate(cut, third.offset_data + third.size // 2)
  expected[f"{cut}#c0"] = ("ok", NAMES[0])
  expected[f"{cut}#c1"] = ("ok", NAMES[1])
  expected[str(cut)] = ("error", "read", "shard_damaged")

  (root / "pq").mkdir()
  parquet = root / "pq" / "00000.parquet"
  rows = [{"key": f"k{i}", "jpg": jpeg(name), "caption": f"p {name}", "width": 100 + i}
          for i, name in enumerate(NAMES)]
  rows += [{"key": "nojpg", "jpg": None, "caption": "none", "width": 0},
           {"key": "garbage", "jpg": GARBAGE, "caption": "bad", "width": 0}]
  schema = pa.schema([("key", pa.string()), ("jpg", pa.binary()), ("caption", pa.string()), ("width", pa.int32())])
  pq.write_table(pa.Table.from_pylist(rows, schema=schema), parquet, row_group_size=4)
  for i, name in enumerate(NAMES):
    expected[f"{parquet}#k{i}"] = ("ok", name)
  expected[f"{parquet}#nojpg"] = ("error", "read", "missing_image")
  expected[f"{parquet}#garbage"] = ("error", "decode")

  (root / "tf").mkdir()
  records = root / "tf" / "train.tfrecord.gz"
  examples = [tf_example({"image/encoded": jpeg(name), "image/class/label": i, "image/filename": name.encode(),
                          "image/score": 0.25 * i}) for i, name in enumerate(NAMES)]
  examples += [tf_example({"image/encoded": GARBAGE, "image/class/label": -1}),
               tf_example({"image/class/label": -2})]
  write_tfrecords(records, examples, "GZIP")
  for i, name in enumerate(NAMES):
    expected[f"{records}#{i}"] = ("ok", name)
  expected[f"{records}#{len(NAMES)}"] = ("error", "decode")
  expected[f"{records}#{len(NAMES) + 1}"] = ("error", "read", "missing_image")

  cut_records = root / "tf" / "cut.tfrecord"
  write_tfrecords(cut_records, examples[:3])
  first_two = sum(12 + len(e) + 4 for e in examples[:2])
  truncate(cut_records, first_two + 12 + len(examples[2]) // 2)
  expected[f"{cut_records}#0"] = ("ok", NAMES[0])
  expected[f"{cut_records}#1"] = ("ok", NAMES[1])
  expected[str(cut_records)] = ("error", "read", "shard_damaged", first_two)
  return root, expected


def embed(inputs, out, *options):
  args = [arg for pattern in inputs for arg in ("--input", str(pattern))]
  stderr = io.StringIO()
  with contextlib.redirect_stderr(stderr):
    status = run([*args, "--output", str(out), *SMALL_MODEL, *options])
  assert status == 0, stderr.getvalue()[-2000:]
  out = pathlib.Path(out)
  embeddings = pq.read_table(sorted(out.glob("embeddings-*.parquet")))
  errors = pq.read_table(sorted(out.glob("errors-*.parquet")))
  summary = json.loads((out / "_SUCCESS.json").read_text())
  return embeddings, errors, summary


def vectors(table) -> dict:
  column = table.column("embedding").combine_chunks()
  matrix = np.asarray(column.flatten(), np.float32).reshape(len(column), -1)
  return dict(zip(table.column("uri").to_pylist(), matrix))


@pytest.fixture(scope="module")
def mixed_run(dataset, tmp_path_factory):
  root, _ = dataset
  return embed([f"{root}/loose/*.jpg", f"{root}/web/*.tar", f"{root}/pq/*.parquet", f"{root}/tf/*"],
               tmp_path_factory.mktemp("out") / "out")


def assert_accounted_for(expected, embeddings, errors, summary):
  """Every expected uri in exactly one output, once; the error rows' stages and types as expected;
  _SUCCESS.json's counts agreeing with the rows read back."""
  rows, failed = embeddings.column("uri").to_pylist(), errors.column("uri").to_pylist()
  assert len(rows) == len(set(rows)), sorted(u for u in rows if rows.count(u) > 1)
  assert len(failed) == len(set(failed)), sorted(u for u in failed if failed.count(u) > 1)
  assert not set(rows) & set(failed)
  assert set(rows) == {u for u, e in expected.items() if e[0] == "ok"}
  assert set(failed) == {u for u, e in expected.items() if e[0] == "error"}
  by_uri = {row["uri"]: row for row in errors.to_pylist()}
  for uri, want in expected.items():
    if want[0] == "error":
      assert (by_uri[uri]["stage"], by_uri[uri]["error_type"])[:len(want) - 1] == want[1:3], (uri, by_uri[uri])
  counts = summary["counts"]
  assert summary["status"] == "ok"
  assert counts["matched"] == counts["embedded"] + counts["failed"]
  assert (counts["matched"], counts["embedded"], counts["failed"]) == (len(expected), len(rows), len(failed))


def test_every_image_of_files_and_shards_is_accounted_for_once(dataset, mixed_run):
  _, expected = dataset
  assert_accounted_for(expected, *mixed_run)


def test_broken_members_and_damaged_shards_are_error_rows(dataset, mixed_run):
  _, expected = dataset
  _, errors, _ = mixed_run
  by_uri = {row["uri"]: row for row in errors.to_pylist()}
  for uri, want in expected.items():
    if want[0] != "error":
      continue
    row = by_uri[uri]
    assert row["stage"] == want[1], (uri, row)
    if len(want) > 2:
      assert row["error_type"] == want[2], (uri, row)
    if want[2:3] == ("shard_damaged",):
      assert "at byte" in row["message"]
    if len(want) > 3:
      assert f"at byte {want[3]}:" in row["message"], row  # the TFRecord's first lost record


def assert_shard_images_embed_as_their_files(expected, embeddings, loose_uri):
  """Each shard image's vector against the same image's, read as a loose file in the same run; its
  sha256 is of the image bytes. Returns how many were compared."""
  got = vectors(embeddings)
  digests = dict(zip(embeddings.column("uri").to_pylist(), embeddings.column("sha256").to_pylist()))
  compared = 0
  for uri, want in expected.items():
    if want[0] != "ok" or "#" not in uri:
      continue
    assert relative_l2(got[uri], got[loose_uri(want[1])]) < 1e-4, uri
    assert digests[uri] == hashlib.sha256(jpeg(want[1])).hexdigest(), uri
    compared += 1
  return compared


def test_shard_images_embed_as_their_loose_files_do(dataset, mixed_run):
  root, expected = dataset
  compared = assert_shard_images_embed_as_their_files(
      expected, mixed_run[0], lambda name: str(root / "loose" / f"{name}.jpg"))
  assert compared == 3 * len(NAMES) + 4


def test_shard_metadata_becomes_typed_columns(dataset, mixed_run):
  root, _ = dataset
  embeddings, _, _ = mixed_run
  schema = embeddings.schema
  # Parquet's own types; the WebDataset .json's as JSON reads them; TFRecord features' dtypes.
  assert schema.field("caption").type == pa.string()
  assert schema.field("source_key").type == pa.string()
  assert schema.field("source_width").type == pa.int32()  # the Parquet shard's type wins
  assert schema.field("source_sha256").type == pa.string()
  assert schema.field("score").type == pa.float64()
  assert schema.field("txt").type == pa.string()
  assert schema.field("cls").type == pa.int64()
  assert schema.field("image/class/label").type == pa.int64()
  assert schema.field("image/filename").type == pa.string()
  assert schema.field("image/score").type == pa.float32()
  assert "jpg" not in schema.names and "image/encoded" not in schema.names
  rows = {row["uri"]: row for row in embeddings.to_pylist()}
  tar = root / "web" / "00000.tar"
  row = rows[f"{tar}#000000002"]
  assert (row["caption"], row["source_width"], row["score"], row["txt"], row["cls"], row["source_sha256"]) == (
      f"a photo of {NAMES[2]}", 9, 2.5, NAMES[2], 2, "not ours")
  row = rows[f"{root / 'pq' / '00000.parquet'}#k3"]
  assert (row["source_key"], row["caption"], row["source_width"]) == ("k3", f"p {NAMES[3]}", 103)
  row = rows[f"{root / 'tf' / 'train.tfrecord.gz'}#4"]
  assert (row["image/class/label"], row["image/filename"], row["image/score"]) == (4, NAMES[4], 1.0)
  loose = rows[str(root / "loose" / f"{NAMES[0]}.jpg")]
  assert loose["caption"] is None and loose["image/class/label"] is None


def test_refresh_carries_shard_images_over_by_uri_and_sha256(dataset, mixed_run, tmp_path):
  root, expected = dataset
  previous = tmp_path / "previous"
  embeddings, errors, _ = mixed_run
  # The previous run as a finished output of its own (mixed_run's directory is module-scoped).
  previous.mkdir()
  pq.write_table(embeddings, previous / "embeddings-00000-of-00001.parquet")
  pq.write_table(errors, previous / "errors-00000-of-00001.parquet")
  summary = json.loads(json.dumps(mixed_run[2]))
  (previous / "_SUCCESS.json").write_text(json.dumps(summary))
  again, again_errors, counts = embed(
      [f"{root}/loose/*.jpg", f"{root}/web/*.tar", f"{root}/pq/*.parquet", f"{root}/tf/*"],
      tmp_path / "out", "--previous", str(previous))
  counts = counts["counts"]
  assert counts["embedded"] == 0 and counts["carried_over"] == embeddings.num_rows
  assert counts["matched"] == len(expected) and counts["removed"] == 0
  assert sorted(again.column("uri").to_pylist()) == sorted(embeddings.column("uri").to_pylist())
  before, after = vectors(embeddings), vectors(again)
  assert all(np.array_equal(before[u], after[u]) for u in before)


def test_hugging_face_image_structs_read_bytes_or_their_path(tmp_path, mixed_run, dataset):
  root, _ = dataset
  folder = tmp_path / "hf"
  folder.mkdir()
  shutil.copy(SAMPLES / f"{NAMES[1]}.jpg", folder / "beside.jpg")
  image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
  table = pa.table({"image": pa.array([{"bytes": jpeg(NAMES[0]), "path": None},
                                       {"bytes": None, "path": "beside.jpg"},
                                       {"bytes": None, "path": "gone.jpg"}], type=image),
                    "label": pa.array([3, 1, 4], pa.int64())})
  pq.write_table(table, folder / "train-00000-of-00001.parquet")
  embeddings, errors, summary = embed([f"{folder}/*.parquet"], tmp_path / "out")
  shard = folder / "train-00000-of-00001.parquet"
  got = vectors(embeddings)
  assert set(got) == {f"{shard}#0", f"{shard}#1"}
  assert [(row["uri"], row["stage"]) for row in errors.to_pylist()] == [(f"{shard}#2", "read")]
  assert summary["counts"]["matched"] == 3
  labels = dict(zip(embeddings.column("uri").to_pylist(), embeddings.column("label").to_pylist()))
  assert labels == {f"{shard}#0": 3, f"{shard}#1": 1}
  assert embeddings.schema.field("label").type == pa.int64()
  loose = vectors(mixed_run[0])
  for key, name in ((0, NAMES[0]), (1, NAMES[1])):
    assert relative_l2(got[f"{shard}#{key}"], loose[str(root / "loose" / f"{name}.jpg")]) < 1e-4


# --- readers on their own -----------------------------------------------------------------------

@pytest.mark.parametrize("uri, forced, kind", [
    ("gs://b/s/00012.tar", "auto", "tar"), ("a/b.parquet", "auto", "parquet"), ("x.tfrecord", "auto", "tfrecord"),
    ("x.TFRecords", "auto", "tfrecord"), ("x.tfrec.gz", "auto", "tfrecord"), ("x.jpg", "auto", None),
    ("x.tar.gz", "auto", None), ("x.gz", "auto", None), ("x.bin", "tar", "tar"), ("x.tar", "image", None)])
def test_shard_format_by_extension_or_forced(uri, forced, kind):
  assert shards.shard_format(uri, forced) == kind


@pytest.mark.parametrize("patterns, forced, may", [
    (["photos/**/*.jpg"], "auto", False), (["a/*.JPG", "gs://b/x/*.png"], "auto", False),
    (["a/*.jpg", "b/*.tar"], "auto", True), (["photos/**"], "auto", True), (["a/*"], "auto", True),
    (["a/*.jp*"], "auto", True), (["a/*.[jt]ar"], "auto", True), (["a/*.gz"], "auto", True),
    (["a/img_?"], "auto", True), (["a/one.tfrecord"], "auto", True), (["a/*.bin"], "tar", True),
    (["a/*.tar"], "image", False), (["a/.hidden"], "auto", True)])
def test_may_match_shards_only_rules_out_shards_that_no_matched_name_can_be(patterns, forced, may):
  assert shards.may_match_shards(patterns, forced) is may


def test_tfrecord_framing_reads_what_tensorflow_writes_and_names_a_bad_checksum(tmp_path):
  path = tmp_path / "r.tfrecord"
  write_tfrecords(path, [b"one", b"", b"three" * 100])
  with open(path, "rb") as f:
    assert [data for _, data in shards.tfrecords(f)] == [b"one", b"", b"three" * 100]
  damaged = bytearray(path.read_bytes())
  damaged[12 + 3 + 4 + 12 + 4 + 12 + 7] ^= 0xFF  # inside the third record's data
  path.write_bytes(bytes(damaged))
  members = list(shards.read_members(str(path), shards.ShardLayout("tfrecord", "x")))
  assert [m.error["error_type"] for m in members] == ["bad_record", "missing_image", "shard_damaged"]
  assert f"at byte {12 + 3 + 4 + 12 + 4}:" in members[-1].error["message"]


def test_a_shard_that_cannot_be_opened_is_one_read_error(tmp_path):
  members = list(shards.read_members(str(tmp_path / "missing.tar"), shards.ShardLayout("tar")))
  assert len(members) == 1 and members[0].key is None
  assert (members[0].error["stage"], members[0].error["uri"]) == ("read", str(tmp_path / "missing.tar"))


def test_a_parquet_shard_without_an_image_column_is_refused_at_launch(tmp_path):
  pq.write_table(pa.table({"a": [b"x"], "b": [b"y"]}), tmp_path / "two.parquet")
  stderr = io.StringIO()
  with contextlib.redirect_stderr(stderr):
    status = run(["--input", str(tmp_path / "*.parquet"), "--output", str(tmp_path / "out"), *SMALL_MODEL])
  assert status == 2
  assert "--image-column" in stderr.getvalue() and "Traceback" not in stderr.getvalue()


# --- resume, dedupe, removed, slices: shard images as first-class inputs -----------------------


def _finished_copy(mixed_run, folder):
  """mixed_run's output as a finished run of its own (the fixture's directory is module-scoped)."""
  embeddings, errors, summary = mixed_run
  folder.mkdir()
  pq.write_table(embeddings, folder / "embeddings-00000-of-00001.parquet")
  pq.write_table(errors, folder / "errors-00000-of-00001.parquet")
  (folder / "_SUCCESS.json").write_text(json.dumps(summary))
  return folder


def test_resume_reuses_the_committed_rows_of_shard_images(dataset, mixed_run, tmp_path):
  from transforms import checkpoint
  root, _ = dataset
  embeddings, _, summary = mixed_run
  tar, parquet = root / "web" / "00000.tar", root / "pq" / "00000.parquet"
  # What a run killed part-way leaves: rows of the first images of each shard committed.
  wanted = [f"{tar}#{i:09d}" for i in range(3)] + [f"{parquet}#k{i}" for i in range(2)]
  committed = embeddings.filter(pa.compute.is_in(embeddings.column("uri"), pa.array(wanted)))
  # A committed vector that differs from what the model gives proves the row was reused, not remade.
  marked = pa.array([[0.5] * len(v) for v in committed.column("embedding").to_pylist()],
                    committed.schema.field("embedding").type)
  committed = committed.set_column(committed.schema.get_field_index("embedding"), "embedding", marked)
  # A shard's image records its shard's listing (what lets a refresh leave an unchanged shard unread).
  sizes = {row["uri"]: row["listing"]["size"] for row in committed.select(["uri", "listing"]).to_pylist()}
  assert sizes == {uri: os.path.getsize(uri.rpartition("#")[0]) for uri in wanted}
  out = tmp_path / "out"
  checkpoint.write_layout(str(out), summary["layout"])
  pq.write_table(committed, out / "_checkpoints" / "embeddings-x-y-000000.parquet")

  again, errors, resumed = embed([str(tar), str(parquet)], out, "--resume")
  counts = resumed["counts"]
  shard_rows = [u for u in embeddings.column("uri").to_pylist() if u.startswith((str(tar) + "#", str(parquet) + "#"))]
  assert (counts["resumed"], counts["embedded"]) == (len(wanted), len(shard_rows) - len(wanted))
  assert sorted(again.column("uri").to_pylist()) == sorted(shard_rows)
  got, clean = vectors(again), vectors(embeddings)
  for uri in shard_rows:
    if uri in wanted:
      assert np.all(got[uri] == 0.5), uri
    else:
      assert relative_l2(got[uri], clean[uri]) < 1e-5, uri
  assert not (out / "_checkpoints").exists()


def test_dedupe_embeds_each_image_once_across_files_and_shards(dataset, mixed_run, tmp_path):
  root, expected = dataset
  tar, parquet = root / "web" / "00000.tar", root / "pq" / "00000.parquet"
  inputs = [f"{root}/loose/*.jpg", str(tar), str(parquet)]
  embeddings, errors, summary = embed(inputs, tmp_path / "out", "--dedupe")
  counts = summary["counts"]
  # Each sample is a loose file, a tar member and a Parquet row; the tar's and the Parquet shard's
  # garbage members are the same bytes too.
  assert counts["deduplicated"] == 2 * len(NAMES) + 1
  wanted = {u: e for u, e in expected.items()
            if u.startswith((f"{root}/loose/", f"{tar}#", f"{parquet}#"))}
  assert sorted(embeddings.column("uri").to_pylist()) == sorted(u for u, e in wanted.items() if e[0] == "ok")
  assert sorted(errors.column("uri").to_pylist()) == sorted(u for u, e in wanted.items() if e[0] == "error")
  assert (counts["matched"], counts["failed"], summary["status"]) == (len(wanted), errors.num_rows, "ok")
  got = vectors(embeddings)
  for i, name in enumerate(NAMES):
    # One row made, copied to the others: the same float32s, bit for bit.
    loose = got[str(root / "loose" / f"{name}.jpg")]
    assert np.array_equal(got[f"{tar}#{i:09d}"], loose) and np.array_equal(got[f"{parquet}#k{i}"], loose)
  rows = {row["uri"]: row for row in embeddings.to_pylist()}
  # Each copy keeps its own columns.
  assert rows[f"{parquet}#k1"]["caption"] == f"p {NAMES[1]}"
  assert rows[f"{tar}#000000001"]["caption"] == f"a photo of {NAMES[1]}"
  assert rows[str(root / "loose" / f"{NAMES[1]}.jpg")]["caption"] is None


def test_images_gone_from_a_shard_are_counted_removed(tmp_path):
  shard = tmp_path / "in" / "00000.tar"
  shard.parent.mkdir()
  write_webdataset(shard, [(f"{i:04d}", {"jpg": jpeg(name), "txt": name.encode()}) for i, name in enumerate(NAMES[:4])])
  embed([str(shard)], tmp_path / "day1")
  # Day 2: two images left the shard, one came in.
  write_webdataset(shard, [("0000", {"jpg": jpeg(NAMES[0]), "txt": b"a"}), ("0002", {"jpg": jpeg(NAMES[2]), "txt": b"c"}),
                           ("0009", {"jpg": jpeg(NAMES[5]), "txt": b"new"})])
  embeddings, _, summary = embed([str(shard)], tmp_path / "day2", "--previous", str(tmp_path / "day1"))
  counts = summary["counts"]
  assert (counts["matched"], counts["carried_over"], counts["embedded"], counts["removed"]) == (3, 2, 1, 2)
  assert sorted(embeddings.column("uri").to_pylist()) == [f"{shard}#0000", f"{shard}#0002", f"{shard}#0009"]
  rows = {row["uri"]: row["txt"] for row in embeddings.to_pylist()}
  assert rows[f"{shard}#0000"] == "a"  # a carried row takes this run's columns


def _same_listing_other_bytes(path):
  """Overwrites `path`'s contents with zeros and puts its mtime back: its listing (size, mtime_ns) is
  unchanged, so only a run that reads it can tell. A Parquet shard keeps its footer (the launch
  reads its schema) and loses its pages."""
  before = os.stat(path)
  data = path.read_bytes()
  keep = 8 + int.from_bytes(data[-8:-4], "little") if path.suffix == ".parquet" else 0
  path.write_bytes(data[:4] + b"\0" * (len(data) - 4 - keep) + data[len(data) - keep:] if keep else b"\0" * len(data))
  os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_a_refresh_leaves_a_shard_whose_listing_is_unchanged_unread(tmp_path):
  # The launch reads the first shard of each format for its columns (pipeline/launch.py:
  # shard_layouts): 00000.tar stays whole for that; 00001.tar and the Parquet shard's pages go.
  folder = tmp_path / "in"
  folder.mkdir()
  first, tar, parquet = folder / "00000.tar", folder / "00001.tar", folder / "00002.parquet"
  write_webdataset(first, [("0000", {"jpg": jpeg(NAMES[5]), "txt": b"first"})])
  write_webdataset(tar, [(f"{i:04d}", {"jpg": jpeg(name), "txt": name.encode()}) for i, name in enumerate(NAMES[:3])])
  pq.write_table(pa.table({"image": pa.array([jpeg(n) for n in NAMES[3:5]], pa.binary()), "n": [3, 4]}), parquet)
  inputs = [f"{folder}/*.tar", str(parquet)]
  day1, _, _ = embed(inputs, tmp_path / "day1")
  assert day1.num_rows == 6
  for path in (tar, parquet):
    _same_listing_other_bytes(path)

  day2, errors, summary = embed(inputs, tmp_path / "day2", "--previous", str(tmp_path / "day1"))
  counts = summary["counts"]
  assert (counts["matched"], counts["carried_over"], counts["embedded"], counts["removed"], counts["failed"]) == (
      6, 6, 0, 0, 0)
  assert errors.num_rows == 0
  # The rows as day 1 made them, columns from the shards included: nothing was read.
  assert day2.sort_by("uri").drop(["listing"]).equals(day1.sort_by("uri").drop(["listing"]))
  assert day2.sort_by("uri").column("listing").equals(day1.sort_by("uri").column("listing"))

  # Reading them (--previous-verify) finds what is there now: the whole shard's image reused by its
  # digest, a tar of zeros (an empty archive), Parquet pages that can't be read (one error row for the
  # shard): 3 + 2 images no longer found in them.
  _, errors, summary = embed(inputs, tmp_path / "verify", "--previous", str(tmp_path / "day1"), "--previous-verify")
  assert (summary["counts"]["carried_over"], summary["counts"]["removed"]) == (1, 5)
  assert {uri.rpartition("#")[0] or uri for uri in errors.column("uri").to_pylist()} == {str(parquet)}


def test_a_shard_with_a_failed_image_last_time_is_read_again(tmp_path):
  shard = tmp_path / "in" / "00000.tar"
  shard.parent.mkdir()
  write_webdataset(shard, [("0000", {"jpg": jpeg(NAMES[0])}), ("0001", {"jpg": GARBAGE}), ("0002", {"jpg": jpeg(NAMES[1])})])
  embed([str(shard)], tmp_path / "day1")
  # Unchanged: the failed image is retried, as a loose file that failed is, so the shard is read;
  # the others reuse their rows by digest.
  _, errors, summary = embed([str(shard)], tmp_path / "day2", "--previous", str(tmp_path / "day1"))
  counts = summary["counts"]
  assert (counts["matched"], counts["carried_over"], counts["embedded"], counts["failed"]) == (3, 2, 0, 1)
  assert errors.column("uri").to_pylist() == [f"{shard}#0001"]


def test_a_parquet_shard_of_many_row_groups_is_read_in_slices(tmp_path):
  shard = tmp_path / "in" / "train.parquet"
  shard.parent.mkdir()
  images = [jpeg(name) for name in NAMES] + [GARBAGE]
  pq.write_table(pa.table({"image": pa.array(images, pa.binary()), "n": list(range(len(images)))}), shard,
                 row_group_size=2)
  assert shards.parquet_parts(str(shard), 3) == [(0, 2, 0), (2, 4, 4)]
  assert shards.parquet_parts(str(shard), 100) == []  # too few rows to be worth a slice
  layout = shards.parquet_layout(str(shard))
  sliced = [(m.key, m.columns["n"]) for m in shards.read_members(str(shard), layout, (2, 4, 4))]
  assert sliced == [("4", 4), ("5", 5), ("6", 6), ("7", 7)]

  whole = embed([str(shard)], tmp_path / "whole", "--parquet-part-rows", "0")
  parts = embed([str(shard)], tmp_path / "parts", "--parquet-part-rows", "2")
  for (embeddings, errors, summary) in (whole, parts):
    assert sorted(embeddings.column("uri").to_pylist()) == sorted(f"{shard}#{i}" for i in range(len(NAMES)))
    assert errors.column("uri").to_pylist() == [f"{shard}#{len(NAMES)}"]
    assert summary["counts"]["matched"] == len(images)
  a, b = vectors(whole[0]), vectors(parts[0])
  assert all(relative_l2(a[u], b[u]) < 1e-5 for u in a)
  rows = {row["uri"]: row["n"] for row in parts[0].to_pylist()}
  assert rows == {f"{shard}#{i}": i for i in range(len(NAMES))}


def test_label_from_dir_labels_shard_images_by_the_shards_folder(tmp_path):
  for label, names in (("cats", NAMES[:2]), ("dogs", NAMES[2:4])):
    (tmp_path / "in" / label).mkdir(parents=True)
    write_webdataset(tmp_path / "in" / label / "00000.tar",
                     [(f"{i:04d}", {"jpg": jpeg(name)}) for i, name in enumerate(names)])
  shutil.copy(SAMPLES / f"{NAMES[4]}.jpg", tmp_path / "in" / "dogs" / "loose.jpg")
  embeddings, _, summary = embed([f"{tmp_path}/in/*/*"], tmp_path / "out", "--label-from-dir")
  labels = dict(zip(embeddings.column("uri").to_pylist(), embeddings.column("label").to_pylist()))
  assert labels == {f"{tmp_path}/in/cats/00000.tar#0000": "cats", f"{tmp_path}/in/cats/00000.tar#0001": "cats",
                    f"{tmp_path}/in/dogs/00000.tar#0000": "dogs", f"{tmp_path}/in/dogs/00000.tar#0001": "dogs",
                    f"{tmp_path}/in/dogs/loose.jpg": "dogs"}
  assert summary["counts"]["matched"] == 5
