"""Shard runs as they are deployed: several SDK worker processes, and gs:// on the GCS emulator.

tests/test_shards.py reads the same shard set in one process from local disk. Here the same
dataset (loose files, WebDataset tars, Parquet, TFRecords, broken members, truncated shards) goes
through the two paths that it does not take: shard items crossing into worker processes (layouts
and configuration pickled, shards opened there), and shards streamed from gs:// by Beam's GCS
filesystem inside those workers, as Dataflow's workers read their own shards (a tar through
`tarfile`'s stream mode, Parquet's seeks, a gzip TFRecord). Both runs use two SDK worker processes
and read the Parquet shard in slices of its row groups; the gs:// run deduplicates too.
"""

import pathlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystems import FileSystems

from pipeline.main import run
from tests.gcs_emulator import gcs_emulator
from tests.recipe import relative_l2
from tests.test_shards import (NAMES, SMALL_MODEL, assert_accounted_for, assert_shard_images_embed_as_their_files,
                                dataset, embed, jpeg, vectors)  # noqa: F401 (dataset: a fixture)
from transforms.write import read_summary

MULTI_PROCESS = ("--direct_num_workers", "2", "--direct_running_mode", "multi_processing")


def _inputs(root):
  return [f"{root}/loose/*.jpg", f"{root}/web/*.tar", f"{root}/pq/*.parquet", f"{root}/tf/*"]


# --- several worker processes, local shards -----------------------------------------------------

@pytest.fixture(scope="module")
def multi_process_run(dataset, tmp_path_factory):
  root, _ = dataset
  # Parquet shards in slices of their row groups (the dataset's has three of four rows each).
  return embed(_inputs(root), tmp_path_factory.mktemp("multi") / "out", *MULTI_PROCESS, "--parquet-part-rows", "2")


def test_multi_process_run_accounts_for_every_image_once(dataset, multi_process_run):
  _, expected = dataset
  assert_accounted_for(expected, *multi_process_run)


def test_multi_process_run_embeds_shard_images_as_their_files(dataset, multi_process_run):
  root, expected = dataset
  compared = assert_shard_images_embed_as_their_files(
      expected, multi_process_run[0], lambda name: str(root / "loose" / f"{name}.jpg"))
  # every sample in the whole tar, Parquet and TFRecord shards, two from each cut shard
  assert compared == 3 * len(NAMES) + 4


# --- gs:// on the GCS emulator ------------------------------------------------------------------

def _put(uri, data):
  with FileSystems.create(uri, compression_type="uncompressed") as f:
    f.write(data)


def _read_tables(output, prefix):
  files = sorted(m.path for m in FileSystems.match([f"{output}/{prefix}-*.parquet"])[0].metadata_list)
  assert files, f"no {prefix}-*.parquet in {output}"
  tables = []
  for path in files:
    with FileSystems.open(path, compression_type="uncompressed") as f:
      tables.append(pq.read_table(pa.BufferReader(f.read())))
  return pa.concat_tables(tables, promote_options="default")


@pytest.fixture(scope="module")
def gcs_run(dataset):
  """The dataset's files flattened into gs://B/shards/ (one glob matches loose files and shards
  alike), plus a Hugging Face style Parquet shard whose rows hold bytes, a relative path to one of
  the loose objects, or a path to nothing. Output to gs:// too, two worker processes (they reach the
  emulator through the environment). Yields (bucket, expected, (embeddings, errors, summary))."""
  root, local_expected = dataset
  with gcs_emulator("shards-bucket") as name:
    bucket = f"gs://{name}"
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
      _put(f"{bucket}/shards/{path.name}", path.read_bytes())

    def moved(uri):
      path, sep, key = uri.partition("#")
      return f"{bucket}/shards/{pathlib.PurePath(path).name}{sep}{key}"
    expected = {moved(uri): want for uri, want in local_expected.items()}

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    hf = pa.table({"image": pa.array([{"bytes": jpeg(NAMES[0]), "path": None},
                                      {"bytes": None, "path": f"{NAMES[1]}.jpg"},
                                      {"bytes": None, "path": "gone.jpg"}], type=image),
                   "label": pa.array([3, 1, 4], pa.int64())})
    sink = pa.BufferOutputStream()
    pq.write_table(hf, sink)
    shard = f"{bucket}/shards/hf-00000-of-00001.parquet"
    _put(shard, sink.getvalue().to_pybytes())
    expected.update({f"{shard}#0": ("ok", NAMES[0]), f"{shard}#1": ("ok", NAMES[1]),
                     f"{shard}#2": ("error", "read")})

    output = f"{bucket}/out"
    # --dedupe: every shard is read once more, on gs://, to hash its images with the files.
    status = run(["--input", f"{bucket}/shards/*", "--output", output, *SMALL_MODEL, *MULTI_PROCESS, "--dedupe",
                  "--parquet-part-rows", "2"])
    assert status == 0
    yield bucket, expected, (_read_tables(output, "embeddings"), _read_tables(output, "errors"),
                             read_summary(output))


def test_gcs_run_accounts_for_every_image_once(gcs_run):
  _, expected, outputs = gcs_run
  assert_accounted_for(expected, *outputs)


def test_gcs_run_embeds_shard_images_as_their_files(gcs_run):
  bucket, expected, outputs = gcs_run
  compared = assert_shard_images_embed_as_their_files(
      expected, outputs[0], lambda name: f"{bucket}/shards/{name}.jpg")
  assert compared == 3 * len(NAMES) + 4 + 2  # and the Hugging Face shard's bytes row and path row


def test_gcs_run_names_the_damage_in_truncated_shards(gcs_run):
  bucket, _, (_, errors, _) = gcs_run
  messages = {row["uri"]: row["message"] for row in errors.to_pylist()}
  for shard in ("00001.tar", "cut.tfrecord"):
    assert "at byte" in messages[f"{bucket}/shards/{shard}"], messages[f"{bucket}/shards/{shard}"]


def test_gcs_and_multi_process_runs_give_the_same_vectors(dataset, gcs_run, multi_process_run):
  root, _ = dataset
  bucket, _, outputs = gcs_run
  on_gcs, local = vectors(outputs[0]), vectors(multi_process_run[0])
  for uri, vector in local.items():
    path, sep, key = uri.partition("#")
    assert relative_l2(on_gcs[f"{bucket}/shards/{pathlib.PurePath(path).name}{sep}{key}"], vector) < 1e-4, uri


def test_gcs_run_deduplicates_shard_images_and_files_alike(gcs_run):
  _, expected, (embeddings, errors, summary) = gcs_run
  copies = {}
  for uri, want in expected.items():
    if want[0] == "ok":
      copies.setdefault(want[1], []).append(uri)
  garbage = [uri for uri, want in expected.items() if want[:2] == ("error", "decode")]  # the same bytes, thrice
  assert len(garbage) == 3
  assert summary["counts"]["deduplicated"] == sum(len(uris) - 1 for uris in copies.values()) + len(garbage) - 1
  got = vectors(embeddings)
  for uris in copies.values():
    assert all((got[uri] == got[uris[0]]).all() for uri in uris), uris  # one row, copied bit for bit
  assert set(garbage) <= set(errors.column("uri").to_pylist())
