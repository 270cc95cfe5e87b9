"""User models and layers as backbones: a fine-tuned .keras model, its SavedModel export, a registry layer, against the plain recipe."""

import hashlib
import json
import pathlib
import sys
from unittest import mock

import keras
import numpy as np
import pytest
import tensorflow as tf
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.launch import build_config
from pipeline.main import run
from pipeline.options import EmbedOptions, LaunchError
from tests.gcs_emulator import gcs_emulator
from tests.outputs import sorted_rows
from tests.recipe import relative_l2
from transforms import models
from transforms.weights import RANDOM_SEED, WeightsSource, load_backbone
from transforms.write import read_summary

# Keras's own TF-variable-to-numpy conversion, on numpy 2: noise from Keras, not from this code.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

SAMPLES = sorted((pathlib.Path(__file__).resolve().parent.parent / "samples").glob("*.jpg"))
SIZE = 48  # the fine-tuned model's own input size
RANDOM = WeightsSource("random", None, f"random:seed={RANDOM_SEED}:keras={keras.__version__}")
# One run, six parts: a .keras model at its penultimate and an intermediate layer, its SavedModel
# export at a 4-D and a 2-D output, a registry backbone at an intermediate layer and whole.
BACKBONES = "my_net:embedding,my_net:block_12_add,sm_map,sm_emb,mobilenet_v2:block_12_add,mobilenet_v2"
DIMS = [16, 96, 96, 16, 96, 1280]


def _images(paths, size):
  """The recipe's decode and preprocessing: load_img bilinear -> img_to_array -> preprocess_input."""
  x = np.stack([keras.utils.img_to_array(keras.utils.load_img(str(p), target_size=(size, size),
                                                               interpolation="bilinear")) for p in paths])
  return keras.applications.mobilenet_v2.preprocess_input(x)


def _pool(features):
  return features.mean(axis=(1, 2)) if features.ndim == 4 else features


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
  """A mobilenet_v2 with seeded weights and a classification head, fine-tuned one step on the
  sample photos, saved as .keras and exported as a SavedModel (a feature map and a vector out)."""
  root = tmp_path_factory.mktemp("models")
  base = load_backbone("mobilenet_v2", SIZE, None, RANDOM)
  x = keras.layers.GlobalAveragePooling2D(name="features")(base.output)
  x = keras.layers.Dense(16, activation="relu", name="embedding")(x)
  out = keras.layers.Dense(2, activation="softmax", name="classes")(x)
  model = keras.Model(base.input, out, name="my_net")
  model.compile(optimizer=keras.optimizers.SGD(0.01), loss="sparse_categorical_crossentropy")
  before = model.get_layer("Conv1").get_weights()[0].copy()
  model.fit(_images(SAMPLES, SIZE), np.arange(len(SAMPLES)) % 2, epochs=1, batch_size=len(SAMPLES), verbose=0)
  assert not np.array_equal(before, model.get_layer("Conv1").get_weights()[0])  # really fine-tuned
  model.save(root / "my_net.keras")
  exported = keras.Model(model.input, {"feature_map": model.get_layer("block_12_add").output,
                                       "embedding": model.get_layer("embedding").output})
  exported.export(str(root / "my_net_sm"), verbose=False)
  return root / "my_net.keras", root / "my_net_sm"


def _run_args(keras_path, saved_model, output, *extra):
  return ["--input", str(pathlib.Path(SAMPLES[0]).parent / "*.jpg"), "--output", str(output),
          "--backbones", BACKBONES, "--weights", "random", "--batch-size", "4",
          "--model", f"my_net={keras_path}", "--model", f"sm_map={saved_model};sm_emb={saved_model}",
          "--model-preprocessing", "my_net=tf;sm_map=tf", "--model-preprocessing", "sm_emb=tf",
          "--model-output", "sm_map=feature_map;sm_emb=embedding", *extra]



@pytest.fixture(scope="module")
def local_run(model_files, tmp_path_factory):
  output = tmp_path_factory.mktemp("run") / "out"
  assert run(_run_args(*model_files, output)) == 0
  return output


def _recipe(model_files):
  """Each part as the plain recipe computes it, in BACKBONES order."""
  keras_path, saved_model = model_files
  small, native = _images(SAMPLES, SIZE), _images(SAMPLES, 224)
  loaded = keras.models.load_model(keras_path)
  parts = [_pool(keras.Model(loaded.input, loaded.get_layer(layer).output).predict(small, verbose=0))
           for layer in ("embedding", "block_12_add")]
  endpoint = keras.layers.TFSMLayer(str(saved_model), call_endpoint="serve")
  outputs = {k: v.numpy() for k, v in endpoint(small).items()}
  parts += [_pool(outputs["feature_map"]), _pool(outputs["embedding"])]
  registry = load_backbone("mobilenet_v2", 224, None, RANDOM)
  parts.append(_pool(keras.Model(registry.input, registry.get_layer("block_12_add").output).predict(native, verbose=0)))
  parts.append(load_backbone("mobilenet_v2", 224, "avg", RANDOM).predict(native, verbose=0))
  return parts


