"""Throughput of embed-images against the bare forward pass, plain Keras and Beam RunInference, in one run.

    python benchmarks/throughput.py [--n 1024] [--backbones mobilenet_v2] [--batch-size 32] [--repeats 3]
                                    [--engine openvino]
    python benchmarks/throughput.py --hub small|tiny|PRESET_DIR [--n 256] ...   (a ViT-family KerasHub backbone)

On the same N and 2N JPEGs (500x375, quality 90, made from samples/*.jpg and cached in a temp
directory), the same backbones and the same seeded random weights, it times:

  1. bare:   the forward pass alone, a tf.function over pre-decoded uint8 batches (cast and the
             family's preprocess_input inside): the limit;
  2. keras:  load_img + img_to_array + preprocess_input + model.predict, batch by batch, then one
             Parquet file;
  3. runinference: Beam's RunInference (KeyedModelHandler + TFModelHandlerNumpy, SAVED_WEIGHTS with
             create_model_fn) after a decode Map, then WriteToParquet, on the local FnApiRunner;
  4. pipeline: `embed-images --input ... --output ... --weights random` as a subprocess.

With --engine openvino, also (`pip install ".[openvino]"`):
  6. bare-openvino: the same batches through transforms/openvino_engine.py's OpenVINOModel, f32,
             and bf16 where the CPU has it;
  7. pipeline-openvino: 4 with --engine openvino; 7b pipeline-openvino-bf16: with
             --mixed-precision as well (only where the CPU has bf16).

2, 3 and 4 each run as a whole child process, timed from start to exit (imports, model building
and pipeline start-up included), at N and at 2N: "whole" is N / t(N), "marginal" is
N / (t(2N) - t(N)), the rate once start-up is paid. 1 runs in a child too, but times only the
forward loop after a warm-up. Peak RSS is the sum over the child's whole process tree, sampled
every 200 ms (plus the largest single process, from wait4). Parquet's share of a pipeline run is
measured in-process by timing the sink's methods and the Arrow table building (mode
pipeline-sink). Every output is read back and compared with plain Keras's, row by row, so the
four sides are known to compute the same thing.

With --hub, the backbone is a KerasHub preset instead (`tiny`: a 2-layer, 64-dim DINOv2 at 112 px;
`small`: dinov2_small's architecture, 12 layers x 384 at 224 px; both with DINOv2's converter
settings, bicubic + antialias + crop, and seeded random weights, saved once under --cache-dir; or a
preset directory). Then 1 is the preset's converter and backbone in one tf.function over pre-decoded
full-size uint8 batches (the model the pipeline runs), 1b the backbone alone on floats converted
beforehand, 2 KerasHub's recipe (the converter on each `img_to_array(load_img(path))`, then
the backbone, batch by batch), 4 and 5 the pipeline and EmbedImages with `--model hubvit=DIR`;
RunInference (3) is left out: TFModelHandlerNumpy takes one fixed-size tensor.
"""

import argparse
import glob
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

IMAGE_SIZE = (500, 375)
JPEG_QUALITY = 90
IMAGE_SEED = 20240605
MODES = ("bare", "keras", "runinference", "pipeline", "library")
HUB_NAME = "hubvit"  # the --model name of a --hub preset
TITLES = {
    "bare": "1 bare forward (tf.function, uint8 batches)",
    "bare-frozen": "1f bare forward, weights frozen",
    "bare-backbone": "1b bare backbone alone (converted floats)",
    "keras": "2 plain Keras (load_img..predict)",
    "runinference": "3 Beam RunInference + WriteToParquet",
    "pipeline": "4 embed-images (this pipeline)",
    "library": "5 EmbedImages in a user's own pipeline",
    "bare-openvino": "6 bare forward, OpenVINO f32",
    "bare-openvino-bf16": "6b bare forward, OpenVINO bf16",
    "pipeline-openvino": "7 embed-images --engine openvino",
    "pipeline-openvino-bf16": "7b ... --engine openvino --mixed-precision",
}
OPENVINO_MODES = ("bare-openvino", "pipeline-openvino", "pipeline-openvino-bf16")
# Rows of the table that come from a bare child's timed variants: row -> (mode, variant).
# The bare child's variants are its result's "passes" keys; a row shows only where its variant ran
# (--hub: variables and backbone; otherwise variables and frozen).
BARE_ROWS = {"bare": ("bare", "variables"), "bare-frozen": ("bare", "frozen"), "bare-backbone": ("bare", "backbone"),
             "bare-openvino": ("bare-openvino", "f32"), "bare-openvino-bf16": ("bare-openvino", "bf16")}
# The file each bare row's vectors are saved in (uris.json beside it).
BARE_FILES = {"bare-frozen": "embeddings-frozen.npy", "bare-backbone": "embeddings-backbone.npy"}


# ---------------------------------------------------------------------------------------------
# Images


def make_images(count, cache_dir):
  """The first `count` benchmark JPEGs (generated once, deterministically, then reused)."""
  from PIL import Image, ImageEnhance
  pool = os.path.join(cache_dir, f"pool-{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}-q{JPEG_QUALITY}-s{IMAGE_SEED}")
  os.makedirs(pool, exist_ok=True)
  sources = sorted(glob.glob(os.path.join(REPO, "samples", "*.jpg")))
  if not sources:
    raise SystemExit(f"no samples/*.jpg under {REPO}")
  photos = [Image.open(p).convert("RGB") for p in sources]
  paths = []
  for i in range(count):
    path = os.path.join(pool, f"{i:06d}.jpg")
    paths.append(path)
    if os.path.exists(path):
      continue
    rng = random.Random(IMAGE_SEED * 1000003 + i)  # per image: the pool can grow without changing
    photo = photos[rng.randrange(len(photos))]
    w, h = photo.size
    scale = rng.uniform(0.55, 1.0)
    aspect = IMAGE_SIZE[0] / IMAGE_SIZE[1] * rng.uniform(0.85, 1.15)
    cw = min(w, max(16, round((w * h * scale * scale * aspect) ** 0.5)))
    ch = min(h, max(16, round(cw / aspect)))
    left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
    img = photo.crop((left, top, left + cw, top + ch))
    if rng.random() < 0.5:
      img = img.transpose(Image.FLIP_LEFT_RIGHT)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
      img = enhance(img).enhance(rng.uniform(0.7, 1.3))
    img = img.resize(IMAGE_SIZE, Image.BILINEAR)
    partial = path + ".partial"
    img.save(partial, "JPEG", quality=JPEG_QUALITY)
    os.replace(partial, path)
  return paths


