"""Launch: the whole command line checked at once, dry runs that change nothing, outputs cleared only for a real run."""

import contextlib
import io
import pathlib

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline import launch
from pipeline.main import run
from pipeline.options import LaunchError

SAMPLES = pathlib.Path(__file__).parent.parent / "samples"


@pytest.mark.parametrize("argv,message", [
    (["--batch_sise", "64"], "unknown option --batch_sise; did you mean --batch-size?"),
    (["--imagesize", "96"], "unknown option --imagesize; did you mean --image-size?"),
    (["--direct_num_worker=2"], "unknown option --direct_num_worker; did you mean --direct_num_workers?"),
    (["--batch-size", "abc"], "--batch-size must be an integer; received: 'abc'"),
    (["--batch_size", "abc"], "--batch-size must be an integer; received: 'abc'"),  # as --help spells it
    (["--decode-timeout", "soon"], "--decode-timeout must be a number; received: 'soon'"),
    (["--overwrite=maybe"], "--overwrite: expected true or false; received: 'maybe'"),
    (["stray"], "unexpected argument 'stray': every value must follow its option (--name value)"),
    (["--runner", "NoSuchRunner"], "--runner"),
])
def test_a_bad_command_line_is_one_line_naming_the_option(argv, message):
  with pytest.raises(LaunchError) as info:
    launch.check_arguments(["--input", "x", "--output", "y", *argv])
  text = str(info.value)
  assert "\n" not in text
  if argv[0] == "--runner":
    assert text.startswith("--runner: ") and "'NoSuchRunner'" in text
  else:
    assert text == message


def test_ours_and_beams_options_are_known():
  launch.check_arguments([
      "--input", "a", "--input", "b", "--output", "o", "--batch-size", "8", "--batch_size", "8",
      "--fast-decode", "--overwrite=true", "--direct_num_workers", "2", "--direct_running_mode",
      "multi_processing", "--experiments=no_use_multiple_sdk_containers", "--dry_run=True",
      "--decode-memory", "1GiB", "--runner", "DataflowRunner", "--project", "p", "--region", "r",
      "--temp_location", "gs://b/t", "--machine_type", "n2-standard-4"])


@pytest.mark.parametrize("value,want", [("True", True), ("true", True), ("1", True), ("False", False),
                                        ("false", False), ("0", False), (None, False)])
def test_dry_run_is_a_boolean(value, want):
  options = PipelineOptions([] if value is None else [f"--dry_run={value}"])
  assert launch.dry_run(options) is want
  assert options.get_all_options()["dry_run"] is want  # what Dataflow's runner then reads


def _run(*argv):
  stderr = io.StringIO()
  with contextlib.redirect_stderr(stderr):
    status = run(list(argv))
  return status, stderr.getvalue()


def test_a_local_dry_run_with_overwrite_deletes_and_writes_nothing(tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  previous = {"_SUCCESS.json": b"{}", "embeddings-00000-of-00001.parquet": b"old rows",
              "errors-00000-of-00001.parquet": b"old errors", "notes.txt": b"mine"}
  for name, data in previous.items():
    (out / name).write_bytes(data)
  status, stderr = _run("--input", f"{SAMPLES}/*.jpg", "--output", str(out), "--backbones", "mobilenet_v2",
                        "--weights", "random", "--image-size", "32", "--overwrite", "--dry_run=True")
  assert status == 0
  assert {p.name: p.read_bytes() for p in out.iterdir()} == previous
  lines = [l for l in stderr.splitlines() if l.startswith("embed-images:")]
  assert lines == [f"embed-images: dry run: --overwrite would delete {out / name}" for name in
                   ("_SUCCESS.json", "embeddings-00000-of-00001.parquet", "errors-00000-of-00001.parquet")] + [
                       "embed-images: dry run: launch checks passed; nothing was run, written or deleted"]
  # --dry_run=False is a real run: the previous files are replaced.
  status, _ = _run("--input", f"{SAMPLES}/rocket.jpg", "--output", str(out), "--backbones", "mobilenet_v2",
                   "--weights", "random", "--image-size", "32", "--overwrite", "--dry_run=False")
  assert status == 0
  assert (out / "notes.txt").read_bytes() == b"mine"
  assert (out / "embeddings-00000-of-00001.parquet").read_bytes() != previous["embeddings-00000-of-00001.parquet"]


def test_a_dry_run_still_runs_the_launch_checks(tmp_path):
  status, stderr = _run("--input", f"{tmp_path}/*.jpg", "--output", str(tmp_path / "o"), "--weights", "random",
                        "--dry_run=True")
  assert status == 2 and stderr.strip().endswith("matched no file")
  assert not (tmp_path / "o").exists()


def test_output_with_a_previous_run_is_refused_unless_overwrite(tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "embeddings-00000-of-00001.parquet").write_bytes(b"old")
  (out / "_SUCCESS.json").write_text("{}")
  (out / "notes.txt").write_text("mine")
  found = launch.existing_outputs(str(out))
  assert found == [str(out / "_SUCCESS.json"), str(out / "embeddings-00000-of-00001.parquet")]
  with pytest.raises(LaunchError, match="already holds a previous run.*--overwrite"):
    launch.refuse_previous_run(str(out), found, overwrite=False)
  launch.refuse_previous_run(str(out), found, overwrite=True)
  assert (out / "embeddings-00000-of-00001.parquet").read_bytes() == b"old"  # refusing deletes nothing
  launch.clear_outputs(found)
  assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