def test_run_mixes_user_models_layers_and_registry_within_1e_4_of_the_recipe(local_run, model_files):
  uris, got = sorted_rows(local_run)
  assert uris == [str(p) for p in SAMPLES]
  layout = read_summary(str(local_run))["layout"]
  assert [b["dim"] for b in layout["backbones"]] == DIMS and layout["dim"] == got.shape[1] == sum(DIMS)
  keras_path, saved_model = model_files
  by_name = {b["name"]: b for b in layout["backbones"]}
  assert by_name["my_net:embedding"]["source"] == str(keras_path)
  assert by_name["my_net:embedding"]["model_sha256"] == hashlib.sha256(keras_path.read_bytes()).hexdigest()
  assert by_name["my_net:block_12_add"]["layer"] == "block_12_add"
  assert by_name["sm_map"]["model_output"] == "feature_map" and by_name["sm_map"]["layer"] is None
  assert by_name["mobilenet_v2:block_12_add"]["source"] == "mobilenet_v2"
  assert by_name["mobilenet_v2"]["model_sha256"] is None
  assert {b["input_size"] for b in layout["backbones"]} == {SIZE, 224}  # each its own size, one decode
  figures = {}
  for entry, want in zip(layout["backbones"], _recipe(model_files)):
    part = got[:, entry["offset"]:entry["offset"] + entry["dim"]]
    assert np.linalg.norm(want, axis=1).min() > 0 and np.ptp(want, axis=0).max() > 0  # not a trivial match
    figures[entry["name"]] = float(relative_l2(part, want).max())
  print("relative L2, worst row:", json.dumps(figures))
  assert max(figures.values()) < 1e-4, figures


def test_multi_process_run_on_gcs_gives_the_same_rows(local_run, model_files, tmp_path):
  keras_path, saved_model = model_files
  with gcs_emulator("models-bucket") as name:
    bucket = f"gs://{name}"
    for path in [keras_path, *sorted(p for p in saved_model.rglob("*") if p.is_file())]:
      relative = path.relative_to(keras_path.parent).as_posix()
      with FileSystems.create(f"{bucket}/models/{relative}", compression_type="uncompressed") as f:
        f.write(path.read_bytes())
    output = f"{bucket}/runs/multi"
    args = _run_args(f"{bucket}/models/my_net.keras", f"{bucket}/models/my_net_sm", output,
                     "--direct_running_mode=multi_processing", "--direct_num_workers=2")
    assert run(args) == 0
    uris, rows = sorted_rows(output)
    layout = read_summary(output)["layout"]
  local_uris, local_rows = sorted_rows(local_run)
  assert uris == local_uris
  np.testing.assert_allclose(rows, local_rows, rtol=1e-5, atol=1e-6)
  # Same bytes, same fingerprints: a gs:// copy is the same model as the local file.
  local = {b["name"]: b["model_sha256"] for b in read_summary(str(local_run))["layout"]["backbones"]}
  assert {b["name"]: b["model_sha256"] for b in layout["backbones"]} == local


def test_previous_run_is_reembedded_when_the_model_file_changes(local_run, model_files, tmp_path):
  keras_path, saved_model = model_files
  changed = tmp_path / "my_net.keras"
  model = keras.models.load_model(keras_path)
  model.get_layer("embedding").set_weights([w + 0.01 for w in model.get_layer("embedding").get_weights()])
  model.save(changed)
  same = build_config(PipelineOptions(_run_args(keras_path, saved_model, tmp_path / "o1", "--previous", str(local_run))))
  assert same.refresh["reused"] is True
  other = build_config(PipelineOptions(_run_args(changed, saved_model, tmp_path / "o2", "--previous", str(local_run))))
  assert other.refresh["reused"] is False
  assert other.refresh["reason"].startswith("my_net:embedding ") and "changed" in other.refresh["reason"]


def test_worker_copy_refuses_a_model_changed_after_launch(model_files, tmp_path):
  keras_path, _ = model_files
  copy = tmp_path / "my_net.keras"
  copy.write_bytes(keras_path.read_bytes())
  spec = models.resolve_model("my_net", str(copy), "embedding", None, "avg", "tf")
  assert spec.size == SIZE and spec.dim == 16 and spec.preprocessing == "tf"
  copy.write_bytes(keras_path.read_bytes() + b"\0")
  with pytest.raises(ValueError, match="changed after launch"):
    models.load_features(spec, "avg")