def subset_dir(paths, n, cache_dir):
  """A directory holding (symlinks to) the first n images, for an `--input DIR/*.jpg` glob."""
  d = os.path.join(cache_dir, f"n{n}-{os.path.basename(os.path.dirname(paths[0]))}")
  if not os.path.isdir(d) or len(os.listdir(d)) != n:
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    for path in paths[:n]:
      os.symlink(path, os.path.join(d, os.path.basename(path)))
  return d


def list_images(image_dir):
  return sorted(glob.glob(os.path.join(image_dir, "*.jpg")))


# ---------------------------------------------------------------------------------------------
# Child modes (each runs in its own process)


def _specs(args):
  from transforms.backbones import get_backbone
  names = [n.strip() for n in args.backbones.split(",") if n.strip()]
  return [(name, args.image_size or get_backbone(name).native_size) for name in names]


def _preprocess_input(name):
  import importlib
  import keras
  from transforms.backbones import get_backbone
  constructor = getattr(keras.applications, get_backbone(name).constructor)
  return importlib.import_module(constructor.__module__).preprocess_input


def _seeded_model(name, size, pooling):
  from transforms.weights import load_backbone, resolve_weights
  return load_backbone(name, size, pooling, resolve_weights("random", name, size))


def _result(**fields):
  print("RESULT " + json.dumps(fields), flush=True)


def hub_preset(args) -> str:
  """The --hub preset's directory: a built-in small DINOv2 made (once) under the cache dir, or the
  directory given."""
  if args.hub not in ("tiny", "small"):
    return args.hub
  path = os.path.join(args.cache_dir, f"hub-dinov2-{args.hub}")
  if os.path.exists(os.path.join(path, "image_converter.json")):
    return path
  import keras
  import keras_hub
  keras.utils.set_random_seed(IMAGE_SEED)
  size, config = {"tiny": (112, dict(num_layers=2, hidden_dim=64, num_heads=2, intermediate_dim=128)),
                  "small": (224, dict(num_layers=12, hidden_dim=384, num_heads=6, intermediate_dim=1536))}[args.hub]
  backbone = keras_hub.models.DINOV2Backbone(patch_size=14, image_shape=(size, size, 3),
                                             position_embedding_shape=(518, 518, 3), **config)
  mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  converter = keras_hub.layers.DINOV2ImageConverter(
      image_size=(size, size), interpolation="bicubic", antialias=True, crop_to_aspect_ratio=True,
      scale=[1 / (255 * s) for s in std], offset=[-m / s for m, s in zip(mean, std)])
  partial = path + ".partial"
  shutil.rmtree(partial, ignore_errors=True)
  backbone.save_to_preset(partial)
  converter.save_to_preset(partial)
  os.replace(partial, path)
  return path


def _hub_model(args):
  """(converter, the vector model on converted floats) of the --hub preset, as the pipeline builds them."""
  import keras_hub
  from transforms import hub
  preset = hub_preset(args)
  backbone = keras_hub.models.Backbone.from_preset(preset)
  converter = keras_hub.layers.ImageConverter.from_preset(preset)
  vector = hub.vector_kind(backbone, None, args.pooling, preset)
  return converter, hub.features_model(backbone, vector, tuple(converter.image_size))


def child_bare_hub(args):
  """The limit for a preset: its converter and backbone in one tf.function over pre-decoded
  full-size uint8 batches (all benchmark images have one size), and the backbone alone on floats
  converted beforehand, passes alternating."""
  import resource
  import keras
  import numpy as np
  import tensorflow as tf
  converter, model = _hub_model(args)
  paths = list_images(args.images)
  full = np.stack([np.asarray(keras.utils.load_img(p)) for p in paths])

  @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])
  def forward(images):
    return model(converter(tf.cast(images, tf.float32)), training=False)

  @tf.function(input_signature=[tf.TensorSpec([None, *converter.image_size, 3], tf.float32)])
  def backbone(x):
    return model(x, training=False)

  bs = args.batch_size
  batches = [full[i:i + bs] for i in range(0, len(paths), bs)]
  converted = [converter(tf.cast(b, tf.float32)).numpy() for b in batches]
  variants = {"variables": lambda i: forward(batches[i]).numpy(), "backbone": lambda i: backbone(converted[i]).numpy()}
  for run in variants.values():
    run(0)
    run(len(batches) - 1)
  cpu = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
  passes = {name: [] for name in variants}
  cpus = {name: [] for name in variants}
  outputs = {}
  for _ in range(args.passes):
    for name, run in variants.items():
      started, cpu_started = time.perf_counter(), cpu()
      outputs[name] = [run(i) for i in range(len(batches))]
      passes[name].append(time.perf_counter() - started)
      cpus[name].append(cpu() - cpu_started)
  np.save(os.path.join(args.out, "embeddings.npy"), np.concatenate(outputs["variables"]))
  np.save(os.path.join(args.out, "embeddings-backbone.npy"), np.concatenate(outputs["backbone"]))
  with open(os.path.join(args.out, "uris.json"), "w") as f:
    json.dump(paths, f)
  _result(images=len(paths), passes=passes, cpus=cpus)


def child_keras_hub(args):
  """KerasHub's recipe, batch by batch: the converter on each full image as load_img gives it, then
  the backbone's vector."""
  import keras
  import numpy as np
  converter, model = _hub_model(args)
  paths = list_images(args.images)
  bs = args.batch_size
  out = []
  for i in range(0, len(paths), bs):
    x = np.concatenate([np.asarray(converter(keras.utils.img_to_array(keras.utils.load_img(p))[None]))
                        for p in paths[i:i + bs]])
    out.append(model.predict(x, batch_size=bs, verbose=0))
  _write_parquet(os.path.join(args.out, "embeddings.parquet"), paths, np.concatenate(out))
  _result(images=len(paths))


def cli_backbones(args) -> list:
  """The command line's model flags for this run."""
  if args.hub:
    return ["--backbones", HUB_NAME, "--model", f"{HUB_NAME}={hub_preset(args)}"]
  return ["--backbones", args.backbones, *(["--image-size", str(args.image_size)] if args.image_size else [])]


def _write_parquet(path, uris, embeddings):
  import numpy as np
  import pyarrow as pa
  import pyarrow.parquet as pq
  embeddings = np.ascontiguousarray(embeddings, np.float32)
  column = pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1)), embeddings.shape[1])
  pq.write_table(pa.table({"uri": uris, "embedding": column}), path)


