"""Our real pipeline as Dataflow would receive it (DataflowRunner --dry_run), with gs:// served by the GCS emulator.

The launch checks (an --input that matches nothing, an --output that holds a previous run)
really run against gs://; the job graph is read from the proto the runner built and compared
with the one the local runner gets for the same options.
"""

import argparse
import datetime
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import tarfile
import tempfile

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
import pytest
from apache_beam.internal import pickler
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.portability import common_urns
from apache_beam.portability.api import beam_runner_api_pb2
from apache_beam.runners.dataflow.dataflow_runner import DataflowRunner

from pipeline.graph import build_graph
from pipeline.main import run
from pipeline.launch import build_config
from pipeline.options import EmbedOptions
from tests.dataflow_dry_run import resource_hints_by_transform
from tests.gcs_emulator import gcs_bucket  # noqa: F401  (pytest fixture)
from transforms.write import embeddings_schema, rows_to_table, summarize, write_summary

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "dataflow"))
import latest_run  # noqa: E402  (dataflow/ is scripts, not a package)

ACCELERATOR = "type:nvidia-l4;count:1;install-nvidia-driver"
ACCELERATOR_URN = "beam:resources:accelerator:v1"
MIN_RAM_URN = "beam:resources:min_ram_bytes:v1"
HINTS = {ACCELERATOR_URN: ACCELERATOR.encode(), MIN_RAM_URN: str(16 * 2**30).encode()}  # 16GiB: binary
EMBED_LEAF = "ReadDecodeEmbed/EmbedImages/ReadDecodeEmbed/ParDo(_EmbedDoFn)"
# Shards open into images, EmbedImages embeds, the rows are committed: one fused stage on GPU workers.
EMBED_LEAVES = {"ReadDecodeEmbed/ExpandShards/ParDo(ExpandShards)", EMBED_LEAF,
                "ReadDecodeEmbed/CommitRows/ParDo(CommitRows)"}


def dataflow_args(bucket):
  return ["--runner", "DataflowRunner", "--dry_run=True", "--project", "my-project-123",
          "--region", "us-central1", "--temp_location", f"{bucket}/tmp", "--job_name", "embed-test"]


def embed_args(bucket, output="out"):
  return ["--input", f"{bucket}/photos/**", "--output", f"{bucket}/{output}",
          "--accelerator", ACCELERATOR, "--embed-min-ram", "16GiB",
          "--weights", "random", "--backbones", "mobilenet_v2"]


@pytest.fixture
def photos(gcs_bucket):
  for path in sorted((REPO / "samples").glob("*.jpg"))[:2]:
    with FileSystems.create(f"{gcs_bucket}/photos/{path.name}") as f:
      f.write(path.read_bytes())
  return gcs_bucket


@pytest.fixture
def launched(monkeypatch, tmp_path):
  """Runs offline: no connection leaves the machine. Yields the DataflowRunners that were
  asked to run a pipeline; staged artifacts go under tmp_path, not /tmp."""
  real_connect = socket.socket.connect

  def loopback_only(sock, address):
    if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in (
        "127.0.0.1", "::1", "localhost"):
      raise AssertionError(f"connected to {address!r}")
    return real_connect(sock, address)

  monkeypatch.setattr(socket.socket, "connect", loopback_only)
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  runners = []
  real_run = DataflowRunner.run_pipeline

  def capture(self, pipeline, options, pipeline_proto=None):
    runners.append(self)
    return real_run(self, pipeline, options, pipeline_proto)

  monkeypatch.setattr(DataflowRunner, "run_pipeline", capture)
  return runners


def _is_pass_through(transform):
  # A composite that expanded to nothing (Create's MaybeReshuffle for one element):
  # its output is its input. Dataflow's pre-optimisation drops these; no stage runs them.
  return set(transform.outputs.values()) <= set(transform.inputs.values())


def leaves(proto):
  """unique_name -> resource hints, for every transform that does work (no subtransforms)."""
  hints = resource_hints_by_transform(proto)
  return {t.unique_name: hints[t.unique_name] for t in proto.components.transforms.values()
          if not t.subtransforms and not _is_pass_through(t)}


def local_proto(args):
  options = PipelineOptions(args)
  p = beam.Pipeline(options=options)
  build_graph(p, build_config(options))
  return p.to_runner_api()