# ----- launch errors: one line, naming the option and the way out

def _launch(tmp_path, *args):
  with pytest.raises(LaunchError) as info:
    build_config(PipelineOptions(["--input", str(SAMPLES[0]), "--output", str(tmp_path / "o"), "--weights", "random",
                                  *args]))
  message = str(info.value)
  assert "\n" not in message
  return message


def test_unknown_registry_layer_names_the_closest_valid_ones(tmp_path):
  message = _launch(tmp_path, "--backbones", "mobilenet_v2:block_12_ad", "--image-size", "32")
  assert message.startswith("--backbones layer 'block_12_ad': mobilenet_v2 has no such layer; closest valid layers: ")
  assert "block_12_add" in message and "--list-layers mobilenet_v2" in message


def test_layer_that_is_not_a_feature_map_or_vector_is_refused(tmp_path):
  inputs = keras.Input((16, 16, 3))
  x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
  x = keras.layers.Reshape((256, 4), name="tokens")(x)
  x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
  keras.Model(inputs, keras.layers.Dense(3, name="head")(x)).save(tmp_path / "tokens.keras")
  message = _launch(tmp_path, "--backbones", "tok:tokens", "--model", f"tok={tmp_path / 'tokens.keras'}")
  assert "'tokens': its output (None, 256, 4) is not a feature map" in message and "conv" in message


def test_lambda_layer_needs_model_unsafe(tmp_path):
  inputs = keras.Input((16, 16, 3))
  x = keras.layers.Lambda(lambda t: t * 2.0, name="double")(inputs)
  x = keras.layers.Conv2D(4, 3, name="conv")(x)
  keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x)).save(tmp_path / "lam.keras")
  args = ("--backbones", "lam", "--model", f"lam={tmp_path / 'lam.keras'}")
  message = _launch(tmp_path, *args)
  assert "Lambda layer" in message and "--model-unsafe lam" in message
  config = build_config(PipelineOptions(["--input", str(SAMPLES[0]), "--output", str(tmp_path / "o"), *args,
                                         "--model-unsafe", "lam"]))
  assert config.dim == 4 and config.backbones[0].size == 16 and config.backbones[0].model.safe_mode is False


CUSTOM_MODULE = '''
import keras

@keras.saving.register_keras_serializable(package="embedtest")
class Scale(keras.layers.Layer):
  def call(self, x):
    return x * 0.5
'''


def test_missing_custom_object_names_the_class_and_model_modules(tmp_path, monkeypatch):
  from keras.src.saving import object_registration
  (tmp_path / "embedtest_layers.py").write_text(CUSTOM_MODULE)
  monkeypatch.syspath_prepend(str(tmp_path))
  import embedtest_layers
  inputs = keras.Input((16, 16, 3))
  x = keras.layers.Conv2D(4, 3, name="conv")(embedtest_layers.Scale(name="half")(inputs))
  keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x)).save(tmp_path / "custom.keras")
  # As on a worker that never imported the module: the class is not registered.
  monkeypatch.delitem(object_registration.GLOBAL_CUSTOM_OBJECTS, "embedtest>Scale")
  monkeypatch.delitem(object_registration.GLOBAL_CUSTOM_NAMES, embedtest_layers.Scale)
  monkeypatch.delitem(sys.modules, "embedtest_layers")
  args = ("--backbones", "cus", "--model", f"cus={tmp_path / 'custom.keras'}")
  message = _launch(tmp_path, *args)
  assert "'Scale'" in message and "--model-modules" in message and "--setup_file" in message
  config = build_config(PipelineOptions(["--input", str(SAMPLES[0]), "--output", str(tmp_path / "o"), *args,
                                         "--model-modules", "embedtest_layers"]))
  assert config.dim == 4 and config.backbones[0].model.modules == ("embedtest_layers",)


def test_saved_model_layer_and_sizeless_model_errors(model_files, tmp_path):
  _, saved_model = model_files
  message = _launch(tmp_path, "--backbones", "sm:block_12_add", "--model", f"sm={saved_model}")
  assert "sm is a SavedModel, used whole through its endpoint" in message
  message = _launch(tmp_path, "--backbones", "sm", "--model", f"sm={saved_model}")
  assert message.startswith("--model-output is needed: the SavedModel") and "embedding, feature_map" in message
  inputs = keras.Input((None, None, 3))
  keras.Model(inputs, keras.layers.GlobalMaxPooling2D()(keras.layers.Conv2D(5, 3)(inputs))).save(tmp_path / "any.keras")
  message = _launch(tmp_path, "--backbones", "any", "--model", f"any={tmp_path / 'any.keras'}")
  assert message.startswith("--image-size: any takes images of shape (None, None); give one square size")
  config = build_config(PipelineOptions(["--input", str(SAMPLES[0]), "--output", str(tmp_path / "o"), "--backbones",
                                         "any", "--model", f"any={tmp_path / 'any.keras'}", "--image-size", "40"]))
  assert config.backbones[0].size == 40 and config.dim == 5


