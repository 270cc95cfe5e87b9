"""Options: launch-time validation with one-line errors, and the round trip workers see."""

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.launch import build_config
from pipeline.options import EmbedOptions, LaunchError, parse_size


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
  layout = config.layout
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


@pytest.mark.parametrize("text,want", [("2GiB", 2 << 30), ("1500MB", 1_500_000_000), ("512 MiB", 512 << 20),
                                       ("1.5gib", 3 << 29), ("64MiB", 64 << 20)])
def test_sizes_take_decimal_and_binary_units(text, want):
  assert parse_size("decode-memory", text) == want


@pytest.mark.parametrize("text", ["2", "2GiBs", "lots", "-1GB", ""])
def test_a_size_without_a_valid_unit_is_refused(text):
  with pytest.raises(LaunchError) as info:
    parse_size("decode-memory", text)
  assert str(info.value) == f"--decode-memory must be a size with a unit, e.g. 2GiB or 1500MB; received: {text!r}"


def test_decode_memory_default_follows_max_pixels_and_holds_without_it(images, tmp_path):
  base = ("--input", f"{images}/*.jpg", "--output", str(tmp_path / "o"), "--weights", "random",
          "--backbones", "mobilenet_v2")
  config = _config(*base)
  assert config.decode_memory == 24 * 89_478_485 and config.max_pixels == 89_478_485
  config = _config(*base, "--max-pixels", "0")
  assert config.max_pixels is None and config.decode_memory == 2 << 30  # the ceiling stays
  config = _config(*base, "--max-pixels", "1000", "--decode-memory", "3GiB")
  assert config.decode_memory == 3 << 30 and config.decode_spec.memory == 3 << 30
  assert config.decode_spec.max_pixels == 1000 and config.decode_spec.name("memory") == "--decode-memory"
  with pytest.raises(LaunchError, match=r"^--decode-memory must be at least 64MiB .*received: '1MB'$"):
    _config(*base, "--decode-memory", "1MB")


def test_decode_threads_zero_is_left_for_the_worker_to_count(images, tmp_path):
  config = _config("--input", f"{images}/*.jpg", "--output", str(tmp_path / "o"), "--weights", "random",
                   "--backbones", "mobilenet_v2")
  assert config.decode_threads == 0  # resolved by the embed DoFn's setup on the worker, not here
