"""KerasHub presets as backbones: small random DINOv2, CLIP and ViT presets against KerasHub's own recipe, in runs and at launch."""

import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that

keras_hub = pytest.importorskip("keras_hub")

from embed_images import BackbonesModelHandler, EmbedImages  # noqa: E402
from pipeline.launch import build_config  # noqa: E402
from pipeline.main import run  # noqa: E402
from pipeline.options import LaunchError  # noqa: E402
from tests.gcs_emulator import gcs_emulator  # noqa: E402
from tests.outputs import sorted_rows  # noqa: E402
from tests.recipe import recipe_embeddings, relative_l2  # noqa: E402
from transforms import decode, decode_pool, hub  # noqa: E402
from transforms.weights import RANDOM_SEED, BackboneSpec, WeightsSource  # noqa: E402
from transforms.write import read_summary  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

ROOT = pathlib.Path(__file__).resolve().parent.parent
SAMPLES = sorted((ROOT / "samples").glob("*.jpg"))
SIZE = 112
REGISTERS = 2
# Every vector choice of the three families, with a registry backbone at its native size between them.
BACKBONES = "dino,dino:mean,clip,mobilenet_v3_small,vit,vit:mean"
DIMS = [64, 64, 48, 576, 64, 64]
RANDOM = WeightsSource("random", None, f"random:seed={RANDOM_SEED}:keras={keras.__version__}")
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_CLIP_MEAN, _CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _normalising(mean, std):
  return {"scale": [1 / (255 * s) for s in std], "offset": [-m / s for m, s in zip(mean, std)]}


def _save(backbone, converter, path):
  backbone.save_to_preset(str(path))
  converter.save_to_preset(str(path))
  return path


@pytest.fixture(scope="module")
def presets(tmp_path_factory):
  """Three presets, as the real ones are configured (resize, crop, scale and offset), at 112 px."""
  root = tmp_path_factory.mktemp("presets")
  dino = keras_hub.models.DINOV2Backbone(
      patch_size=14, num_layers=2, hidden_dim=64, num_heads=2, intermediate_dim=128, image_shape=(SIZE, SIZE, 3),
      position_embedding_shape=(SIZE, SIZE, 3), num_register_tokens=REGISTERS)
  dino_converter = keras_hub.layers.DINOV2ImageConverter(
      image_size=(SIZE, SIZE), interpolation="bicubic", antialias=True, crop_to_aspect_ratio=True,
      **_normalising(_IMAGENET_MEAN, _IMAGENET_STD))
  clip = keras_hub.models.CLIPBackbone(
      vision_encoder=keras_hub.models.CLIPVisionEncoder(
          patch_size=14, hidden_dim=64, num_layers=2, num_heads=2, intermediate_dim=128, image_shape=(SIZE, SIZE, 3)),
      text_encoder=keras_hub.models.CLIPTextEncoder(
          vocabulary_size=100, embedding_dim=32, hidden_dim=32, num_layers=1, num_heads=2, intermediate_dim=64,
          max_sequence_length=8),
      projection_dim=48)
  clip_converter = keras_hub.layers.CLIPImageConverter(
      image_size=(SIZE, SIZE), interpolation="bicubic", crop_to_aspect_ratio=True, **_normalising(_CLIP_MEAN, _CLIP_STD))
  vit = keras_hub.models.ViTBackbone(
      image_shape=(SIZE, SIZE, 3), patch_size=16, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128)
  vit_converter = keras_hub.layers.ViTImageConverter(
      image_size=(SIZE, SIZE), scale=1 / 127.5, offset=-1.0, interpolation="bilinear", crop_to_aspect_ratio=False)
  return {"dino": _save(dino, dino_converter, root / "dino"), "clip": _save(clip, clip_converter, root / "clip"),
          "vit": _save(vit, vit_converter, root / "vit")}


def _run_args(presets, output, *extra, backbones=BACKBONES):
  return ["--input", str(ROOT / "samples" / "*.jpg"), "--output", str(output), "--backbones", backbones,
          "--weights", "random", "--batch-size", "4",
          *[f"--model={name}={path}" for name, path in presets.items()], *extra]



@pytest.fixture(scope="module")
def local_run(presets, tmp_path_factory):
  output = tmp_path_factory.mktemp("run") / "out"
  assert run(_run_args(presets, output)) == 0
  return output