def child_bare(args):
  """The limit: only the forward pass, on arrays decoded beforehand, after a warm-up; once with
  the weights as variables (a plain tf.function) and once frozen to constants (what
  embed-images runs for small backbones), passes alternating."""
  if args.hub:
    return child_bare_hub(args)
  import keras
  import numpy as np
  import tensorflow as tf
  from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2
  specs = _specs(args)
  paths = list_images(args.images)
  sizes = sorted({size for _, size in specs})
  arrays = {s: np.stack([np.asarray(keras.utils.load_img(p, target_size=(s, s), interpolation="bilinear"))
                         for p in paths]) for s in sizes}
  models = [(_seeded_model(name, size, args.pooling), _preprocess_input(name), size) for name, size in specs]

  @tf.function
  def forward(*batch):
    by_size = dict(zip(sizes, batch))
    parts = [model(pre(tf.cast(by_size[size], tf.float32)), training=False) for model, pre, size in models]
    return parts[0] if len(parts) == 1 else tf.concat(parts, axis=1)

  frozen = convert_variables_to_constants_v2(
      forward.get_concrete_function(*[tf.TensorSpec([None, s, s, 3], tf.uint8) for s in sizes]))
  variants = {
      "variables": lambda b: forward(*[b[s] for s in sizes]).numpy(),
      "frozen": lambda b: frozen(*[tf.convert_to_tensor(b[s]) for s in sizes])[0].numpy(),
  }
  bs = args.batch_size
  batches = [{s: arrays[s][i:i + bs] for s in sizes} for i in range(0, len(paths), bs)]
  passes, cpus, outputs = timed_passes(variants, batches, args.passes)
  np.save(os.path.join(args.out, "embeddings.npy"), np.concatenate(outputs["variables"]))
  np.save(os.path.join(args.out, "embeddings-frozen.npy"), np.concatenate(outputs["frozen"]))
  with open(os.path.join(args.out, "uris.json"), "w") as f:
    json.dump(paths, f)
  _result(images=len(paths), passes=passes, cpus=cpus)


def timed_passes(variants, batches, n_passes):
  """Each variant (a function of one batch) over every batch, `n_passes` times, alternating, after one
  call per batch shape (the last may be short) to trace it: ({name: [wall s]}, {name: [CPU s]},
  {name: its last pass's outputs})."""
  import resource
  for run in variants.values():
    for shape in {len(next(iter(b.values()))): b for b in batches}.values():
      run(shape)
  cpu = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
  passes = {name: [] for name in variants}
  cpus = {name: [] for name in variants}
  outputs = {}
  for _ in range(n_passes):
    for name, run in variants.items():
      started, cpu_started = time.perf_counter(), cpu()
      outputs[name] = [run(b) for b in batches]
      passes[name].append(time.perf_counter() - started)
      cpus[name].append(cpu() - cpu_started)
  return passes, cpus, outputs


def child_bare_openvino(args):
  """OpenVINO's limit: the engine the pipeline runs (OpenVINOModel), on the same pre-decoded batches,
  f32 and (where the CPU has it) bf16, passes alternating."""
  import keras
  import numpy as np
  import openvino as ov
  from transforms import openvino_engine
  from transforms.weights import BackboneSpec, resolve_weights
  specs = [BackboneSpec(name, size, resolve_weights("random", name, size)) for name, size in _specs(args)]
  paths = list_images(args.images)
  sizes = sorted({s.size for s in specs})
  arrays = {s: np.stack([np.asarray(keras.utils.load_img(p, target_size=(s, s), interpolation="bilinear"))
                         for p in paths]) for s in sizes}
  started = time.perf_counter()
  variants = {"f32": openvino_engine.make_engine("openvino", specs, args.pooling)}
  convert_seconds = time.perf_counter() - started
  if openvino_engine.supports_bf16(ov.Core()):
    variants["bf16"] = openvino_engine.make_engine("openvino", specs, args.pooling, mixed_precision=True)
  bs = args.batch_size
  batches = [{s: arrays[s][i:i + bs] for s in sizes} for i in range(0, len(paths), bs)]
  passes, cpus, outputs = timed_passes(variants, batches, args.passes)
  np.save(os.path.join(args.out, "embeddings.npy"), np.concatenate(outputs["f32"]))
  with open(os.path.join(args.out, "uris.json"), "w") as f:
    json.dump(paths, f)
  _result(images=len(paths), passes=passes, cpus=cpus, build_and_convert_seconds=convert_seconds)


def child_keras(args):
  """The plain recipe, the way its documentation writes it, batch by batch."""
  if args.hub:
    return child_keras_hub(args)
  import keras
  import numpy as np
  specs = _specs(args)
  paths = list_images(args.images)
  models = [(_seeded_model(name, size, args.pooling), _preprocess_input(name), size) for name, size in specs]
  bs = args.batch_size
  out = []
  for i in range(0, len(paths), bs):
    chunk = paths[i:i + bs]
    parts = []
    for model, preprocess_input, size in models:
      x = np.stack([keras.utils.img_to_array(keras.utils.load_img(
          p, target_size=(size, size), interpolation="bilinear")) for p in chunk])
      parts.append(model.predict(preprocess_input(x), batch_size=bs, verbose=0))
    out.append(np.concatenate(parts, axis=1))
  _write_parquet(os.path.join(args.out, "embeddings.parquet"), paths, np.concatenate(out))
  _result(images=len(paths))


def _weights_file(cache_dir, name, size, pooling):
  return os.path.join(cache_dir, "weights", f"{name}-{size}-{pooling}-seeded.weights.h5")


def child_prepare(args):
  """Saves the seeded models' weights, which RunInference's SAVED_WEIGHTS handler loads."""
  for name, size in _specs(args):
    path = _weights_file(args.cache_dir, name, size, args.pooling)
    if not os.path.exists(path):
      os.makedirs(os.path.dirname(path), exist_ok=True)
      _seeded_model(name, size, args.pooling).save_weights(path)
  _result(ok=True)