def test_serving_default_signature_of_tf_saved_model_save(tmp_path):
  # tf.saved_model.save names its endpoint serving_default, which takes its input by keyword.
  inputs = keras.Input((20, 20, 3))
  model = keras.Model(inputs, keras.layers.Conv2D(6, 3, name="conv")(inputs))
  serve = tf.function(lambda images: {"maps": model(images)},
                      input_signature=[tf.TensorSpec([None, 20, 20, 3], tf.float32, name="images")])
  module = tf.Module()
  module.model = model
  tf.saved_model.save(module, str(tmp_path / "sm"), signatures=serve.get_concrete_function())
  spec = models.resolve_model("sm", str(tmp_path / "sm"), None, None, "max", "none")
  assert (spec.size, spec.dim, spec.model.endpoint) == (20, 6, "serving_default")
  x = np.random.default_rng(0).uniform(0, 255, (3, 20, 20, 3)).astype(np.float32)
  got = models.load_features(spec, "max")(x).numpy()
  np.testing.assert_allclose(got, model(x).numpy().max(axis=(1, 2)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("args,fragment", [
    (["--backbones", "nope", "--model", "mine=x.keras"], "--backbones: unknown backbone 'nope'; valid names: vgg16"),
    (["--backbones", "resnet50", "--model", "resnet50=x.keras"], "--model resnet50: a registry backbone has that name"),
    (["--backbones", "mine", "--model", "mine"], "--model takes NAME=VALUE"),
    (["--backbones", "mine", "--model", "mine=x.keras", "--model-preprocessing", "mine=bgr"],
     "--model-preprocessing must be one of caffe, tf, torch, none; received: 'bgr'"),
    (["--backbones", "mine", "--model", "mine=x.keras", "--model-output", "other=k"],
     "--model-output names 'other', which no --model registers; registered: mine"),
    (["--backbones", "vgg16", "--model", "mine=x.keras"], "--model mine is registered but --backbones does not name it"),
    (["--backbones", "vgg16:"], "--backbones: 'vgg16:' names no layer after ':'"),
    (["--backbones", "mine", "--model", "mine=/no/such.keras"], "--model '/no/such.keras' is neither a .keras file"),
])
def test_model_option_errors(tmp_path, args, fragment):
  assert fragment in _launch(tmp_path, *args)


def test_model_options_survive_from_dictionary():
  options = PipelineOptions(["--model", "a=gs://b/a.keras", "--model=b=gs://b/sm", "--model-preprocessing", "a=tf",
                             "--model_output", "b=out"])
  again = PipelineOptions.from_dictionary(options.get_all_options()).view_as(EmbedOptions)
  assert again.model == "a=gs://b/a.keras;b=gs://b/sm"
  assert (again.model_preprocessing, again.model_output) == ("a=tf", "b=out")


def test_list_layers_of_a_registry_backbone_downloads_nothing(capsys):
  from keras.src.utils import file_utils
  with mock.patch.object(file_utils, "get_file", side_effect=AssertionError("tried to fetch weights")):
    assert run(["--list-layers", "mobilenet_v2", "--image-size", "64"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert any(line.split()[0] == "block_12_add" and line.endswith("(None, 4, 4, 96)") for line in lines)
  assert "input_layer" not in " ".join(lines)


def test_list_layers_of_a_keras_model_and_errors(model_files, capsys):
  keras_path, saved_model = model_files
  assert run(["--list-layers", "my_net", "--model", f"my_net={keras_path}"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[-3:] == [line for line in lines if line.split()[0] in ("features", "embedding", "classes")]
  assert lines[-2].split(None, 1) == ["embedding", "(None, 16)"]
  assert run(["--list-layers", "my_net"]) == 2
  assert "add --model my_net=PATH" in capsys.readouterr().err
  assert run(["--list-layers", "sm", "--model", f"sm={saved_model}"]) == 2
  assert "it has no layers to pick" in capsys.readouterr().err


def test_registry_layer_dim_is_read_off_a_build_without_weights():
  from keras.src.utils import file_utils
  with mock.patch.object(file_utils, "get_file", side_effect=AssertionError("tried to fetch weights")):
    assert models.inspect_registry_layer("resnet50", 32, "conv4_block6_out") == 1024
    assert models.inspect_registry_layer("inception_v3", 75, "mixed7") == 768