def test_dataflow_graph_has_the_gpu_hint_on_read_decode_embed_alone(photos, launched, capsys):
  bucket = photos
  assert run([*dataflow_args(bucket), *embed_args(bucket)]) == 0
  # A dry run builds the job and submits nothing, and says so.
  assert capsys.readouterr().err.splitlines()[-1] == (
      "embed-images: dry run: launch checks passed; nothing was run, written or deleted")
  [runner] = launched
  proto = runner.proto_pipeline
  by_name = {t.unique_name: t for t in proto.components.transforms.values()}

  hinted = {name: hints for name, hints in resource_hints_by_transform(proto).items() if hints}
  assert hinted == {"ReadDecodeEmbed": HINTS, "ReadDecodeEmbed/EmbedImages": HINTS,
                    "ReadDecodeEmbed/EmbedImages/ReadDecodeEmbed": HINTS, "ReadDecodeEmbed/ExpandShards": HINTS,
                    "ReadDecodeEmbed/CommitRows": HINTS, **{leaf: HINTS for leaf in EMBED_LEAVES}}
  dataflow = leaves(proto)
  assert {n for n, h in dataflow.items() if h} == EMBED_LEAVES
  for name in ("MatchInputs/List/Match", "Reshuffle/ReshufflePerKey/GroupByKey",
               "WriteEmbeddings/WriteImpl/WriteBundles", "WriteErrors/WriteImpl/WriteBundles",
               "WriteSummary", "CountMatched/ParDo(_CountMatched)", "Tally/KeyWithVoid"):
    assert dataflow[name] == {}, name
  # The hinted environment is the default one plus hints; it runs the same SDK image.
  environments = proto.components.environments
  assert sorted((dict(e.resource_hints) for e in environments.values()), key=len) == [{}, HINTS]
  images = {beam_runner_api_pb2.DockerPayload.FromString(e.payload).container_image
            for e in environments.values()}
  assert len(images) == 1

  # The same options on the local runner give the same work, hinted in the same place; in one
  # process less the shuffle that spreads the inputs over workers (launch.in_one_process).
  local = leaves(local_proto(embed_args(bucket, output="elsewhere")))
  shuffle = {name for name in dataflow if name.startswith("Reshuffle/")}
  assert shuffle and {name: h for name, h in dataflow.items() if name not in shuffle} == local
  assert dataflow == leaves(local_proto([*embed_args(bucket, output="elsewhere"), "--direct_num_workers", "2"]))
  assert len(dataflow) > 50  # the whole job, not one branch of it

  # Workers get the validated configuration inside the pickled DoFn, whatever Beam's
  # options round trip does to hyphenated flags.
  payload = beam_runner_api_pb2.ParDoPayload.FromString(by_name[EMBED_LEAF].spec.payload)
  assert by_name[EMBED_LEAF].spec.urn == common_urns.primitives.PAR_DO.urn
  model = pickler.loads(payload.do_fn.payload)[0]._model_spec
  assert [b.name for b in model.backbones] == ["mobilenet_v2"]
  commit = by_name["ReadDecodeEmbed/CommitRows/ParDo(CommitRows)"]
  assert pickler.loads(beam_runner_api_pb2.ParDoPayload.FromString(commit.spec.payload).do_fn.payload)[0]._output == (
      f"{bucket}/out")


def test_local_graph_differs_only_by_pass_through_composites(photos):
  # What `leaves` leaves out must be nothing but Create's identity step, or the
  # comparison above would hide real differences.
  proto = local_proto(embed_args(photos))
  skipped = {t.unique_name for t in proto.components.transforms.values()
             if not t.subtransforms and _is_pass_through(t)}
  assert skipped and all(name.endswith("/MaybeReshuffle") for name in skipped)


def test_setup_file_builds_an_sdist_of_this_package(photos, launched, monkeypatch):
  monkeypatch.chdir(REPO)
  bucket = photos
  assert run([*dataflow_args(bucket), *embed_args(bucket), "--setup_file", "./setup.py"]) == 0
  [runner] = launched
  staged = {}
  for env in runner.proto_pipeline.components.environments.values():
    for dependency in env.dependencies:
      name = beam_runner_api_pb2.ArtifactStagingToRolePayload.FromString(dependency.role_payload).staged_name
      staged[name] = beam_runner_api_pb2.ArtifactFilePayload.FromString(dependency.type_payload).path
  assert "workflow.tar.gz" in staged
  with tarfile.open(staged["workflow.tar.gz"]) as sdist:
    members = {m.name.split("/", 1)[1] for m in sdist.getmembers() if "/" in m.name}
  assert {"setup.py", "PKG-INFO", "pipeline/graph.py", "pipeline/main.py", "transforms/embed.py",
          "transforms/read.py", "transforms/weights.py"} <= members


