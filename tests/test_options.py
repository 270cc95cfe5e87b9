"""Options: launch-time validation with one-line errors, and the round trip workers see."""

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.options import EmbedOptions, LaunchError, build_config, prepare_output


@pytest.fixture
def images(tmp_path):
  from PIL import Image
  d = tmp_path / "in"
  d.mkdir()
  Image.new("RGB", (40, 30), (200, 10, 10)).save(d / "a.jpg")
  return d


def _config(*args):
  return build_config(PipelineOptions(list(args)))


def test_defaults_and_native_sizes(images, tmp_path):
  config = _config("--input", f"{images}/*.jpg", "--output", str(tmp_path / "out"), "--weights", "random")
  assert [b.name for b in config.backbones] == ["vgg16", "inception_v3", "resnet50"]
  assert [b.size for b in config.backbones] == [224, 299, 224]
  assert config.sizes == (224, 299)
  layout = config.layout()
  assert [(b["offset"], b["dim"]) for b in layout["backbones"]] == [(0, 512), (512, 2048), (2560, 2048)]
  assert layout["dim"] == config.dim == 4608


@pytest.mark.parametrize("args,fragment", [
    (["--backbones", "vgg16,resnet5"], "--backbones: unknown backbone 'resnet5'; valid names: vgg16, vgg19"),
    (["--backbones", "inception_v3", "--image-size", "64"],
     "--image-size 64 is too small for inception_v3: its minimum is 75"),
    (["--pooling", "mean"], "--pooling must be one of avg, max; received: 'mean'"),
    (["--batch-size", "0"], "--batch-size must be at least 1; received: 0"),
    (["--resize", "stretch"], "--resize must be one of squash, center-crop, pad; received: 'stretch'"),
    (["--max-failure-fraction", "1.5"], "--max-failure-fraction must be between 0 and 1; received: 1.5"),
    (["--weights", "/no/such/dir"], "--weights"),
])
def test_bad_options_fail_with_one_line(images, tmp_path, args, fragment):
  with pytest.raises(LaunchError) as info:
    _config("--input", f"{images}/*.jpg", "--output", str(tmp_path / "o"), "--weights", "random", *args)
  message = str(info.value)
  assert fragment in message and "\n" not in message


def test_input_matching_nothing_names_the_pattern(images, tmp_path):
  with pytest.raises(LaunchError, match=r"--input '.*\*\.png' matched no file"):
    _config("--input", f"{images}/*.png", "--output", str(tmp_path / "o"), "--weights", "random")


def test_weights_dir_missing_a_backbone_names_it(images, tmp_path):
  (tmp_path / "w").mkdir()
  with pytest.raises(LaunchError) as info:
    _config("--input", f"{images}/*.jpg", "--output", str(tmp_path / "o"),
            "--backbones", "mobilenet_v2", "--weights", str(tmp_path / "w"))
  assert "mobilenet_v2" in str(info.value) and "mobilenet_v2.weights.h5" in str(info.value)


def test_hyphenated_options_survive_the_from_dictionary_round_trip(images, tmp_path):
  # What Dataflow and templates do to options on the way to workers.
  options = PipelineOptions(["--input", f"{images}/*.jpg", "--output", str(tmp_path / "o"),
                             "--image-size", "96", "--batch-size", "7", "--max-failure-fraction", "0.5",
                             "--fast-decode", "--weights", "random"])
  again = PipelineOptions.from_dictionary(options.get_all_options()).view_as(EmbedOptions)
  assert (again.image_size, again.batch_size, again.max_failure_fraction, again.fast_decode) == (96, 7, 0.5, True)
  assert again.input == [f"{images}/*.jpg"]


def test_output_with_a_previous_run_is_refused_unless_overwrite(tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "embeddings-00000-of-00001.parquet").write_bytes(b"old")
  (out / "_SUCCESS.json").write_text("{}")
  (out / "notes.txt").write_text("mine")
  with pytest.raises(LaunchError, match="already holds a previous run.*--overwrite"):
    prepare_output(str(out), overwrite=False)
  assert (out / "embeddings-00000-of-00001.parquet").read_bytes() == b"old"
  prepare_output(str(out), overwrite=True)
  assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