def child_runinference(args):
  """Beam's own answer: decode in a Map, RunInference per backbone, WriteToParquet."""
  import functools
  import types
  try:
    import tensorflow_hub  # noqa: F401  (tensorflow_inference imports it at module level)
  except ImportError:
    # Only hub.resolve(model_uri) of the SAVED_MODEL path uses it; SAVED_WEIGHTS never does.
    sys.modules["tensorflow_hub"] = types.SimpleNamespace(resolve=lambda uri: uri)
  import apache_beam as beam
  import pyarrow as pa
  from apache_beam.io import fileio
  from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
  from apache_beam.ml.inference.tensorflow_inference import ModelType, TFModelHandlerNumpy
  from apache_beam.options.pipeline_options import PipelineOptions
  from apache_beam.runners.portability.fn_api_runner import FnApiRunner

  from transforms.backbones import build_backbone, get_backbone

  specs = _specs(args)
  dim = sum(get_backbone(name).dim for name, _ in specs)
  schema = pa.schema([("uri", pa.string()), ("embedding", pa.list_(pa.float32()))])

  def decode(path, name, size):
    import keras
    x = keras.utils.img_to_array(keras.utils.load_img(path, target_size=(size, size), interpolation="bilinear"))
    return path, _preprocess_input(name)(x)

  def to_row(element):
    uri, parts = element
    if isinstance(parts, dict):  # several backbones: joined by uri, put back in order
      parts = [parts[name][0] for name, _ in specs]
    else:
      parts = [parts]
    import numpy as np
    vector = np.concatenate([np.asarray(p.inference, np.float32) for p in parts])
    return {"uri": uri, "embedding": vector.tolist()}

  # The FnApiRunner directly, as embed-images does: DirectRunner would first try to download
  # a Prism binary, which fails offline and only adds start-up time.
  with beam.Pipeline(runner=FnApiRunner(), options=PipelineOptions([])) as p:
    paths = (p
             | fileio.MatchFiles(os.path.join(args.images, "*.jpg"))
             | beam.Map(lambda m: m.path)
             | beam.Reshuffle())
    branches = {}
    for name, size in specs:
      handler = KeyedModelHandler(TFModelHandlerNumpy(
          model_uri=_weights_file(args.cache_dir, name, size, args.pooling),
          model_type=ModelType.SAVED_WEIGHTS,
          create_model_fn=functools.partial(build_backbone, name, size, args.pooling, None),
          min_batch_size=args.batch_size, max_batch_size=args.batch_size))
      branches[name] = (paths
                        | f"Decode_{name}" >> beam.Map(decode, name, size)
                        | f"RunInference_{name}" >> RunInference(handler))
    joined = branches[specs[0][0]] if len(specs) == 1 else branches | beam.CoGroupByKey()
    _ = (joined
         | beam.Map(to_row)
         | beam.io.WriteToParquet(os.path.join(args.out, "embeddings"), schema,
                                  file_name_suffix=".parquet"))
  _result(images=len(list_images(args.images)), dim=dim)


def child_library(args):
  """A user's own pipeline: beam.Create of uris, EmbedImages, WriteToParquet."""
  import apache_beam as beam
  import pyarrow as pa
  from apache_beam.options.pipeline_options import PipelineOptions
  from apache_beam.runners.portability.fn_api_runner import FnApiRunner

  from embed_images import EmbedImages

  if args.hub:
    embed = EmbedImages([HUB_NAME], models={HUB_NAME: hub_preset(args)}, pooling=args.pooling,
                        batch_size=args.batch_size)
  else:
    embed = EmbedImages(args.backbones, weights="random", image_size=args.image_size, pooling=args.pooling,
                        batch_size=args.batch_size)
  schema = pa.schema([("uri", pa.string()), ("embedding", pa.list_(pa.float32(), embed.layout["dim"]))])
  uris = list_images(args.images)
  with beam.Pipeline(runner=FnApiRunner(), options=PipelineOptions([])) as p:
    _ = (p
         | beam.Create(uris)
         | beam.Reshuffle()
         | embed
         | beam.Map(lambda e: {"uri": e.uri, "embedding": e.embedding})
         | beam.io.WriteToParquet(os.path.join(args.out, "embeddings"), schema, file_name_suffix=".parquet"))
  _result(images=len(uris), dim=embed.layout["dim"])


def child_pipeline_sink(args):
  """embed-images in this process, with the Parquet sink's methods and the Arrow tables timed."""
  import transforms.checkpoint
  from apache_beam.io import filebasedsink
  from pipeline.main import run
  from transforms import write

  spent = {}
  lock = threading.Lock()

  def timed(owner, attr, key):
    original = getattr(owner, attr)

    def wrapper(*a, **k):
      started = time.perf_counter()
      try:
        return original(*a, **k)
      finally:
        with lock:
          spent[key] = spent.get(key, 0.0) + time.perf_counter() - started
    setattr(owner, attr, wrapper)

  for attr in ("open", "write_record", "close"):
    timed(write.ParquetTableSink, attr, f"sink.{attr}")
  for attr in ("initialize_write", "pre_finalize", "finalize_write"):
    timed(filebasedsink.FileBasedSink, attr, f"sink.{attr}")
  # the embedded rows' Arrow tables are built in transforms/checkpoint.py (rows_to_table imported by name)
  timed(transforms.checkpoint, "rows_to_table", "arrow tables (rows_to_table)")
  started = time.perf_counter()
  status = run(["--input", os.path.join(args.images, "*.jpg"), "--output", args.out, *cli_backbones(args),
                "--weights", "random", "--batch-size", str(args.batch_size), "--overwrite"],
               save_main_session=False)
  _result(status=status, seconds=time.perf_counter() - started, spent=spent)


def child_prepare_hub(args):
  _result(preset=hub_preset(args))


CHILDREN = {"bare": child_bare, "bare-openvino": child_bare_openvino, "keras": child_keras,
            "prepare": child_prepare, "prepare-hub": child_prepare_hub, "runinference": child_runinference,
            "pipeline-sink": child_pipeline_sink, "library": child_library}


# ---------------------------------------------------------------------------------------------
# Parent: runs the children, measures time and memory, prints the table


def _children_of(pid):
  try:
    tasks = os.listdir(f"/proc/{pid}/task")
  except OSError:
    return []
  found = []
  for task in tasks:
    try:
      with open(f"/proc/{pid}/task/{task}/children") as f:
        found.extend(int(c) for c in f.read().split())
    except OSError:
      pass
  return found


def _tree(root):
  """The pids of root and all its descendants."""
  found, stack = [], [root]
  while stack:
    pid = stack.pop()
    if pid not in found:
      found.append(pid)
      stack.extend(_children_of(pid))
  return found