def _one_line_error(capsys):
  err = capsys.readouterr().err.strip()
  assert err.startswith("embed-images: error: ") and "\n" not in err, err
  return err


def _write(path, data=b"x"):
  with FileSystems.create(path) as f:
    f.write(data)


def test_gcs_output_holding_a_previous_run_is_refused_at_launch(photos, launched, capsys):
  bucket = photos
  previous = [f"{bucket}/out/_SUCCESS.json", f"{bucket}/out/embeddings-00000-of-00001.parquet"]
  for path in previous:
    _write(path)
  assert run([*dataflow_args(bucket), *embed_args(bucket)]) == 2
  err = _one_line_error(capsys)
  assert f"--output '{bucket}/out' already holds a previous run (2 files" in err and "--overwrite" in err
  assert not launched  # refused before any job was built
  assert all(FileSystems.exists(p) for p in previous)

  # In a dry run, --overwrite only says what it would delete (the previous run's files, not
  # others); the job is built, and nothing is deleted.
  _write(f"{bucket}/out/notes.txt")
  assert run([*dataflow_args(bucket), *embed_args(bucket), "--overwrite"]) == 0
  assert len(launched) == 1
  err = capsys.readouterr().err
  assert [l for l in err.splitlines() if "would delete" in l] == [
      f"embed-images: dry run: --overwrite would delete {p}" for p in previous]
  assert all(FileSystems.exists(p) for p in previous)
  assert FileSystems.exists(f"{bucket}/out/notes.txt")


@pytest.mark.parametrize("pattern", ["photos/none/**", "photos/*.png", "elsewhere/**/*.jpg"])
def test_gcs_input_matching_nothing_is_refused_at_launch(photos, launched, capsys, pattern):
  bucket = photos
  args = [*dataflow_args(bucket), *embed_args(bucket)]
  args[args.index(f"{bucket}/photos/**")] = f"{bucket}/{pattern}"
  assert run(args) == 2
  assert _one_line_error(capsys) == f"embed-images: error: --input '{bucket}/{pattern}' matched no file"
  assert not launched


# ---------------------------------------------------------------- --previous, the nightly job, the template

def write_finished_run(directory, args):
  """A run's files as the pipeline leaves them, written directly: one row, its layout, _SUCCESS.json."""
  config = build_config(PipelineOptions(args), check_files=False)
  table = rows_to_table([directory + "/x.jpg"], ["0" * 64], [1], [1], np.zeros((1, config.dim), np.float32))
  table = table.replace_schema_metadata(embeddings_schema(config.dim, config.layout).metadata)
  path = f"{directory}/embeddings-00000-of-00001.parquet"
  with FileSystems.create(path) as f:
    pq.write_table(table, f)
  write_summary(directory, summarize(1, 1, [], [path], layout=config.layout, inputs=config.inputs,
                                     output=config.output, started_at=config.started_at,
                                     max_failure_fraction=config.max_failure_fraction))


def test_dataflow_graph_with_previous_keeps_the_hint_on_read_decode_embed_alone(photos, launched):
  bucket = photos
  write_finished_run(f"{bucket}/runs/2026-11-20", embed_args(bucket))
  extra = ["--previous", f"{bucket}/runs/2026-11-20"]
  assert run([*dataflow_args(bucket), *embed_args(bucket), *extra]) == 0
  dataflow = leaves(launched[0].proto_pipeline)
  # The previous run's rows really are reused (same model), so the refresh branch is in the graph.
  assert any(name.startswith("PreviousIndex/") for name in dataflow)
  assert any(name.startswith("FetchRows/") for name in dataflow)
  assert {n for n, h in dataflow.items() if h} == EMBED_LEAVES
  spread = ("--direct_num_workers", "2")  # workers to spread over, as on Dataflow: the same graph
  assert dataflow == leaves(local_proto([*embed_args(bucket, output="elsewhere"), *extra, *spread]))


