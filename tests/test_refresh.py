"""Incremental refresh: unchanged files carried over, changed and new ones embedded, gone ones left out."""

import json
import os
import pathlib
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import read_embeddings
from pipeline.main import run
from transforms import refresh
from transforms.write import read_summary

SAMPLES = pathlib.Path(__file__).resolve().parent.parent / "samples"
ARGS = ["--backbones", "mobilenet_v2", "--weights", "random", "--image-size", "64", "--batch-size", "4"]


@pytest.fixture
def bucket(tmp_path):
  d = tmp_path / "bucket"
  d.mkdir()
  for p in sorted(SAMPLES.glob("*.jpg")):
    shutil.copy(p, d / p.name)
  return d


def _run(bucket, out, *extra):
  return run(["--input", f"{bucket}/*.jpg", "--output", str(out), *ARGS, *extra])


def _rows(out):
  emb = read_embeddings(str(out))
  return {u: (s, v) for u, s, v in zip(emb.uris, emb.column("sha256"), emb.vectors)}


def test_unchanged_refresh_embeds_nothing_and_gives_the_same_rows(bucket, tmp_path):
  assert _run(bucket, tmp_path / "day1") == 0
  assert _run(bucket, tmp_path / "day2", "--previous", str(tmp_path / "day1")) == 0
  counts = read_summary(str(tmp_path / "day2"))["counts"]
  n = len(list(bucket.glob("*.jpg")))
  assert (counts["embedded"], counts["carried_over"], counts["removed"], counts["failed"]) == (0, n, 0, 0)
  one, two = _rows(tmp_path / "day1"), _rows(tmp_path / "day2")
  assert one.keys() == two.keys()
  for uri in one:
    assert one[uri][0] == two[uri][0]
    np.testing.assert_array_equal(one[uri][1], two[uri][1])
  summary = read_summary(str(tmp_path / "day2"))
  assert summary["refresh"] == {"previous": str(tmp_path / "day1"), "reused": True, "reason": "same model"}


def test_unchanged_refresh_builds_no_model_and_starts_no_decode_process(bucket, tmp_path, monkeypatch):
  from transforms import fused
  built, real = [], fused.FusedModel

  def counted(*args, **kwargs):
    built.append(args)
    return real(*args, **kwargs)

  monkeypatch.setattr(fused, "FusedModel", counted)
  assert _run(bucket, tmp_path / "day1") == 0
  assert len(built) == 1
  assert _run(bucket, tmp_path / "day2", "--previous", str(tmp_path / "day1")) == 0
  assert len(built) == 1  # every file carried over: nothing to embed, no model built
  summary = read_summary(str(tmp_path / "day2"))
  assert summary["counts"]["carried_over"] == len(list(bucket.glob("*.jpg")))
  # nothing to decode either: the decode processes start at the first image to decode, so none did
  assert read_summary(str(tmp_path / "day1"))["decode_processes"]["started"] > 0
  assert summary["decode_processes"]["started"] == 0


def test_changed_new_and_removed_files(bucket, tmp_path):
  assert _run(bucket, tmp_path / "day1") == 0
  files = sorted(bucket.glob("*.jpg"))
  changed, removed = files[0], files[1]
  Image.open(changed).transpose(Image.FLIP_LEFT_RIGHT).save(changed, quality=90)
  removed.unlink()
  Image.open(files[2]).rotate(90, expand=True).save(bucket / "new.jpg", quality=90)
  shutil.copy(files[3], bucket / "copy of unchanged.jpg")  # new name, old bytes
  assert _run(bucket, tmp_path / "day2", "--previous", str(tmp_path / "day1")) == 0
  counts = read_summary(str(tmp_path / "day2"))["counts"]
  assert counts["removed"] == 1
  # the changed file, the new one, and the copy: a uri the previous run didn't have is embedded
  assert counts["embedded"] == 3
  assert counts["carried_over"] == len(files) - 2
  day2 = _rows(tmp_path / "day2")
  assert set(day2) == {str(p) for p in bucket.glob("*.jpg")}
  # A fresh full run over today's files gives the same rows: the refresh is complete on its own.
  assert _run(bucket, tmp_path / "full") == 0
  full = _rows(tmp_path / "full")
  assert full.keys() == day2.keys()
  for uri in full:
    assert full[uri][0] == day2[uri][0]
    np.testing.assert_allclose(day2[uri][1], full[uri][1], rtol=1e-5, atol=1e-6)