def keras_hub_recipe(preset, vector, paths):
  """KerasHub's own recipe: ImageConverter.from_preset on the full image as load_img gives it -> the
  backbone -> the vector."""
  converter = keras_hub.layers.ImageConverter.from_preset(str(preset))
  backbone = keras_hub.models.Backbone.from_preset(str(preset))
  rows = []
  for path in paths:
    x = np.asarray(converter(keras.utils.img_to_array(keras.utils.load_img(str(path)))[None]))
    if vector == "vision_embedding":
      rows.append(np.asarray(backbone.get_vision_embeddings(x))[0])
      continue
    tokens = np.asarray(backbone({"images": x} if isinstance(backbone.input, dict) else x))[0]
    prefix = 1 + REGISTERS if isinstance(backbone, keras_hub.models.DINOV2Backbone) else 1
    rows.append(tokens[0] if vector == "cls" else tokens[prefix:].mean(axis=0))
  return np.stack(rows)


def test_run_mixes_presets_and_a_registry_backbone_within_1e_4_of_keras_hub_recipe(local_run, presets):
  uris, got = sorted_rows(local_run)
  assert uris == [str(p) for p in SAMPLES]
  layout = read_summary(str(local_run))["layout"]
  assert [b["dim"] for b in layout["backbones"]] == DIMS and got.shape[1] == sum(DIMS)
  by_name = {b["name"]: b for b in layout["backbones"]}
  assert [by_name[n]["layer"] for n in ("dino", "dino:mean", "clip", "vit", "vit:mean")] == [
      "cls", "mean", "vision_embedding", "cls", "mean"]
  assert by_name["dino"]["source"] == str(presets["dino"]) and by_name["dino"]["input_size"] == hub.FULL_IMAGE
  settings = json.loads(by_name["dino"]["preprocessing"].split(":", 1)[1])
  assert settings["class"] == "DINOV2ImageConverter" and settings["interpolation"] == "bicubic"
  assert settings["antialias"] is True and settings["image_size"] == [SIZE, SIZE]
  assert by_name["mobilenet_v3_small"]["input_size"] == 224
  figures = {}
  for entry in layout["backbones"]:
    name = entry["name"]
    if name == "mobilenet_v3_small":
      want = recipe_embeddings(SAMPLES, [BackboneSpec(name, 224, RANDOM)])
    else:
      want = keras_hub_recipe(presets[name.split(":")[0]], entry["layer"], SAMPLES)
    part = got[:, entry["offset"]:entry["offset"] + entry["dim"]]
    assert np.ptp(want, axis=0).max() > 0  # images differ in the vector: not a trivial match
    figures[name] = float(relative_l2(part, want).max())
  print("relative L2 to the recipe, worst row:", json.dumps(figures))
  assert max(figures.values()) < 1e-4, figures


def _cli_slices(local_run, names):
  """uri -> the command line's vector for `names`, concatenated in that order."""
  uris, rows = sorted_rows(local_run)
  by_name = {b["name"]: b for b in read_summary(str(local_run))["layout"]["backbones"]}
  parts = [rows[:, by_name[n]["offset"]:by_name[n]["offset"] + by_name[n]["dim"]] for n in names]
  return dict(zip(uris, np.concatenate(parts, axis=1)))


def _matches(want):
  def check(outputs):
    got = dict(outputs)
    assert sorted(got) == sorted(want)
    for uri, vector in got.items():
      assert relative_l2(np.asarray(vector)[None], want[uri][None]).max() < 1e-5, uri
  return check


def test_embed_images_with_hub_and_preset_directory_equals_the_command_line(local_run, presets, monkeypatch):
  # hub:dinov2_small served from the small local preset, as KerasHub's cache would serve the real one.
  monkeypatch.setattr(hub, "_download", lambda preset: str(presets["dino"]))
  want = _cli_slices(local_run, ["dino:mean", "clip"])
  embed = EmbedImages(["hub:dinov2_small:mean", "clip"], models={"clip": str(presets["clip"])}, batch_size=3,
                      decode_processes=1)
  assert [b["layer"] for b in embed.layout["backbones"]] == ["mean", "vision_embedding"]
  assert embed.layout["backbones"][0]["source"] == "dinov2_small" and embed.layout["dim"] == 64 + 48
  with TestPipeline() as p:
    rows = (p | beam.Create([str(s) for s in SAMPLES]) | embed
            | beam.Map(lambda e: (e.uri, e.embedding)))
    assert_that(rows, _matches(want))


