"""The OpenVINO engine against TensorFlow: every backbone kind, f32 enforced, bf16, auto's choice and fallback, the missing package, a multi-process run, EmbedImages and BackbonesModelHandler, the cache of converted models."""

import json
import logging
import pathlib
import subprocess
import sys
import threading

import keras
import numpy as np
import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.launch import build_config
from pipeline.main import run
from tests.recipe import relative_l2
from transforms import fused, model_cache, openvino_engine
from transforms.weights import BackboneSpec, resolve_weights
from transforms.write import LAYOUT_KEY, embedding_matrix, read_summary

ov = pytest.importorskip("openvino")

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

REPO = pathlib.Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples"
# The fidelity bar between the engines (DESIGN.md, Engines), and bf16's stated deviation (README.md).
F32_BAR, BF16_BAR = 1e-5, 5e-2
USER_SIZE = 40


@pytest.fixture(autouse=True)
def converted_here(monkeypatch):
  """No conversions of earlier tests: with the model cache off (the suite's), a process keeps what it
  converted (openvino_engine._CONVERTED_HERE), and tests here swap the converter."""
  monkeypatch.setattr(openvino_engine, "_CONVERTED_HERE", {})


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
  """A cache of models of this test's own, empty (the suite runs without one: tests/conftest.py)."""
  monkeypatch.setenv(model_cache.CACHE_ENV, str(tmp_path / "model-cache"))
  return tmp_path / "model-cache"


def _spec(name, size):
  return BackboneSpec(name, size, resolve_weights("random", name, size))


def _batch(sizes, n=5, seed=0):
  """n images per size: odd, so the batch splits unevenly over OpenVINO's streams."""
  rng = np.random.RandomState(seed)
  return {s: rng.randint(0, 256, (n, s, s, 3), dtype=np.uint8) for s in sizes}


@pytest.fixture(scope="module")
def user_models(tmp_path_factory):
  """A small convolutional model with BatchNormalization, saved as .keras and exported as a SavedModel."""
  root = tmp_path_factory.mktemp("ov-models")
  keras.utils.set_random_seed(7)
  inputs = keras.Input((USER_SIZE, USER_SIZE, 3))
  x = keras.layers.Conv2D(8, 3, strides=2, name="conv")(inputs)
  x = keras.layers.BatchNormalization(name="bn")(x)
  x = keras.layers.Activation("relu", name="relu")(x)
  x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
  x = keras.layers.Dense(6, name="embedding")(x)
  model = keras.Model(inputs, x, name="tiny")
  model.save(root / "tiny.keras")
  model.export(str(root / "tiny_sm"), verbose=False)
  return root / "tiny.keras", root / "tiny_sm"


def _config_specs(tmp_path, *args):
  """The backbones as the command line resolves them (registry layers and user models included)."""
  options = PipelineOptions(["--input", str(SAMPLES / "*.jpg"), "--output", str(tmp_path / "o"),
                             "--weights", "random", *args])
  config = build_config(options, check_files=False)
  return config.backbones, config.pooling, config.normalize


