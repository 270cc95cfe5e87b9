"""Manifests (CSV, JSONL, Parquet) carry their columns to the output; --label-from-dir adds a label."""

import json
import pathlib
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import read_embeddings
from pipeline.main import run
from pipeline.launch import build_config
from pipeline.options import LaunchError
from apache_beam.options.pipeline_options import PipelineOptions
from transforms import manifest
from transforms.write import read_summary

SAMPLES = pathlib.Path(__file__).resolve().parent.parent / "samples"
ARGS = ["--backbones", "mobilenet_v2", "--weights", "random", "--image-size", "64", "--batch-size", "4"]


def _write_manifest(path, rows):
  if path.suffix == ".csv":
    keys = list(rows[0])
    path.write_text("\n".join([",".join(keys)] + [",".join(str(r[k]) for k in keys) for r in rows]) + "\n")
  elif path.suffix == ".jsonl":
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  else:
    pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_manifest_columns_ride_along_to_every_row(tmp_path, suffix):
  photos = sorted(SAMPLES.glob("*.jpg"))[:4]
  rows = [{"uri": str(p), "id": i, "split": "train" if i % 2 else "test"} for i, p in enumerate(photos)]
  rows.append({"uri": str(tmp_path / "missing.jpg"), "id": 99, "split": "test"})
  path = tmp_path / f"manifest{suffix}"
  _write_manifest(path, rows)
  out = tmp_path / "out"
  assert run(["--input-manifest", str(path), "--output", str(out), *ARGS, "--max-failure-fraction", "0.5"]) == 0
  emb = read_embeddings(str(out))
  got = {u: (i, s) for u, i, s in zip(emb.uris, emb.column("id"), emb.column("split"))}
  assert got == {r["uri"]: (r["id"], r["split"]) for r in rows[:4]}
  assert emb.table.schema.field("id").type == pa.int64()
  summary = read_summary(str(out))
  assert summary["counts"]["matched"] == 5 and summary["counts"]["failed_by_stage"] == {"read": 1}


def test_manifest_without_uri_column_is_a_launch_error(tmp_path):
  path = tmp_path / "m.csv"
  path.write_text("path,label\na.jpg,cat\n")
  with pytest.raises(LaunchError, match=r"--input-manifest .* needs a 'uri' column; found columns: \['path', 'label'\]"):
    build_config(PipelineOptions(["--input-manifest", str(path), "--output", str(tmp_path / "o"),
                                  "--weights", "random"]))
  with pytest.raises(ValueError) as error:
    manifest.manifest_format("list.txt")
  assert str(error.value) == ("`manifest` must end in .csv, .jsonl, .ndjson, .json, .parquet, .pq; "
                              "received: 'list.txt'")


def test_label_from_dir(tmp_path):
  photos = sorted(SAMPLES.glob("*.jpg"))
  for i, p in enumerate(photos):
    folder = tmp_path / "data" / ("cats" if i % 2 else "dogs")
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(p, folder / p.name)
  out = tmp_path / "out"
  assert run(["--input", f"{tmp_path}/data/*/*.jpg", "--output", str(out), "--label-from-dir", *ARGS]) == 0
  emb = read_embeddings(str(out))
  assert {pathlib.Path(u).parent.name for u in emb.uris} == {"cats", "dogs"}
  assert all(label == pathlib.Path(u).parent.name for u, label in zip(emb.uris, emb.column("label")))