def test_latest_finished_run_is_the_latest_dated_one_before_the_day(photos):
  root = f"{photos}/emb"
  args = embed_args(photos)
  for day in ("2026-11-19", "2026-11-20", "2026-11-25", "latest", "2026-02-30"):
    write_finished_run(f"{root}/{day}", args)
  _write(f"{root}/2026-11-21/errors-00000-of-00001.parquet")  # a run that never finished
  assert latest_run.latest_before(root, datetime.date(2026, 11, 22)) == f"{root}/2026-11-20"
  assert latest_run.latest_before(root, datetime.date(2026, 11, 20)) == f"{root}/2026-11-19"
  assert latest_run.latest_before(root, datetime.date(2026, 11, 19)) is None
  assert latest_run.main([root, "2026-11-25"]) == latest_run.ALREADY_FINISHED
  assert latest_run.main([root, "2026-11-21"]) == 0


def _nightly(env, tmp_path):
  return subprocess.run(["bash", str(REPO / "dataflow" / "nightly.sh")], capture_output=True, text=True,
                        env={**os.environ, "TMPDIR": str(tmp_path), "PYTHON": sys.executable, **env},
                        timeout=300)


def test_nightly_launches_into_todays_directory_with_the_latest_finished_run(photos, tmp_path):
  bucket = photos
  root = f"{bucket}/emb"
  for day in ("2026-11-19", "2026-11-20", "2026-11-25"):
    write_finished_run(f"{root}/{day}", embed_args(bucket))
  stale = f"{root}/2026-11-22/errors-00000-of-00001.parquet"  # an earlier attempt that died
  _write(stale)
  env = {"ROOT": root + "/", "INPUT": f"{bucket}/photos/**", "PROJECT": "my-project-123",
         "REGION": "us-central1", "BACKBONES": "mobilenet_v2", "WEIGHTS": "random",
         "IMAGE": "us-central1-docker.pkg.dev/my-project-123/embed/embed-images:0.1.0",
         "TODAY": "2026-11-22", "DRY_RUN": "1"}
  result = _nightly(env, tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  log = result.stderr
  assert f"reusing unchanged rows of {root}/2026-11-20" in log
  [command] = [line for line in log.splitlines() if "nightly: running: " in line]
  for part in (f"--output {root}/2026-11-22 ", f"--previous {root}/2026-11-20 ", "--resume --overwrite",
               f"--temp_location {root}/_tmp ", "--sdk_container_image us-central1-docker.pkg.dev/",
               "--experiments=no_use_multiple_sdk_containers", "--job_name embed-images-2026-11-22"):
    assert part in command + " ", part
  assert "re-embedding everything" not in log  # same model: the previous rows are reused
  assert "embed-images: dry run: launch checks passed; nothing was run, written or deleted" in log
  # DRY_RUN=1 deletes nothing: the dead attempt's files stay, and the log says they would go.
  assert f"embed-images: dry run: --overwrite would delete {stale}" in log
  assert FileSystems.exists(stale)

  # A day that finished already is left alone (latest_run.py's answer, tested above, stubbed
  # here: importing Beam again would cost seconds).
  stub = tmp_path / "python"
  stub.write_text("#!/bin/sh\nexit 3\n")
  stub.chmod(0o755)
  result = _nightly({**env, "TODAY": "2026-11-20", "PYTHON": str(stub)}, tmp_path)
  assert result.returncode == 0 and "already holds a finished run" in result.stderr
  assert "running:" not in result.stderr


def _option_kinds():
  parser = argparse.ArgumentParser()
  EmbedOptions._add_argparse_args(parser)
  return {action.dest: action for action in parser._actions if action.dest != "help"}


SAMPLE_VALUES = {
    "input": "gs://b/photos/**", "input_manifest": "gs://b/manifest.csv", "output": "gs://b/emb/2026-11-22",
    "previous": "gs://b/emb/2026-11-21", "backbones": "my_net:block_12_add,my_sm,resnet50:conv4_block6_out",
    "model": "my_net=gs://b/models/my_net.keras;my_sm=gs://b/models/my_sm", "model_preprocessing": "my_net=tf;my_sm=none",
    "model_output": "my_sm=output_0", "model_unsafe": "my_net", "model_modules": "my_pkg.layers,my_pkg.losses",
    "weights": "gs://b/w",
    "pooling": "max", "image_size": "299", "batch_size": "64", "resize": "center-crop", "normalize": "l2",
    "max_pixels": "0", "decode_timeout": "12.5", "decode_memory": "3GiB", "max_failure_fraction": "0.01", "read_threads": "32",
    "decode_threads": "0", "accelerator": "type:nvidia-l4;count:1;machine_type:g2-standard-8;install-nvidia-driver",
    "embed_min_ram": "24GiB", "num_shards": "0", "row_group_size": "4096",
    "overwrite": "true", "allow_tf32": "true", "mixed_precision": "true", "fast_decode": "true",
    "dedupe": "true", "label_from_dir": "true", "ignore_bad_previous": "true",
    "resume": "true", "resume_verify": "true", "checkpoint_every": "12.5", "previous_verify": "true",
    "store_retry_seconds": "90",
    "input_format": "tar", "image_column": "jpg", "image_feature": "image/encoded",
    "carry_features": "image/class/label,image/filename",
    "parquet_part_rows": "2048", "engine": "auto",
}


def test_flex_template_parameters_are_options_passed_as_name_equals_value():
  metadata = json.loads((REPO / "dataflow" / "metadata.json").read_text())
  parameters = {p["name"]: p for p in metadata["parameters"]}
  kinds = _option_kinds()
  assert set(parameters) == set(SAMPLE_VALUES)
  for name, parameter in parameters.items():
    value = SAMPLE_VALUES[name]
    assert all(re.match(r, value) for r in parameter.get("regexes", [])), name
    # The Flex Template launcher passes each parameter as --name=value.
    parsed = getattr(PipelineOptions([f"--{name}={value}"]).view_as(EmbedOptions), name)
    if isinstance(parsed, bool):
      assert parsed == (value == "true"), name
    else:
      assert (parsed == [value]) if name == "input" else (str(parsed) == value or parsed == float(value)), name
  assert [n for n, p in parameters.items() if not p["isOptional"]] == ["output"]
  # Every option is a parameter, but the local progress bar; on/off flags accept
  # --flag=true|false, the launcher's form.
  valued = {dest for dest, action in kinds.items() if action.nargs != 0}
  assert valued - set(parameters) == {"progress"}


# The launch line of README.md's "Dataflow" section, with its bucket served by the emulator and
# --weights random in place of the gs:// weights directory (which would need Keras's files).
README_LAUNCH = """
  --runner DataflowRunner --project my-project --region us-central1
  --temp_location gs://my-bucket/tmp --job_name embed-photos
  --sdk_container_image us-central1-docker.pkg.dev/my-project/embed/embed-images:0.1.0
  --input gs://my-bucket/photos/** --output gs://my-bucket/embeddings/2026-11-23
  --backbones vgg16,inception_v3,resnet50 --weights random
  --accelerator type:nvidia-l4;count:1;machine_type:g2-standard-8;install-nvidia-driver
  --embed-min-ram 16GB --batch-size 64
  --machine_type n2-standard-4 --max_num_workers 20
  --experiments=no_use_multiple_sdk_containers
"""


def test_readme_launch_line_builds_the_job(photos, launched):
  args = [a.replace("gs://my-bucket", photos) for a in README_LAUNCH.split()]
  assert run([*args, "--dry_run=True"]) == 0
  proto = launched[0].proto_pipeline
  images = {beam_runner_api_pb2.DockerPayload.FromString(e.payload).container_image
            for e in proto.components.environments.values()}
  assert images == {"us-central1-docker.pkg.dev/my-project/embed/embed-images:0.1.0"}
  hinted = {n: h for n, h in leaves(proto).items() if h}
  assert hinted == {leaf: {
      ACCELERATOR_URN: b"type:nvidia-l4;count:1;machine_type:g2-standard-8;install-nvidia-driver",
      MIN_RAM_URN: b"16000000000"} for leaf in EMBED_LEAVES}
  options = launched[0].job.options.get_all_options()
  assert "no_use_multiple_sdk_containers" in options["experiments"]
  assert (options["machine_type"], options["max_num_workers"]) == ("n2-standard-4", 20)