def _rss(pids):
  page = os.sysconf("SC_PAGE_SIZE")
  total = 0
  for pid in pids:
    try:
      with open(f"/proc/{pid}/statm") as f:
        total += int(f.read().split()[1]) * page
    except (OSError, IndexError, ValueError):
      pass
  return total


def _machine_busy():
  """(busy, stolen) CPU seconds of the whole machine so far, from /proc/stat; stolen is the
  time the hypervisor gave this VM's virtual CPUs to someone else."""
  with open("/proc/stat") as f:
    fields = [int(x) for x in f.readline().split()[1:]]
  tick = os.sysconf("SC_CLK_TCK")
  user, nice, system, _, _, irq, softirq, steal = fields[:8]
  return (user + nice + system + irq + softirq) / tick, steal / tick


def host_probe():
  """Milliseconds for a fixed pure-Python loop, best of 3. On a shared VM the same work takes
  up to twice as long at times (other guests on the host, not visible as load or steal here);
  this tells a run made in a slow spell from one made in a fast one."""
  best = float("inf")
  for _ in range(3):
    started = time.perf_counter()
    x = 0
    for j in range(1_000_000):
      x += j
    best = min(best, time.perf_counter() - started)
  return 1000 * best


_FASTEST_PROBE = [float("inf")]


def wait_for_quiet(limit, threshold=0.25, slack=1.15):
  """Waits (up to `limit` s) until other processes use under `threshold` cores and the host
  probe is within `slack` of the fastest seen; returns (other load in cores, probe ms)."""
  deadline = time.monotonic() + limit
  while True:
    b0, s0 = _machine_busy()
    time.sleep(0.5)
    b1, s1 = _machine_busy()
    load = (b1 - b0 + s1 - s0) / 0.5
    probe = host_probe()
    _FASTEST_PROBE[0] = min(_FASTEST_PROBE[0], probe)
    if (load < threshold and probe <= slack * _FASTEST_PROBE[0]) or time.monotonic() >= deadline:
      return load, probe


def run_child(cmd, log_path, timeout, repo=REPO):
  """Runs cmd in `repo` (by default the checkout of this script); returns wall seconds (start to
  exit), exit code, peak tree RSS, wait4 max RSS, the child tree's CPU seconds, the CPU seconds
  other processes used meanwhile, stdout."""
  peak = [0]
  env = dict(os.environ)
  # That checkout's code, whatever an editable install points at.
  env["PYTHONPATH"] = os.pathsep.join([repo] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  with open(log_path + ".out", "w") as out, open(log_path + ".err", "w") as err:
    busy_before, steal_before = _machine_busy()
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=repo, env=env)
    done = threading.Event()

    def sample():
      # Cheap enough not to show: the tree (a walk over every thread's children) is refreshed
      # once a second, the RSS of its processes read five times a second.
      pids, walked = [proc.pid], 0.0
      while not done.wait(0.2):
        if time.monotonic() - walked >= 1.0:
          pids, walked = _tree(proc.pid), time.monotonic()
        peak[0] = max(peak[0], _rss(pids))
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
      _, status, usage = os.wait4(proc.pid, 0)
    finally:
      timer.cancel()
    seconds = time.perf_counter() - started
    busy_after, steal_after = _machine_busy()
    done.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
  with open(log_path + ".out") as f:
    stdout = f.read()
  cpu = usage.ru_utime + usage.ru_stime
  return {"seconds": seconds, "rc": proc.returncode, "tree_rss": peak[0], "maxrss": usage.ru_maxrss * 1024,
          "cpu": cpu, "others": max(0.0, busy_after - busy_before - cpu), "steal": steal_after - steal_before,
          "stdout": stdout, "log": log_path}


def _result_of(child):
  for line in reversed(child["stdout"].splitlines()):
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT "):])
  return None


def _pipeline_cmd():
  script = os.path.join(os.path.dirname(sys.executable), "embed-images")
  return [script] if os.path.exists(script) else [sys.executable, "-m", "pipeline"]


def _is_pipeline_run(mode) -> bool:
  """A mode that runs the command line as a whole process (pipeline-sink is timed in-process)."""
  return mode.startswith("pipeline") and mode != "pipeline-sink"


def command(mode, args, images, out):
  common = ["--backbones", args.backbones, "--batch-size", str(args.batch_size), "--pooling", args.pooling,
            *(["--image-size", str(args.image_size)] if args.image_size else []),
            *(["--hub", args.hub] if args.hub else [])]
  if _is_pipeline_run(mode):
    engine = {"pipeline": [], "pipeline-openvino": ["--engine", "openvino"],
              "pipeline-openvino-bf16": ["--engine", "openvino", "--mixed-precision"]}[mode]
    cache = [] if getattr(args, "warm_cache", None) is None else ["env", f"EMBED_IMAGES_MODEL_CACHE={args.warm_cache}"]
    return [*cache, *_pipeline_cmd(), "--input", os.path.join(images, "*.jpg"), "--output", out, *cli_backbones(args),
            "--weights", "random", "--batch-size", str(args.batch_size), "--pooling", args.pooling,
            "--overwrite", *engine]
  return [sys.executable, os.path.abspath(__file__), "--mode", mode, "--images", images, "--out", out,
          "--cache-dir", args.cache_dir, "--passes", str(args.passes), *common]


def read_embeddings(mode, out):
  """{uri basename: vector} of a run's output."""
  import numpy as np
  import pyarrow as pa
  import pyarrow.parquet as pq
  from transforms.write import embedding_matrix
  if mode.startswith("bare"):
    with open(os.path.join(out, "uris.json")) as f:
      uris = json.load(f)
    vectors = np.load(os.path.join(out, BARE_FILES.get(mode, "embeddings.npy")))
  else:
    files = sorted(glob.glob(os.path.join(out, "embeddings*.parquet")))
    table = pq.read_table(files)
    uris = table.column("uri").to_pylist()
    column = table.column("embedding")
    if not pa.types.is_fixed_size_list(column.type):  # runinference's WriteToParquet: pa.list_, one length
      column = column.cast(pa.list_(pa.float32(), len(column[0])))
    vectors = embedding_matrix(column)
  return {os.path.basename(u): v for u, v in zip(uris, vectors)}


def _stats(values):
  values = [v for v in values if v is not None]
  if not values:
    return None
  return statistics.median(values), min(values), max(values)


def _fmt(stat, digits=1):
  if stat is None:
    return "n/a"
  med, lo, hi = stat
  return f"{med:.{digits}f} [{lo:.{digits}f}-{hi:.{digits}f}]"