def test_backbones_model_handler_takes_a_preset_directory(local_run, presets):
  want = _cli_slices(local_run, ["vit", "mobilenet_v3_small"])
  handler = BackbonesModelHandler(["vit", "mobilenet_v3_small"], models={"vit": str(presets["vit"])},
                                  weights="random")
  arrays = [(str(s), np.asarray(keras.utils.load_img(str(s)))) for s in SAMPLES]
  with TestPipeline() as p:
    rows = (p | beam.Create(arrays) | RunInference(KeyedModelHandler(handler))
            | beam.MapTuple(lambda uri, result: (uri, result.inference)))
    assert_that(rows, _matches(want))


def test_the_full_image_decodes_as_load_img_gives_it_in_and_out_of_a_decode_process():
  spec = decode.DecodeSpec(sizes=(hub.FULL_IMAGE, 32), memory=decode_pool.default_memory_ceiling(None))
  pool = decode_pool.DecodePool(1, spec.memory)
  try:
    pooled = pool.decode_many([p.read_bytes() for p in SAMPLES], spec)
  finally:
    pool.close()
  for path, image in zip(SAMPLES, pooled):
    want = np.asarray(keras.utils.load_img(str(path)))
    np.testing.assert_array_equal(image.arrays[hub.FULL_IMAGE], want)
    assert (image.width, image.height) == (want.shape[1], want.shape[0])
    assert image.arrays[32].shape == (32, 32, 3)


def test_multi_process_run_with_presets_on_gcs_gives_the_same_rows(local_run, presets):
  with gcs_emulator("presets-bucket") as name:
    staged = {}
    for key, path in presets.items():
      staged[key] = f"gs://{name}/presets/{key}"
      for f in sorted(path.iterdir()):
        with FileSystems.create(f"{staged[key]}/{f.name}", compression_type="uncompressed") as out:
          out.write(f.read_bytes())
    output = f"gs://{name}/runs/multi"
    assert run(_run_args(staged, output, "--direct_running_mode=multi_processing", "--direct_num_workers=2")) == 0
    uris, rows = sorted_rows(output)
    layout = read_summary(output)["layout"]
  local_uris, local_rows = sorted_rows(local_run)
  assert uris == local_uris
  np.testing.assert_allclose(rows, local_rows, rtol=1e-5, atol=1e-6)
  # Same files, same fingerprints: a gs:// copy of a preset is the same preset.
  local = {b["name"]: b["weights_fingerprint"] for b in read_summary(str(local_run))["layout"]["backbones"]}
  assert {b["name"]: b["weights_fingerprint"] for b in layout["backbones"]} == local


def _changed_copy(preset, dest):
  backbone = keras_hub.models.Backbone.from_preset(str(preset))
  layer = [layer for layer in backbone.layers if layer.weights][-1]
  layer.set_weights([w + 0.01 for w in layer.get_weights()])
  backbone.save_to_preset(str(dest))
  shutil.copy(preset / hub.CONVERTER_FILE, dest / hub.CONVERTER_FILE)
  return dest


def test_previous_run_is_reembedded_when_a_presets_weights_change(local_run, presets, tmp_path):
  same = build_config(PipelineOptions(_run_args(presets, tmp_path / "o1", "--previous", str(local_run))))
  assert same.refresh["reused"] is True
  changed = dict(presets, dino=_changed_copy(presets["dino"], tmp_path / "dino"))
  other = build_config(PipelineOptions(_run_args(changed, tmp_path / "o2", "--previous", str(local_run))))
  assert other.refresh["reused"] is False
  assert other.refresh["reason"].startswith("dino weights_fingerprint changed")


def test_previous_run_is_reembedded_when_a_converter_setting_changes(local_run, presets, tmp_path):
  changed = tmp_path / "vit"
  shutil.copytree(presets["vit"], changed)
  settings = json.loads((changed / hub.CONVERTER_FILE).read_text())
  settings["config"]["antialias"] = True
  (changed / hub.CONVERTER_FILE).write_text(json.dumps(settings))
  other = build_config(PipelineOptions(_run_args(dict(presets, vit=changed), tmp_path / "o", "--previous",
                                                 str(local_run))))
  assert other.refresh["reused"] is False
  assert other.refresh["reason"].startswith("vit preprocessing changed") and '"antialias":true' in other.refresh["reason"]


def test_worker_copy_refuses_a_preset_changed_after_launch(presets, tmp_path):
  copy = tmp_path / "vit"
  shutil.copytree(presets["vit"], copy)
  spec = hub.resolve_preset("vit", str(copy), None, "avg", directory=True)
  assert spec.dim == 64 and spec.size == hub.FULL_IMAGE and spec.layer == "cls"
  _changed_copy(presets["vit"], copy)
  with pytest.raises(ValueError, match="changed after launch"):
    hub.load_features(spec)