def test_a_different_model_re_embeds_everything_and_says_why(bucket, tmp_path):
  assert _run(bucket, tmp_path / "day1") == 0
  assert _run(bucket, tmp_path / "day2", "--previous", str(tmp_path / "day1"), "--pooling", "max") == 0
  summary = read_summary(str(tmp_path / "day2"))
  assert summary["counts"]["carried_over"] == 0
  assert summary["counts"]["embedded"] == len(list(bucket.glob("*.jpg")))
  assert summary["refresh"]["reused"] is False
  assert summary["refresh"]["reason"] == "pooling changed: 'avg' -> 'max'"


def test_missing_or_partial_previous_is_refused_or_ignored_with_the_flag(bucket, tmp_path, capsys):
  assert _run(bucket, tmp_path / "out", "--previous", str(tmp_path / "nothing")) == 2
  assert capsys.readouterr().err.strip().splitlines()[-1] == (
      f"embed-images: error: --previous {str(tmp_path / 'nothing')!r} has no readable _SUCCESS.json "
      "(missing or partial run): FileNotFoundError; pass --ignore-bad-previous to embed everything instead")
  partial = tmp_path / "partial"
  partial.mkdir()
  (partial / "embeddings-00000-of-00001.parquet").write_bytes(b"x")
  assert _run(bucket, tmp_path / "out", "--previous", str(partial)) == 2
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert "no readable _SUCCESS.json" in err and "--ignore-bad-previous" in err
  assert _run(bucket, tmp_path / "out", "--previous", str(partial), "--ignore-bad-previous") == 0
  summary = read_summary(str(tmp_path / "out"))
  assert summary["refresh"]["reused"] is False and summary["refresh"]["reason"].startswith("ignored")
  assert summary["counts"]["embedded"] == len(list(bucket.glob("*.jpg")))


def test_model_difference_names_what_changed():
  base = {"dim": 1280, "pooling": "avg", "normalize": "none", "resize": "squash", "fast_decode": False,
          "mixed_precision": False, "allow_tf32": False,
          "backbones": [{"name": "mobilenet_v2", "offset": 0, "dim": 1280, "input_size": 224,
                         "preprocessing": "tf", "weights_fingerprint": "sha256:aa", "weights": "weights_h5"}],
          "versions": {"keras": "3.0"}}
  same = json.loads(json.dumps(base))
  same["versions"] = {"keras": "3.1"}
  assert refresh.model_difference(base, same) is None
  other = json.loads(json.dumps(base))
  other["backbones"][0]["weights_fingerprint"] = "sha256:bb"
  assert refresh.model_difference(base, other) == "mobilenet_v2 weights_fingerprint changed: 'sha256:aa' -> 'sha256:bb'"


def _swap_bytes_keeping_the_listing(path, other):
  """`path` gets `other`'s bytes cut to its own size, with its size and mtime_ns as they were: only a
  read could tell."""
  stat = os.stat(path)
  path.write_bytes(other.read_bytes()[:stat.st_size].ljust(stat.st_size, b"\0"))
  os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_an_unchanged_listing_is_trusted_unread_and_previous_verify_reads_everything(bucket, tmp_path):
  assert _run(bucket, tmp_path / "day1") == 0
  files = sorted(bucket.glob("*.jpg"))
  day1 = _rows(tmp_path / "day1")
  # Rewritten behind the listing's back: same size, same mtime_ns, other bytes (a garbage JPEG).
  _swap_bytes_keeping_the_listing(files[0], files[1])
  assert _run(bucket, tmp_path / "day2", "--previous", str(tmp_path / "day1")) == 0
  counts = read_summary(str(tmp_path / "day2"))["counts"]
  assert (counts["embedded"], counts["carried_over"], counts["failed"]) == (0, len(files), 0)
  # The row is the previous one: the file was not read.
  assert _rows(tmp_path / "day2")[str(files[0])][0] == day1[str(files[0])][0]
  # --previous-verify reads and hashes every file: the swapped one is embedded (or fails) again.
  assert _run(bucket, tmp_path / "day3", "--previous", str(tmp_path / "day1"), "--previous-verify") in (0, 1)
  counts = read_summary(str(tmp_path / "day3"))["counts"]
  assert counts["carried_over"] == len(files) - 1
  assert counts["embedded"] + counts["failed"] == 1
  assert str(files[0]) not in _rows(tmp_path / "day3") or (
      _rows(tmp_path / "day3")[str(files[0])][0] != day1[str(files[0])][0])