CASES = {
    "registry backbone": ("mobilenet_v3_small", "--image-size", "32"),
    "registry layer": ("mobilenet_v2:block_5_add", "--image-size", "32"),
    "keras user model": ("tiny", "--model", "tiny={keras}", "--model-preprocessing", "tiny=tf"),
    "saved model": ("tiny_sm", "--model", "tiny_sm={saved_model}"),
    "pooling max": ("mobilenet_v2", "--image-size", "32", "--pooling", "max"),
    "normalize l2": ("mobilenet_v3_small,tiny", "--image-size", "40", "--model", "tiny={keras}",
                     "--normalize", "l2"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_openvino_rows_match_tensorflow_for_every_backbone_kind(case, user_models, tmp_path):
  keras_path, saved_model = user_models
  backbones, *args = CASES[case]
  args = [a.format(keras=keras_path, saved_model=saved_model) for a in args]
  specs, pooling, normalize = _config_specs(tmp_path, "--backbones", backbones, *args)
  images = _batch(sorted({s.size for s in specs}))
  want = fused.FusedModel(specs, pooling, normalize=normalize)(images)
  model = openvino_engine.make_engine("openvino", specs, pooling, normalize=normalize)
  assert isinstance(model, openvino_engine.OpenVINOModel) and model.precision == "f32"
  got = model(images)
  assert got.dtype == np.float32 and got.shape == want.shape == (5, sum(s.dim for s in specs))
  assert relative_l2(got, want).max() < F32_BAR
  assert np.linalg.norm(want, axis=1).min() > 0  # rows with something in them: the comparison means something


def test_two_backbones_at_two_sizes_match_tensorflow_slice_by_slice():
  specs = [_spec("mobilenet_v3_small", 32), _spec("mobilenet_v2", 48)]
  images = _batch((32, 48), n=7)
  want = fused.FusedModel(specs)(images)
  got = openvino_engine.make_engine("openvino", specs)(images)
  assert got.shape == want.shape == (7, 576 + 1280)
  for part in (slice(0, 576), slice(576, None)):  # each input reached its own backbone
    assert relative_l2(got[:, part], want[:, part]).max() < F32_BAR
  # a batch of one (fewer images than streams) and a bigger one go through the same compiled model
  one = {s: a[:1] for s, a in images.items()}
  assert relative_l2(openvino_engine.make_engine("openvino", specs)(one), want[:1]).max() < F32_BAR


def test_the_converted_model_has_only_the_fused_functions_outputs():
  # OpenVINO's TensorFlow frontend (2026.4) also makes each of EfficientNet's swish activations a
  # model output: ~50 tensors computed, transposed and copied out on every call, which put
  # EfficientNetB0 at ~0.65x TensorFlow (benchmarks/README.md). The conversion keeps the function's own.
  specs = [_spec("efficientnet_b0", 32)]
  model = fused.FusedModel(specs)
  function = model._forward.get_concrete_function()
  assert len(ov.convert_model(function).outputs) > len(function.outputs)  # the frontend's extras: this case
  converted = openvino_engine.convert_fused(model)
  assert len(converted.outputs) == len(function.outputs)
  assert all(t.name in o.get_names() for o, t in zip(converted.outputs, function.outputs))
  images = _batch((32,))
  got = openvino_engine.make_engine("openvino", specs)(images)
  assert relative_l2(got, model(images)).max() < F32_BAR


def test_f32_is_enforced_where_openvino_would_otherwise_run_bf16():
  specs = [_spec("mobilenet_v2", 48)]
  images = _batch((48,))
  want = fused.FusedModel(specs)(images)
  model = openvino_engine.make_engine("openvino", specs)
  # read back from the compiled model, not from what we asked for
  assert model._compiled.get_property("INFERENCE_PRECISION_HINT").to_string() == "f32"
  assert relative_l2(model(images), want).max() < F32_BAR
  core = ov.Core()
  if not openvino_engine.supports_bf16(core):
    pytest.skip("this CPU has no bf16 (no AVX512-BF16/AMX): OpenVINO's default is f32 here, so rows off by "
                "more than 1e-5 without the hint cannot be shown")
  # The same graph compiled the plain way: OpenVINO picks bf16 on this CPU, and the rows move.
  base = fused.FusedModel(specs, freeze=False)
  plain = core.compile_model(ov.convert_model(base._forward.get_concrete_function()), "CPU")
  assert plain.get_property("INFERENCE_PRECISION_HINT").to_string() == "bf16"
  assert relative_l2(plain([images[48]])[0], want).max() > F32_BAR


def test_mixed_precision_is_bf16_within_its_stated_deviation():
  specs = [_spec("mobilenet_v2", 48)]
  images = _batch((48,))
  want = fused.FusedModel(specs)(images)
  if not openvino_engine.supports_bf16(ov.Core()):
    pytest.skip("this CPU has no bf16: test_mixed_precision_without_bf16_says_so_and_runs_f32 covers it")
  model = openvino_engine.make_engine("openvino", specs, mixed_precision=True)
  assert model.precision == "bf16"
  error = relative_l2(model(images), want).max()
  print(f"bf16 vs TensorFlow f32: max relative L2 {error:.2e}")
  assert F32_BAR < error < BF16_BAR


class _CoreWithoutBF16:
  """OpenVINO's real Core, reporting a CPU without bf16 (as AVX2-only CPUs do)."""

  def __init__(self):
    self._core = ov.Core()

  def get_property(self, device, name):
    value = self._core.get_property(device, name)
    return [c for c in value if c != "BF16"] if name == "OPTIMIZATION_CAPABILITIES" else value

  def compile_model(self, *args):
    return self._core.compile_model(*args)


def test_mixed_precision_without_bf16_says_so_and_runs_f32(caplog):
  specs = [_spec("mobilenet_v3_small", 32)]
  images = _batch((32,))
  base = fused.FusedModel(specs, freeze=False)
  with caplog.at_level(logging.WARNING, logger="transforms.openvino_engine"):
    model = openvino_engine.OpenVINOModel(base, bf16=True, core=_CoreWithoutBF16())
  lines = [r.getMessage() for r in caplog.records]
  assert len(lines) == 1 and "\n" not in lines[0] and "no bf16" in lines[0] and "running f32" in lines[0]
  assert model.precision == "f32"
  assert relative_l2(model(images), fused.FusedModel(specs)(images)).max() < F32_BAR


def test_auto_is_openvino_on_cpu_workers_where_installed_and_tensorflow_elsewhere(monkeypatch):
  assert openvino_engine.resolve_engine("auto", gpu=False, installed=True) == "openvino"
  assert openvino_engine.resolve_engine("auto", gpu=True, installed=True) == "tensorflow"
  assert openvino_engine.resolve_engine("auto", gpu=False, installed=False) == "tensorflow"
  assert openvino_engine.resolve_engine("openvino", gpu=True, installed=True) == "openvino"
  # this machine: no GPU, openvino installed
  assert openvino_engine.resolve_engine("auto") == "openvino"
  assert isinstance(openvino_engine.make_engine("auto", [_spec("mobilenet_v3_small", 32)]),
                    openvino_engine.OpenVINOModel)
  monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` fails as if not installed
  assert openvino_engine.resolve_engine("auto") == "tensorflow"
  with pytest.raises(openvino_engine.EngineUnavailable, match=r'pip install "\.\[openvino\]"'):
    openvino_engine.make_engine("openvino", [_spec("mobilenet_v3_small", 32)])


def _converter_refusing(op_type):
  """openvino.convert_model, except that it fails on a graph holding `op_type`, as on an op it lacks."""
  original = ov.convert_model  # as it is now: a test may put this converter in its place

  def convert(function):
    if op_type in {op.type for op in function.graph.get_operations()}:
      raise RuntimeError(f"Check failed: no translator for {op_type}\n(and more lines)")
    return original(function)
  return convert


def test_a_model_openvino_cannot_convert_falls_back_under_auto_and_fails_naming_the_backbone(caplog):
  # mobilenet_v3_small's graph holds BiasAdd, mobilenet_v2's does not: the converter fails on the
  # second backbone only.
  specs = [_spec("mobilenet_v2", 32), _spec("mobilenet_v3_small", 32)]
  convert = _converter_refusing("BiasAdd")
  images = _batch((32,))
  with caplog.at_level(logging.WARNING, logger="transforms.openvino_engine"):
    model = openvino_engine.make_engine("auto", specs, convert=convert)
  assert type(model) is fused.FusedModel and model._frozen is not None  # TensorFlow's usual model
  lines = [r.getMessage() for r in caplog.records]
  assert len(lines) == 1 and "\n" not in lines[0]
  assert "backbone mobilenet_v3_small" in lines[0] and "no translator for BiasAdd" in lines[0]
  assert lines[0].endswith("running on TensorFlow")
  assert model(images).shape == (5, 1280 + 576)
  with pytest.raises(openvino_engine.ConversionError) as raised:
    openvino_engine.make_engine("openvino", specs, convert=convert)
  assert str(raised.value) == ("OpenVINO cannot convert backbone mobilenet_v3_small: RuntimeError: "
                               "Check failed: no translator for BiasAdd")


def test_engine_openvino_without_the_package_is_one_line_and_exit_2(tmp_path):
  code = ("import sys\nsys.modules['openvino'] = None\nfrom pipeline import cli\n"
          "cli.main(sys.argv[1:])\n")
  result = subprocess.run(
      [sys.executable, "-c", code, "--input", str(SAMPLES / "*.jpg"), "--output", str(tmp_path / "o"),
       "--backbones", "mobilenet_v3_small", "--weights", "random", "--engine", "openvino"],
      capture_output=True, text=True, cwd=REPO, timeout=300)
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "--engine openvino" in lines[0] and 'pip install ".[openvino]"' in lines[0], lines
  assert not (tmp_path / "o").exists()


def _run(out, *extra):
  return run(["--input", str(SAMPLES / "*.jpg"), "--output", str(out), "--backbones", "mobilenet_v2",
              "--weights", "random", "--image-size", "48", "--batch-size", "3", *extra])


def _layouts(out):
  """The layout of _SUCCESS.json, checked equal to the Parquet metadata's."""
  layout = json.loads(pq.read_schema(sorted(pathlib.Path(out).glob("embeddings-*"))[0]).metadata[LAYOUT_KEY])
  assert read_summary(str(out))["layout"] == layout
  return layout


@pytest.fixture
def builds(monkeypatch):
  """The specs openvino_engine.build is called with, and the thread each call ran in."""
  calls, build = [], openvino_engine.build
  monkeypatch.setattr(openvino_engine, "build",
                      lambda spec: calls.append((spec.engine, threading.current_thread().name)) or build(spec))
  return calls


SMALL_RUN = ("--backbones", "mobilenet_v3_small", "--weights", "random", "--image-size", "32", "--batch-size", "3")


def _small_run(out, *extra):
  return run(["--input", str(SAMPLES / "*.jpg"), "--output", str(out), *SMALL_RUN, *extra])


def test_a_local_run_records_the_engine_that_ran_built_once_ahead_beside_the_first_stages(tmp_path, builds):
  assert _small_run(tmp_path / "auto", "--engine", "auto") == 0
  layout = _layouts(tmp_path / "auto")
  # this machine has no GPU and has OpenVINO: auto is openvino here, and the layout says so
  assert (layout["engine"], layout["engine_requested"]) == ("openvino", "auto")
  # one build, made by the thread launch started, and the one the embed stage used
  assert builds == [("openvino", "build-model-ahead")]
  assert _small_run(tmp_path / "tf") == 0
  assert (_layouts(tmp_path / "tf")["engine"], _layouts(tmp_path / "tf")["engine_requested"]) == (
      "tensorflow", "tensorflow")
  # f32 rows of the engines are interchangeable: a refresh on tensorflow of the auto run reuses them
  builds.clear()
  assert _small_run(tmp_path / "again", "--previous", str(tmp_path / "auto")) == 0
  again = read_summary(str(tmp_path / "again"))
  assert again["refresh"]["reused"] is True and again["counts"]["carried_over"] == len(list(SAMPLES.glob("*.jpg")))
  assert builds == []  # nothing to embed, nothing built, not even ahead


def test_a_model_openvino_cannot_convert_is_one_line_at_launch_under_openvino(tmp_path, monkeypatch, capsys, builds):
  monkeypatch.setattr(ov, "convert_model", _converter_refusing("BiasAdd"))  # mobilenet_v3_small holds BiasAdd
  assert _small_run(tmp_path / "o", "--engine", "openvino") == 2
  assert capsys.readouterr().err.splitlines() == [
      "embed-images: error: --engine openvino: OpenVINO cannot convert backbone mobilenet_v3_small: "
      "RuntimeError: Check failed: no translator for BiasAdd"]
  assert builds == [] and not (tmp_path / "o").exists()


def test_under_auto_a_model_openvino_cannot_convert_runs_and_is_recorded_on_tensorflow(tmp_path, monkeypatch,
                                                                                       caplog, builds):
  converts = []
  refusing = _converter_refusing("BiasAdd")
  monkeypatch.setattr(ov, "convert_model", lambda function: converts.append(1) or refusing(function))
  with caplog.at_level(logging.WARNING, logger="transforms.openvino_engine"):
    assert _small_run(tmp_path / "o", "--engine", "auto") == 0
  lines = [r.getMessage() for r in caplog.records if r.name == "transforms.openvino_engine"]
  assert len(lines) == 1 and "backbone mobilenet_v3_small" in lines[0] and lines[0].endswith("running on TensorFlow")
  layout = _layouts(tmp_path / "o")
  assert (layout["engine"], layout["engine_requested"]) == ("tensorflow", "auto")
  # converted at launch only (the fused graph, then the backbone alone to name it): the build is TensorFlow's
  assert len(converts) == 2 and builds == [("tensorflow", "build-model-ahead")]


def test_with_the_model_cache_off_a_local_run_converts_once_at_launch_and_builds_from_it(tmp_path, monkeypatch,
                                                                                        builds):
  monkeypatch.setenv(model_cache.CACHE_ENV, "off")
  converts, convert = [], ov.convert_model
  monkeypatch.setattr(ov, "convert_model", lambda function: converts.append(1) or convert(function))
  assert _small_run(tmp_path / "o", "--engine", "openvino") == 0
  assert _layouts(tmp_path / "o")["engine"] == "openvino"
  # the launch's conversion (it checks the model converts) is the one the build ahead compiles
  assert len(converts) == 1 and builds == [("openvino", "build-model-ahead")]


def _rows(out):
  table = pq.read_table(sorted(pathlib.Path(out).glob("embeddings-*.parquet"))).sort_by("uri")
  return table.column("uri").to_pylist(), embedding_matrix(table.column("embedding"))


def test_multi_process_openvino_run_matches_tensorflow_and_records_the_engine(tmp_path):
  assert _run(tmp_path / "tf") == 0
  assert _run(tmp_path / "ov", "--engine", "openvino", "--direct_running_mode=multi_processing",
              "--direct_num_workers=2") == 0
  uris, tf_rows = _rows(tmp_path / "tf")
  ov_uris, ov_rows = _rows(tmp_path / "ov")
  assert ov_uris == uris and len(uris) == len(list(SAMPLES.glob("*.jpg")))
  assert relative_l2(ov_rows, tf_rows).max() < F32_BAR
  summary = read_summary(str(tmp_path / "ov"))
  layout = json.loads(pq.read_schema(sorted((tmp_path / "ov").glob("embeddings-*"))[0]).metadata[LAYOUT_KEY])
  assert summary["layout"] == layout
  assert layout["engine"] == "openvino" and layout["versions"]["openvino"] == openvino_engine.openvino_version()
  assert all(v["openvino"] == layout["versions"]["openvino"] for v in summary.get("worker_versions", []))
  # f32 rows of the two engines are interchangeable: a refresh on the other engine reuses them
  assert _run(tmp_path / "again", "--engine", "openvino", "--previous", str(tmp_path / "tf")) == 0
  again = read_summary(str(tmp_path / "again"))
  assert again["refresh"]["reused"] is True and again["counts"]["carried_over"] == len(uris)


LIBRARY_MODEL = dict(weights="random", image_size=32)
LIBRARY_BACKBONES = ["mobilenet_v3_small", "mobilenet_v2"]


def _each_close_to_tensorflow(joined):
  """A matcher over (uri, {"tensorflow": [vector], engine: [vector], ...}): every engine's vector
  within 1e-5 of TensorFlow's, every uri there once per engine."""
  assert len(joined) == 5, [uri for uri, _ in joined]
  for uri, by_engine in joined:
    assert sorted(by_engine) == ["handler", "openvino", "tensorflow"], uri
    assert all(len(vectors) == 1 for vectors in by_engine.values()), uri
    want = np.asarray(by_engine["tensorflow"][0])
    assert np.linalg.norm(want) > 0  # a row with something in it: the comparison means something
    for engine in ("openvino", "handler"):
      got = np.asarray(by_engine[engine][0])
      assert got.dtype == np.float32 and got.shape == want.shape == (576 + 1280,)
      assert relative_l2(got[None], want[None]).max() < F32_BAR, (uri, engine)


def test_embed_images_and_the_model_handler_on_openvino_equal_tensorflow_rows(monkeypatch):
  import apache_beam as beam
  from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
  from apache_beam.testing.test_pipeline import TestPipeline as BeamPipeline
  from apache_beam.testing.util import assert_that
  from PIL import Image

  from embed_images import BackbonesModelHandler, EmbedImages

  photos = [str(p) for p in sorted(SAMPLES.glob("*.jpg"))[:5]]
  tensorflow = EmbedImages(LIBRARY_BACKBONES, **LIBRARY_MODEL, batch_size=3)
  openvino = EmbedImages(LIBRARY_BACKBONES, **LIBRARY_MODEL, batch_size=3, engine="openvino")
  assert (tensorflow.layout["engine"], openvino.layout["engine"]) == ("tensorflow", "openvino")
  handler = BackbonesModelHandler(LIBRARY_BACKBONES, **LIBRARY_MODEL, engine="openvino")
  assert handler.layout["engine"] == "openvino"
  assert isinstance(handler.load_model(), openvino_engine.OpenVINOModel)
  arrays = [np.asarray(Image.open(uri).convert("RGB")) for uri in photos]
  # The local runner runs in this process: count the images OpenVINO itself embedded.
  on_openvino, call = [], openvino_engine.OpenVINOModel.__call__
  monkeypatch.setattr(openvino_engine.OpenVINOModel, "__call__",
                      lambda self, images: on_openvino.append(len(images[32])) or call(self, images))
  with BeamPipeline() as p:
    uris = p | "Uris" >> beam.Create(photos)
    rows = {engine: (uris | f"Embed_{engine}" >> embed | f"Key_{engine}" >> beam.Map(lambda e: (e.uri, e.embedding)))
            for engine, embed in (("tensorflow", tensorflow), ("openvino", openvino))}
    rows["handler"] = (p | "Arrays" >> beam.Create(list(zip(photos, arrays)))
                       | RunInference(KeyedModelHandler(handler))
                       | beam.MapTuple(lambda uri, result: (uri, result.inference)))
    assert_that(rows | beam.CoGroupByKey(), _each_close_to_tensorflow)
  assert sum(on_openvino) == 2 * len(photos)  # EmbedImages's and the handler's, and no more


def test_engine_arguments_of_the_library_name_the_argument(monkeypatch):
  from embed_images import BackbonesModelHandler, EmbedImages
  with pytest.raises(ValueError, match=r"`engine` must be one of tensorflow, openvino, auto; received: 'cuda'"):
    EmbedImages(LIBRARY_BACKBONES, **LIBRARY_MODEL, engine="cuda")
  with pytest.raises(ValueError, match=r"`engine` must be one of tensorflow, openvino, auto; received: 'ov'"):
    BackbonesModelHandler(LIBRARY_BACKBONES, **LIBRARY_MODEL, engine="ov")
  # two engines' models are two shared models: the engine is in the spec, so in the Shared key
  assert repr(EmbedImages(LIBRARY_BACKBONES, **LIBRARY_MODEL).model) != repr(
      EmbedImages(LIBRARY_BACKBONES, **LIBRARY_MODEL, engine="openvino").model)
  monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` fails as if not installed
  for make in (EmbedImages, BackbonesModelHandler):
    with pytest.raises(openvino_engine.EngineUnavailable, match=r'`engine` openvino .* pip install "\.\[openvino\]"'):
      make(LIBRARY_BACKBONES, **LIBRARY_MODEL, engine="openvino")
  # auto is fine without the package: workers without it run TensorFlow
  assert EmbedImages(LIBRARY_BACKBONES, **LIBRARY_MODEL, engine="auto").model.engine == "auto"


def test_a_converted_model_is_cached_by_what_it_is_made_of_and_read_back_without_building(cache_dir, monkeypatch):
  specs = [_spec("mobilenet_v3_small", 32), _spec("mobilenet_v2", 40)]
  images = _batch((32, 40))
  want = fused.FusedModel(specs)(images)
  first = openvino_engine.make_engine("openvino", specs)(images)
  entries = [p.name for p in cache_dir.iterdir() if p.name.startswith("openvino-")]
  assert entries == [openvino_engine.model_key(specs, "avg", "none")]
  assert sorted(p.name for p in (cache_dir / entries[0]).iterdir()) == ["model.bin", "model.xml"]

  def no_build(*args, **kwargs):
    raise AssertionError("a cached model must not be built again")
  monkeypatch.setattr(fused.FusedModel, "__init__", no_build)
  cached = openvino_engine.make_engine("openvino", specs)
  assert cached.precision == "f32" and cached.dim == 576 + 1280 and cached.sizes == (32, 40)
  again = cached(images)
  np.testing.assert_array_equal(again, first)  # the same graph, weights kept in f32 (not fp16)
  assert relative_l2(again, want).max() < F32_BAR
  # what changes the graph changes the key: another pooling, normalize, weights or size is another model
  keys = {openvino_engine.model_key(specs, "max", "none"), openvino_engine.model_key(specs, "avg", "l2"),
          openvino_engine.model_key([_spec("mobilenet_v3_small", 48), specs[1]], "avg", "none"),
          openvino_engine.model_key(specs, "avg", "none")}
  assert len(keys) == 4
  with pytest.raises(AssertionError, match="must not be built"):
    openvino_engine.make_engine("openvino", specs, pooling="max")


def test_the_model_cache_can_be_turned_off_and_a_damaged_entry_is_converted_again(cache_dir, monkeypatch, caplog):
  specs = [_spec("mobilenet_v3_small", 32)]
  images = _batch((32,))
  monkeypatch.setenv(model_cache.CACHE_ENV, "off")
  openvino_engine.make_engine("openvino", specs)
  assert not cache_dir.exists()
  monkeypatch.setenv(model_cache.CACHE_ENV, str(cache_dir))
  want = openvino_engine.make_engine("openvino", specs)(images)
  entry = cache_dir / openvino_engine.model_key(specs, "avg", "none")
  (entry / "model.xml").write_text("<not a model")
  with caplog.at_level(logging.WARNING, logger="transforms.model_cache"):
    got = openvino_engine.make_engine("openvino", specs)(images)
  assert any("could not read" in r.getMessage() for r in caplog.records)
  np.testing.assert_array_equal(got, want)
  assert (entry / "model.xml").read_text().startswith("<?xml")  # made again, and written again