def test_a_task_preset_gives_its_backbone(presets, tmp_path, caplog):
  backbone = keras_hub.models.Backbone.from_preset(str(presets["vit"]))
  preprocessor = keras_hub.models.ViTImageClassifierPreprocessor(
      image_converter=keras_hub.layers.ImageConverter.from_preset(str(presets["vit"])))
  classifier = keras_hub.models.ViTImageClassifier(backbone=backbone, num_classes=3, preprocessor=preprocessor)
  classifier.save_to_preset(str(tmp_path / "classifier"))
  assert (tmp_path / "classifier" / "task.json").exists()
  with caplog.at_level(logging.WARNING):
    spec = hub.resolve_preset("classifier", str(tmp_path / "classifier"), "mean", "avg", directory=True)
  assert spec.dim == 64 and spec.layer == "mean" and "task preset: its backbone is used" in caplog.text


# ----- launch errors: one line, naming what was received and the way out

def _launch(tmp_path, *args):
  with pytest.raises(LaunchError) as info:
    build_config(PipelineOptions(["--input", str(SAMPLES[0]), "--output", str(tmp_path / "o"), *args]))
  message = str(info.value)
  assert "\n" not in message
  return message


def test_unknown_preset_names_the_nearest(tmp_path):
  message = _launch(tmp_path, "--backbones", "hub:dinov2_smal")
  assert message.startswith("--backbones hub:dinov2_smal: KerasHub has no such preset; nearest: dinov2_small")


def test_a_preset_that_cannot_be_downloaded_says_what_to_do_offline(tmp_path, monkeypatch):
  import kagglehub
  import requests

  def offline(*args, **kwargs):
    raise requests.ConnectionError("Failed to resolve 'api.kaggle.com'")

  monkeypatch.setattr(kagglehub, "model_download", offline)
  message = _launch(tmp_path, "--backbones", "hub:dinov2_small")
  assert message.startswith("--backbones hub:dinov2_small: cannot download the preset (ConnectionError")
  assert "--model NAME=DIR" in message


def test_a_directory_that_is_not_a_preset(tmp_path):
  (tmp_path / "notes").mkdir()
  (tmp_path / "notes" / "config.json").write_text("{}")  # no metadata.json: not what save_to_preset writes
  message = _launch(tmp_path, "--backbones", "mine", "--model", f"mine={tmp_path / 'notes'}")
  assert "is neither a .keras file" in message and "nor a KerasHub preset directory" in message


def test_a_preset_without_its_image_converter(presets, tmp_path):
  bare = tmp_path / "bare"
  shutil.copytree(presets["dino"], bare)
  (bare / hub.CONVERTER_FILE).unlink()
  message = _launch(tmp_path, "--backbones", "dino", "--model", f"dino={bare}")
  assert message.startswith(f"--backbones dino ({bare}): the preset has no image_converter.json")


@pytest.mark.parametrize("entry,fragment", [
    ("clip:cls", "CLIPBackbone is an image-text model, whose vector is its projected image embedding"),
    ("vit:first", "'first' is not a vector choice; a KerasHub transformer takes :cls or :mean"),
])
def test_vector_choice_errors(presets, tmp_path, entry, fragment):
  name = entry.split(":")[0]
  assert fragment in _launch(tmp_path, "--backbones", entry, "--model", f"{name}={presets[name]}")


def test_hub_without_keras_hub_says_what_to_install(tmp_path):
  # A keras_hub that cannot be imported, first on the path: as on a machine without the extra.
  shadow = tmp_path / "shadow" / "keras_hub"
  shadow.mkdir(parents=True)
  (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'keras_hub'\")\n")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "shadow"), str(ROOT)]))
  done = subprocess.run([sys.executable, "-m", "pipeline", "--input", str(SAMPLES[0]), "--output", str(tmp_path / "o"),
                         "--backbones", "hub:dinov2_small"], env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 2
  assert done.stderr.strip().splitlines()[-1] == (
      "embed-images: error: --backbones: KerasHub presets need the keras-hub package, not installed here: "
      + hub.INSTALL_HINT)


def test_list_backbones_says_what_the_vector_is_per_family(capsys):
  assert run(["--list-backbones"]) == 0
  out = capsys.readouterr().out
  assert "hub:PRESET[:cls|:mean]" in out and "get_vision_embeddings" in out and "class token" in out