def _machine():
  cpu = "?"
  with open("/proc/cpuinfo") as f:
    for line in f:
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  with open("/proc/meminfo") as f:
    mem_kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
  load = os.getloadavg()
  return (f"{os.cpu_count()} CPUs ({cpu}), {mem_kb / 2**20:.1f} GiB RAM, "
          f"load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


def orchestrate(args):
  from transforms.backbones import get_backbone  # light: no TensorFlow in the parent
  if args.hub:
    specs = [(f"KerasHub preset {args.hub}", "its converter's size, ")]
  else:
    specs = [(n.strip(), args.image_size or get_backbone(n.strip()).native_size)
             for n in args.backbones.split(",") if n.strip()]
  # RunInference (3) is left out for a preset: TFModelHandlerNumpy takes one fixed-size tensor.
  skipped = set(args.skip.split(",")) - {""} | ({"runinference"} if args.hub else set())
  modes = [m for m in MODES if m not in skipped]
  # Every run builds its model: with the cache of models (transforms/model_cache.py), the N run
  # would build and the 2N run read it back, and the difference of the two, the marginal rate,
  # would count the build as work saved. --model-cache warm: every run reads it back (below).
  os.environ["EMBED_IMAGES_MODEL_CACHE"] = "off"
  if args.engine == "openvino":
    import openvino as ov
    from transforms.openvino_engine import supports_bf16
    bf16 = supports_bf16(ov.Core())
    if not bf16:
      print("this CPU has no bf16: the OpenVINO bf16 runs are left out", flush=True)
    modes += [m for m in OPENVINO_MODES if (bf16 or not m.endswith("bf16")) and m not in args.skip.split(",")]
  sizes = (args.n, 2 * args.n)
  print(f"machine: {_machine()}", flush=True)
  print(f"backbones: {', '.join(f'{n} ({s}px)'.replace(', px', '') for n, s in specs)}; weights random (seeded); "
        f"batch {args.batch_size}; N={args.n} and 2N={2 * args.n} JPEGs {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} "
        f"q{JPEG_QUALITY}; repeats {args.repeats}", flush=True)

  paths = make_images(2 * args.n, args.cache_dir)
  image_dirs = {n: subset_dir(paths, n, args.cache_dir) for n in sizes}
  if args.hub:
    child = run_child([sys.executable, os.path.abspath(__file__), "--mode", "prepare-hub", "--hub", args.hub,
                       "--cache-dir", args.cache_dir], os.path.join(args.cache_dir, "prepare-hub"), args.timeout)
    if child["rc"] != 0:
      raise SystemExit(f"making the --hub preset failed; see {child['log']}.err")
  work = tempfile.mkdtemp(prefix="throughput-", dir=args.cache_dir)
  logs = os.path.join(work, "logs")
  os.makedirs(logs)
  print(f"images: {os.path.dirname(paths[0])}; outputs and logs: {work}", flush=True)

  if "runinference" in modes:
    child = run_child(command("prepare", args, image_dirs[args.n], work), os.path.join(logs, "prepare"),
                      args.timeout)
    if child["rc"] != 0:
      raise SystemExit(f"preparing RunInference's weights failed; see {child['log']}.err")

  if args.model_cache == "warm":
    # A cache of this run's own, filled by one untimed N run of each pipeline mode: then the N and 2N
    # runs both read their model back, and the marginal rate compares steady states. Without it the
    # build (TensorFlow's import, trace, freeze, OpenVINO's conversion) runs beside the first stages,
    # and how much of it the work hides differs between N and 2N.
    # (The pipeline runs' alone: the bare children's build figures stay builds.)
    args.warm_cache = os.path.join(work, "model-cache")
    for mode in [m for m in modes if _is_pipeline_run(m)]:
      out = os.path.join(work, f"{mode}-warm")
      child = run_child(command(mode, args, image_dirs[args.n], out), os.path.join(logs, f"{mode}-warm"),
                        args.timeout)
      if child["rc"] != 0:
        raise SystemExit(f"{mode}'s untimed run to fill the model cache exited {child['rc']}; see {child['log']}.err")
      print(f"  model cache filled by {mode} ({child['seconds']:.1f} s, untimed)", flush=True)

  _FASTEST_PROBE[0] = min(host_probe() for _ in range(5))
  runs = {m: {n: [] for n in sizes} for m in modes}
  for r in range(args.repeats):
    # The bare forward first, then the whole runs size by size, each size's modes back to back and
    # in the other order every other repeat: a drift in this machine's speed (a shared VM's steal
    # time) falls on both sides of each ratio alike, not on whichever mode always runs first.
    whole = [m for m in modes if not m.startswith("bare")]
    order = [(m, sizes[0]) for m in modes if m.startswith("bare")]
    order += [(m, n) for n in sizes for m in (whole if r % 2 == 0 else whole[::-1])]
    for mode, n in order:
      out = os.path.join(work, f"{mode}-{n}-{r}")
      os.makedirs(out, exist_ok=True)
      probe = wait_for_quiet(args.wait_quiet)[1] if args.wait_quiet else host_probe()
      child = run_child(command(mode, args, image_dirs[n], out), os.path.join(logs, f"{mode}-{n}-{r}"),
                        args.timeout)
      child["probe"] = (probe, host_probe())
      if child["rc"] != 0:
        raise SystemExit(f"{mode} at n={n} exited {child['rc']}; see {child['log']}.err")
      child["result"] = _result_of(child)
      child["out"] = out
      runs[mode][n].append(child)
      extra = ""
      if mode.startswith("bare"):
        extra = "; forward img/s " + "; ".join(
            f"{name} " + ", ".join(f"{n / x:.1f}" for x in passes)
            for name, passes in child["result"]["passes"].items())
      print(f"  repeat {r + 1}/{args.repeats} {mode:>12} n={n:<5} {child['seconds']:7.2f} s "
            f"({n / child['seconds']:6.1f} img/s whole), cpu {child['cpu']:6.1f} s, peak tree RSS "
            f"{child['tree_rss'] / 2**20:5.0f} MiB, others {child['others'] / child['seconds']:.2f} cores, "
            f"steal {child['steal']:.1f} s, probe {child['probe'][0]:.0f}/{child['probe'][1]:.0f} ms{extra}", flush=True)

  sink = None
  if "pipeline" in modes and not args.no_sink_profile:
    n = sizes[-1]
    out = os.path.join(work, f"pipeline-sink-{n}")
    child = run_child(command("pipeline-sink", args, image_dirs[n], out), os.path.join(logs, "pipeline-sink"),
                      args.timeout)
    sink = _result_of(child) if child["rc"] == 0 else None

  # -- agreement: every side computed the same embeddings
  agreement = {}
  # plain Keras's rows, or where it was skipped, the TensorFlow pipeline's
  base = "keras" if "keras" in modes else "pipeline" if "pipeline" in modes else None
  if base:
    import numpy as np
    reference = read_embeddings(base, runs[base][args.n][0]["out"])
    # the TF bare child's other variants (frozen, or with --hub the backbone alone) are rows of their own
    extra = [row for row, (child, variant) in BARE_ROWS.items() if child == "bare" and row != "bare"
             and "bare" in modes and variant in runs["bare"][args.n][0]["result"]["passes"]]
    for mode in modes + extra:
      if mode == base:
        continue
      got = read_embeddings(mode, runs[BARE_ROWS[mode][0] if mode in BARE_ROWS else mode][args.n][0]["out"])
      if set(got) != set(reference):
        agreement[mode] = f"different rows ({len(got)} vs {len(reference)})"
        continue
      errors = [np.linalg.norm(got[k].astype(np.float64) - reference[k]) /
                max(np.linalg.norm(reference[k].astype(np.float64)), 1e-30) for k in reference]
      agreement[mode] = f"max relative L2 {max(errors):.1e} over {len(errors)} rows"

  # -- the table
  rates = {}
  print()
  head = ("whole run img/s", "whole run img/s", "marginal img/s", "marginal CPU", "peak RSS MiB")
  sub = (f"at N={args.n}", f"at 2N={2 * args.n}", "N -> 2N", "ms/img", "N / 2N (tree)")
  print(f"{'':44}" + "".join(f"{h:>22}" for h in head[:3]) + f"{head[3]:>14}{head[4]:>16}")
  print(f"{'':44}" + "".join(f"{h:>22}" for h in sub[:3]) + f"{sub[3]:>14}{sub[4]:>16}")
  for mode in modes:
    if mode.startswith("bare"):
      for row, (_, variant) in ((r, v) for r, v in BARE_ROWS.items() if v[0] == mode):
        if variant not in runs[mode][args.n][0]["result"]["passes"]:
          continue
        forward = [args.n / x for c in runs[mode][args.n] for x in c["result"]["passes"][variant]]
        cpu = [1000 * x / args.n for c in runs[mode][args.n] for x in c["result"]["cpus"][variant]]
        rates[row] = {"marginal": _stats(forward), "cpu_ms": statistics.median(cpu)}
        print(f"{TITLES[row]:44}{'(forward pass only)':>22}{'':>22}{_fmt(rates[row]['marginal']):>22}"
              f"{rates[row]['cpu_ms']:>14.1f}")
      continue
    small, large = runs[mode][sizes[0]], runs[mode][sizes[1]]
    tn, t2n = [c["seconds"] for c in small], [c["seconds"] for c in large]
    marginal = [args.n / (b - a) if b > a else None for a, b in zip(tn, t2n)]
    rates[mode] = {
        "whole_n": _stats([args.n / t for t in tn]),
        "whole_2n": _stats([2 * args.n / t for t in t2n]),
        "marginal": _stats(marginal),
        "cpu_ms": statistics.median(1000 * (b["cpu"] - a["cpu"]) / args.n for a, b in zip(small, large)),
        "rss": (statistics.median(c["tree_rss"] for c in small), statistics.median(c["tree_rss"] for c in large)),
        "maxrss": (statistics.median(c["maxrss"] for c in small), statistics.median(c["maxrss"] for c in large)),
        "startup": statistics.median(a - (args.n / m if m else 0) for a, m in zip(tn, marginal)),
    }
    rss = rates[mode]["rss"]
    print(f"{TITLES[mode]:44}{_fmt(rates[mode]['whole_n']):>22}{_fmt(rates[mode]['whole_2n']):>22}"
          f"{_fmt(rates[mode]['marginal']):>22}{rates[mode]['cpu_ms']:>14.1f}"
          f"{f'{rss[0] / 2**20:.0f} / {rss[1] / 2**20:.0f}':>16}")
  others = [c["others"] / c["seconds"] for m in modes for n in sizes for c in runs[m][n]]
  print("median [min-max] over repeats. whole run = images / (process start to exit); marginal = N / (t(2N) - t(N));")
  print("marginal CPU = (CPU time of the process tree at 2N - at N) / N (bare: CPU of the forward loop / N).")
  print(f"other processes on the machine during the runs: median {statistics.median(others):.2f} cores, "
        f"max {max(others):.2f} (of {os.cpu_count()})")
  probes = [p for m in modes for n in sizes for c in runs[m][n] for p in c["probe"]]
  print(f"host probe (fixed 1e6-step Python loop) around the runs: median {statistics.median(probes):.0f} ms, "
        f"range {min(probes):.0f}-{max(probes):.0f} ms (fastest seen {_FASTEST_PROBE[0]:.0f} ms)")
  print("start-up, t(N) - N / marginal: " + ", ".join(
      f"{mode} {rates[mode]['startup']:.1f} s" for mode in modes if not mode.startswith("bare")))
  if "bare-openvino" in modes:
    print("OpenVINO build + convert + compile, in the bare child: " + ", ".join(
        f"{c['result']['build_and_convert_seconds']:.1f} s" for c in runs["bare-openvino"][args.n]))

  def per_repeat(mode, key):
    """This mode's rate in each repeat: paired ratios cancel slow spells of the host."""
    if mode in BARE_ROWS:
      child, variant = BARE_ROWS[mode]
      return [statistics.median(args.n / x for x in c["result"]["passes"][variant]) for c in runs[child][args.n]]
    small, large = runs[mode][sizes[0]], runs[mode][sizes[1]]
    if key == "whole_n":
      return [args.n / c["seconds"] for c in small]
    if key == "whole_2n":
      return [2 * args.n / c["seconds"] for c in large]
    return [args.n / (b["seconds"] - a["seconds"]) if b["seconds"] > a["seconds"] else None
            for a, b in zip(small, large)]

  def ratio(a, b, key):
    if a not in rates or b not in rates:
      return None
    pairs = [x / y for x, y in zip(per_repeat(a, key), per_repeat(b, key))
             if x and y]
    return _stats(pairs)

  print()
  print("ratios: median [min-max] over repeats, each repeat's pipeline run against the same repeat's other run")
  if args.hub:
    lines = [("4/1 pipeline / bare converter+backbone, marginal", ratio("pipeline", "bare", "marginal"), 0.90),
             ("4/1b pipeline / bare backbone alone, marginal", ratio("pipeline", "bare-backbone", "marginal"), None),
             ("1/1b bare converter+backbone / backbone alone", ratio("bare", "bare-backbone", "marginal"), None)]
  else:
    lines = [("4/1 pipeline / bare forward, marginal", ratio("pipeline", "bare", "marginal"), 0.85),
             ("4/1f pipeline / frozen bare forward, marginal", ratio("pipeline", "bare-frozen", "marginal"), 0.85)]
  if args.engine == "openvino":
    # issue 24's targets: f32 >= 1.2x for MobileNetV2 (1.15x for ResNet50), bf16 >= 2x for MobileNetV2
    f32_target = 1.15 if "resnet" in args.backbones else 1.2
    lines += [("7/4 OpenVINO f32 / TF pipeline, marginal", ratio("pipeline-openvino", "pipeline", "marginal"),
               f32_target),
              ("7b/4 OpenVINO bf16 / TF pipeline, marginal", ratio("pipeline-openvino-bf16", "pipeline", "marginal"),
               2.0),
              ("7/6 OpenVINO pipeline / its bare forward, marginal",
               ratio("pipeline-openvino", "bare-openvino", "marginal"), 0.85),
              ("7b/6b the same, bf16", ratio("pipeline-openvino-bf16", "bare-openvino-bf16", "marginal"), 0.85),
              ("6/1f OpenVINO f32 / TF frozen, bare forward", ratio("bare-openvino", "bare-frozen", "marginal"), None),
              ("6/1 OpenVINO f32 / TF variables, bare forward", ratio("bare-openvino", "bare", "marginal"), None),
              ("7/4 OpenVINO f32 / TF pipeline, whole run at 2N",
               ratio("pipeline-openvino", "pipeline", "whole_2n"), None)]
  for other, number, target in (("keras", 2, 1.5), ("runinference", 3, 2.0)):
    lines += [(f"4/{number} pipeline / {other}, whole run at N", ratio("pipeline", other, "whole_n"), target),
              (f"4/{number} pipeline / {other}, whole run at 2N", ratio("pipeline", other, "whole_2n"), target),
              (f"4/{number} pipeline / {other}, marginal", ratio("pipeline", other, "marginal"), None)]
  lines.append(("5/4 library (EmbedImages) / pipeline, marginal", ratio("library", "pipeline", "marginal"), 0.90))
  for label, value, target in lines:
    if value is not None:
      verdict = "" if target is None else f"  target >= {target:.2f}: {'met' if value[0] >= target else 'NOT met'}"
      print(f"{label:48} {_fmt(value, 2):>20}{verdict}")
  if "pipeline" in rates:
    rss, maxrss = rates["pipeline"]["rss"], rates["pipeline"]["maxrss"]
    growth = rss[1] / rss[0] - 1
    print(f"{'pipeline peak RSS, whole tree, N -> 2N':48} {rss[0] / 2**20:.0f} -> {rss[1] / 2**20:.0f} MiB "
          f"({growth:+.1%}; target < +10%: {'met' if growth < 0.10 else 'NOT met'}); largest process "
          f"{maxrss[0] / 2**20:.0f} -> {maxrss[1] / 2**20:.0f} MiB")
  if sink:
    total = sum(sink["spent"].values())
    share = total / sink["seconds"]
    print(f"{'pipeline time in Parquet writing (n=' + str(sizes[-1]) + ')':48} {total:.2f} s of "
          f"{sink['seconds']:.1f} s = {share:.1%} (target < 5%: {'met' if share < 0.05 else 'NOT met'}); "
          + ", ".join(f"{k} {v:.2f} s" for k, v in sorted(sink["spent"].items())))
  for mode, text in agreement.items():
    against = "plain Keras" if base == "keras" else TITLES[base].split(" ", 1)[1]
    print(f"{'agreement with ' + against + ': ' + mode:48} {text}")
  if not args.keep:
    shutil.rmtree(work, ignore_errors=True)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=1024, help="images in the smaller run (the other is 2N)")
  parser.add_argument("--backbones", default="mobilenet_v2")
  parser.add_argument("--image-size", type=int, default=None)
  parser.add_argument("--hub", default=None, help="a ViT-family KerasHub backbone instead of --backbones: tiny "
                      "or small (DINOv2, made once with seeded random weights), or a preset directory")
  parser.add_argument("--pooling", default="avg")
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--passes", type=int, default=2, help="timed passes of the bare forward per repeat")
  parser.add_argument("--engine", choices=("tensorflow", "openvino"), default="tensorflow",
                      help="openvino: also OpenVINO's bare forward and the pipeline with --engine openvino "
                           "(and with --mixed-precision, bf16, where the CPU has it)")
  parser.add_argument("--skip", default="", help="comma list of modes to leave out: " + ",".join(MODES))
  parser.add_argument("--no-sink-profile", action="store_true", help="skip the in-process Parquet timing run")
  parser.add_argument("--model-cache", choices=("off", "warm"), default="off",
                      help="off: every pipeline run builds its model; warm: a cache of the benchmark's own, "
                           "filled by an untimed run of each pipeline mode first, so that the marginal rate "
                           "compares steady states (the build is the bare child's figure)")
  parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "embed-images-bench"))
  parser.add_argument("--timeout", type=float, default=3600)
  parser.add_argument("--wait-quiet", type=float, default=120,
                      help="before each run, wait up to this many seconds for other processes to use "
                           "under a quarter of a core (0: don't wait)")
  parser.add_argument("--keep", action="store_true", help="keep outputs and logs")
  # child side
  parser.add_argument("--mode", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
  parser.add_argument("--images", help=argparse.SUPPRESS)
  parser.add_argument("--out", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.hub and args.engine == "openvino" and not args.mode:
    # transforms/openvino_engine.py refuses KerasHub presets under --engine openvino
    parser.error("--hub runs on TensorFlow only: OpenVINO does not run KerasHub presets (drop --engine openvino)")
  if args.mode:
    CHILDREN[args.mode](args)
  else:
    os.makedirs(args.cache_dir, exist_ok=True)
    orchestrate(args)


if __name__ == "__main__":
  main()