def test_a_touched_file_is_read_again_and_carried_over(bucket, tmp_path):
  assert _run(bucket, tmp_path / "day1") == 0
  files = sorted(bucket.glob("*.jpg"))
  stat = os.stat(files[0])
  os.utime(files[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # `touch`: new listing, same bytes
  assert _run(bucket, tmp_path / "day2", "--previous", str(tmp_path / "day1")) == 0
  counts = read_summary(str(tmp_path / "day2"))["counts"]
  assert (counts["embedded"], counts["carried_over"]) == (0, len(files))
  table = pq.read_table(sorted((tmp_path / "day2").glob("embeddings-*.parquet")))
  listing = dict(zip(table.column("uri").to_pylist(), table.column("listing").to_pylist()))
  # The row records today's listing, so tomorrow trusts it without reading.
  assert listing[str(files[0])] == {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns + 10**9, "generation": None,
                                    "crc32c": None, "md5": None, "mtime": None}


def test_a_refresh_decides_the_same_in_one_process_and_across_worker_processes(bucket, tmp_path):
  # In one process the join by uri has 64 buckets, across processes 512 (reuse.join_buckets): the
  # same rows either way, for unchanged, touched and removed files.
  assert _run(bucket, tmp_path / "day1") == 0
  files = sorted(bucket.glob("*.jpg"))
  stat = os.stat(files[0])
  os.utime(files[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
  files[1].unlink()
  previous = ["--previous", str(tmp_path / "day1")]
  assert _run(bucket, tmp_path / "one", *previous) == 0
  assert _run(bucket, tmp_path / "many", *previous, "--direct_running_mode=multi_processing",
              "--direct_num_workers=2") == 0
  for out in ("one", "many"):
    counts = read_summary(str(tmp_path / out))["counts"]
    assert (counts["embedded"], counts["carried_over"], counts["removed"]) == (0, len(files) - 1, 1), out
  one, many = _rows(tmp_path / "one"), _rows(tmp_path / "many")
  assert sorted(one) == sorted(many) == sorted(str(f) for f in files[:1] + files[2:])
  for uri in one:
    assert one[uri][0] == many[uri][0]
    np.testing.assert_array_equal(one[uri][1], many[uri][1])


def _embedding_files(out):
  """{file name: bytes} of a run's embeddings files that hold rows."""
  return {p.name: p.read_bytes() for p in sorted(out.glob("embeddings-*.parquet"))
          if pq.ParquetFile(p).metadata.num_rows}


def _reading_back_counted(monkeypatch):
  """The rows the refresh reads back from committed files (reuse.reused_table's), as a list of counts."""
  from transforms import reuse
  read, real = [], reuse.reused_table

  def counted(taken, uses, extra_fields):
    read.append(len(uses))
    return real(taken, uses, extra_fields)

  monkeypatch.setattr(reuse, "reused_table", counted)
  return read


def test_an_unchanged_refresh_copies_the_previous_files_whole_and_reads_back_no_row(bucket, tmp_path, monkeypatch):
  read = _reading_back_counted(monkeypatch)
  assert _run(bucket, tmp_path / "day1") == 0
  assert _run(bucket, tmp_path / "day2", "--previous", str(tmp_path / "day1")) == 0
  assert _run(bucket, tmp_path / "day3", "--previous", str(tmp_path / "day2")) == 0
  assert read == []  # no committed row was read back: each file was copied as it is
  day1 = _embedding_files(tmp_path / "day1")
  assert len(day1) == 1
  # The same bytes, night after night, under the output's own numbering.
  assert sorted(_embedding_files(tmp_path / "day2").values()) == sorted(day1.values())
  assert sorted(_embedding_files(tmp_path / "day3").values()) == sorted(day1.values())
  n = len(list(bucket.glob("*.jpg")))
  summary = read_summary(str(tmp_path / "day3"))
  assert (summary["counts"]["embedded"], summary["counts"]["carried_over"]) == (0, n)
  assert sorted(summary["files"]) == sorted(p.name for p in (tmp_path / "day3").glob("*.parquet"))
  assert _rows(tmp_path / "day3").keys() == _rows(tmp_path / "day1").keys()


def test_a_previous_file_with_a_changed_row_is_read_back_and_the_unchanged_one_copied(bucket, tmp_path, monkeypatch):
  files = sorted(bucket.glob("*.jpg"))
  new = [bucket / "new 1.jpg", bucket / "new 2.jpg"]
  assert _run(bucket, tmp_path / "day1") == 0
  for i, path in enumerate(new):  # day 2 adds two images: their rows make a file of day 2's own
    Image.open(files[i]).rotate(90 * (i + 1), expand=True).save(path, quality=90)
  assert _run(bucket, tmp_path / "day2", "--previous", str(tmp_path / "day1")) == 0
  day1, day2 = _embedding_files(tmp_path / "day1"), _embedding_files(tmp_path / "day2")
  (whole,) = day1.values()
  assert whole in day2.values()
  (made,) = [data for data in day2.values() if data != whole]  # the two new rows
  read = _reading_back_counted(monkeypatch)
  Image.open(files[0]).transpose(Image.FLIP_LEFT_RIGHT).save(new[0], quality=90)  # day 3 changes one of them
  assert _run(bucket, tmp_path / "day3", "--previous", str(tmp_path / "day2")) == 0
  day3 = _embedding_files(tmp_path / "day3")
  assert whole in day3.values()  # day 1's file, copied again
  assert made not in day3.values()
  assert read == [1]  # of day 2's own file, only the unchanged new image's row was read back
  counts = read_summary(str(tmp_path / "day3"))["counts"]
  assert (counts["embedded"], counts["carried_over"]) == (1, len(files) + 1)
  # The rows are those of a full run over day 3's files.
  assert _run(bucket, tmp_path / "full") == 0
  full, day3_rows = _rows(tmp_path / "full"), _rows(tmp_path / "day3")
  assert full.keys() == day3_rows.keys()
  for uri in full:
    assert full[uri][0] == day3_rows[uri][0]
    np.testing.assert_allclose(day3_rows[uri][1], full[uri][1], rtol=1e-5, atol=1e-6)


def test_the_refresh_and_store_options_refuse_bad_values_in_one_line(bucket, tmp_path, capsys):
  for extra, line in ((("--previous-verify",), "--previous-verify goes with --previous; received: --previous-verify alone"),
                      (("--store-retry-seconds", "0"),
                       "--store-retry-seconds must be a positive number of seconds; received: 0.0")):
    assert _run(bucket, tmp_path / "out", *extra) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"embed-images: error: {line}"


def test_model_difference_takes_f32_rows_of_either_engine_but_not_reduced_precision_ones():
  base = {"dim": 1280, "pooling": "avg", "normalize": "none", "resize": "squash", "fast_decode": False,
          "mixed_precision": False, "allow_tf32": False,
          "backbones": [{"name": "mobilenet_v2", "offset": 0, "dim": 1280, "input_size": 224,
                         "preprocessing": "tf", "weights_fingerprint": "sha256:aa"}]}  # before engines: TF
  openvino = dict(base, engine="openvino")
  # f32: the engines agree within 1e-5 (tests/test_openvino.py), so rows carry over either way
  assert refresh.model_difference(base, openvino) is None
  assert refresh.model_difference(openvino, dict(base, engine="tensorflow")) is None
  # float16 on TensorFlow and bf16 on OpenVINO are different numbers
  mixed = dict(base, mixed_precision=True)
  assert refresh.model_difference(mixed, dict(openvino, mixed_precision=True)) == (
      "engine changed under mixed_precision: 'tensorflow' -> 'openvino'")
  assert refresh.model_difference(dict(openvino, mixed_precision=True), dict(openvino, mixed_precision=True)) is None


def test_model_difference_compares_the_engine_that_ran_not_the_one_asked_for():
  base = {"dim": 1280, "pooling": "avg", "normalize": "none", "resize": "squash", "fast_decode": False,
          "mixed_precision": True, "allow_tf32": False,
          "backbones": [{"name": "mobilenet_v2", "offset": 0, "dim": 1280, "input_size": 224,
                         "preprocessing": "tf", "weights_fingerprint": "sha256:aa"}]}
  # a local run records the engine it resolved (and what was asked): auto that ran on openvino is openvino
  asked_auto = dict(base, engine="openvino", engine_requested="auto")
  assert refresh.model_difference(dict(base, engine="openvino", engine_requested="openvino"), asked_auto) is None
  assert refresh.model_difference(dict(base, engine="tensorflow", engine_requested="tensorflow"),
                                  dict(base, engine="tensorflow", engine_requested="auto")) is None
  # a layout from before engine_requested recorded auto itself: what ran is unknown, so under mixed
  # precision its rows are not taken, and in f32 they are (the engines agree)
  old_auto = dict(base, engine="auto")
  assert refresh.model_difference(old_auto, asked_auto) == "engine changed under mixed_precision: 'auto' -> 'openvino'"
  assert refresh.model_difference(dict(old_auto, mixed_precision=False), dict(asked_auto, mixed_precision=False)) is None


def test_globs_that_only_match_images_build_no_shard_steps_and_refresh_the_same(bucket, tmp_path, monkeypatch):
  import pipeline.main
  built, real = [], pipeline.main.build_graph

  def recorded(p, *args, **kwargs):
    result = real(p, *args, **kwargs)
    built.append({t.unique_name for t in p.to_runner_api().components.transforms.values()})
    return result

  monkeypatch.setattr(pipeline.main, "build_graph", recorded)
  assert _run(bucket, tmp_path / "day1") == 0
  # `*.jpg` can only match images; `*` may match a shard (here it matches the same images).
  assert _run(bucket, tmp_path / "day2", "--previous", str(tmp_path / "day1")) == 0
  assert run(["--input", f"{bucket}/*", "--output", str(tmp_path / "any"), *ARGS,
              "--previous", str(tmp_path / "day1")]) == 0
  shard_steps = {"JoinMembers", "AttachMembers", "InShards", "SplitParquetShards", "WithUnreadShards"}
  assert not shard_steps & built[1]
  assert shard_steps <= built[2]
  n = len(list(bucket.glob("*.jpg")))
  for out in ("day2", "any"):
    counts = read_summary(str(tmp_path / out))["counts"]
    assert (counts["matched"], counts["embedded"], counts["carried_over"], counts["removed"]) == (n, 0, n, 0)
  two, any_ = _rows(tmp_path / "day2"), _rows(tmp_path / "any")
  assert two.keys() == any_.keys()
  for uri in two:
    assert two[uri][0] == any_[uri][0]
    np.testing.assert_array_equal(two[uri][1], any_[uri][1])


def test_a_run_ends_its_bundles_on_short_sampler_ticks_and_puts_beams_default_back(bucket, tmp_path, monkeypatch):
  """Beam's state sampler thread is joined at the end of every bundle; during a run its tick is
  capped at pipeline.main.SAMPLER_TICK_MS (not Beam's 200 ms), and Beam's default is back after."""
  import inspect

  import pipeline.main
  from apache_beam.runners.worker import statesampler
  periods, real_start = [], statesampler.StateSampler.start

  def start(self):
    periods.append(self.sampling_period_ms)
    return real_start(self)

  monkeypatch.setattr(statesampler.StateSampler, "start", start)
  assert _run(bucket, tmp_path / "day1") == 0
  assert _run(bucket, tmp_path / "day2", "--previous", str(tmp_path / "day1")) == 0
  assert len(periods) > 10
  assert set(periods) == {pipeline.main.SAMPLER_TICK_MS} != {statesampler.DEFAULT_SAMPLING_PERIOD_MS}
  default = inspect.signature(statesampler.StateSampler.__init__).parameters["sampling_period_ms"].default
  assert default == statesampler.DEFAULT_SAMPLING_PERIOD_MS == 200
