"""Model-only images/s on a GPU with Keras 3 on JAX, and the decode side's images/s per CPU core.

    KERAS_BACKEND=jax python benchmarks/gpu_models.py [--batches 32,64,128] [--seconds 2]
                                                      [--decode-images 512] [--skip-decode]

For sizing a worker (issue 16): how many images/s one GPU takes for a model, and how many one CPU
core decodes, on the same machine. It needs Keras 3 with a JAX backend that sees the GPU, Pillow
and numpy; not TensorFlow (the TensorFlow GPU wheels are too large to carry to the machine that
has the GPU, so these are JAX figures, not our pipeline's TensorFlow graph).

  models:  each backbone with include_top=False, pooling="avg", random weights (Keras's default
           initialisers), at its native size, fed uint8 NHWC batches and preprocessed in the same
           jitted function (cast + its preprocess_input mode), as our pipeline feeds its graph.
           "resident": the batch already on the GPU (model only); "host": a fresh numpy batch from
           host memory every call (adds the host-to-GPU copy). The trio runs VGG16 + InceptionV3 +
           ResNet50 in one jitted function, concatenated, as `--backbones vgg16,inception_v3,resnet50`.
           float32 (XLA's default precision on the GPU, which may use TF32) and bfloat16 (Keras's
           mixed_bfloat16 policy).
  decode:  `transforms.decode.decode_and_resize` of the throughput benchmark's 500x375 JPEGs to
           224 px (and 224 + 299 px for the trio), in 1, 2, 4, ... processes up to the core count.

Every rate is the best of three timed rounds of about --seconds each, after a warm-up call.
"""

import argparse
import concurrent.futures
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

# Native sizes and preprocess_input modes, as transforms/backbones.py lists them.
MODELS = {
    "vgg16": ("VGG16", 224, "caffe"),
    "inception_v3": ("InceptionV3", 299, "tf"),
    "resnet50": ("ResNet50", 224, "caffe"),
    "mobilenet_v2": ("MobileNetV2", 224, "tf"),
    "mobilenet_v3_small": ("MobileNetV3Small", 224, "none"),
    "efficientnet_b0": ("EfficientNetB0", 224, "none"),
}
TRIO = ("vgg16", "inception_v3", "resnet50")


def out(line=""):
  print(line, flush=True)


def _preprocess(x, mode):
  import jax.numpy as jnp
  x = x.astype(jnp.float32)
  if mode == "caffe":  # RGB -> BGR, minus the ImageNet mean
    return x[..., ::-1] - jnp.asarray((103.939, 116.779, 123.68), jnp.float32)
  if mode == "tf":
    return x / 127.5 - 1.0
  return x


def build(names, dtype):
  import jax
  import jax.numpy as jnp
  import keras
  keras.mixed_precision.set_dtype_policy("mixed_bfloat16" if dtype == "bfloat16" else "float32")
  models = []
  for name in names:
    constructor, size, mode = MODELS[name]
    model = getattr(keras.applications, constructor)(
        include_top=False, weights=None, pooling="avg", input_shape=(size, size, 3))
    models.append((model, size, mode))
  keras.mixed_precision.set_dtype_policy("float32")
  state = [([v.value for v in m.trainable_variables], [v.value for v in m.non_trainable_variables])
           for m, _, _ in models]

  @jax.jit
  def forward(state, inputs):
    pooled = []
    for (model, _, mode), (trainable, fixed), x in zip(models, state, inputs):
      y, _ = model.stateless_call(trainable, fixed, _preprocess(x, mode), training=False)
      pooled.append(y.astype(jnp.float32))
    return jnp.concatenate(pooled, axis=-1)

  return forward, state, [size for _, size, _ in models]


def rate(call, batch, seconds):
  call().block_until_ready()  # compile and warm up
  started = time.perf_counter()
  call().block_until_ready()
  iters = max(3, int(seconds / max(time.perf_counter() - started, 1e-4)))
  best = 0.0
  for _ in range(3):
    started = time.perf_counter()
    for _ in range(iters):
      y = call()
    y.block_until_ready()
    best = max(best, iters * batch / (time.perf_counter() - started))
  return best


def model_rates(names, label, dtype, batches, seconds):
  import jax
  import numpy as np
  forward, state, sizes = build(names, dtype)
  rng = np.random.default_rng(0)
  for batch in batches:
    started = time.perf_counter()
    host = [[rng.integers(0, 256, (batch, s, s, 3), dtype=np.uint8) for s in sizes] for _ in range(4)]
    resident = [jax.device_put(x) for x in host[0]]
    r = rate(lambda: forward(state, resident), batch, seconds)
    turn = iter(range(1 << 30))
    h = rate(lambda: forward(state, host[next(turn) % 4]), batch, seconds)
    out(f"{label:34s} {dtype:9s} batch {batch:4d}   resident {r:9.0f} img/s   host-fed {h:9.0f} img/s"
        f"   ({time.perf_counter() - started:.0f} s incl. compile)")


def _decode_worker(args):
  paths, sizes, repeat = args
  from transforms.decode import decode_and_resize
  data = [open(p, "rb").read() for p in paths]
  for d in data[:8]:
    decode_and_resize(d, sizes)
  started = time.perf_counter()
  for _ in range(repeat):
    for d in data:
      decode_and_resize(d, sizes)
  return len(data) * repeat, time.perf_counter() - started


def decode_rates(n, cores):
  import PIL
  from benchmarks.throughput import make_images
  import tempfile
  paths = make_images(n, os.path.join(tempfile.gettempdir(), "embed-images-bench"))
  out(f"decode: Pillow {PIL.__version__}, {n} JPEGs 500x375 q90, each process decodes all of them")
  for sizes, label in (((224,), "224"), ((224, 299), "224+299 (trio)")):
    procs = 1
    while procs <= cores:
      with concurrent.futures.ProcessPoolExecutor(procs) as pool:
        done = list(pool.map(_decode_worker, [(paths, sizes, 2)] * procs))
      images = sum(d[0] for d in done)
      wall = max(d[1] for d in done)
      out(f"decode+resize to {label:15s} {procs:3d} processes   {images / wall:8.0f} img/s"
          f"   {images / wall / procs:6.0f} img/s per process")
      procs *= 2


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", default="32,64,128")
  parser.add_argument("--seconds", type=float, default=2.0)
  parser.add_argument("--decode-images", type=int, default=512)
  parser.add_argument("--skip-decode", action="store_true")
  parser.add_argument("--skip-models", action="store_true")
  args = parser.parse_args(argv)
  batches = [int(b) for b in args.batches.split(",")]
  cores = len(os.sched_getaffinity(0))
  out(f"machine: {cores} usable cores; {os.uname().machine}")
  if not args.skip_models:
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import jax
    import keras
    out(f"keras {keras.__version__} on {keras.backend.backend()}; jax {jax.__version__}; "
        f"devices {[d.device_kind for d in jax.devices()]}")
    model_rates(TRIO, "trio vgg16+inception_v3+resnet50", "float32", batches, args.seconds)
    model_rates(TRIO, "trio vgg16+inception_v3+resnet50", "bfloat16", batches[-1:], args.seconds)
    for name in TRIO:
      model_rates((name,), f"{name} ({MODELS[name][1]} px)", "float32", batches[-1:], args.seconds)
    for name in ("mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0"):
      model_rates((name,), f"{name} ({MODELS[name][1]} px)", "float32", (batches[0], batches[-1]), args.seconds)
  if not args.skip_decode:
    decode_rates(args.decode_images, cores)


if __name__ == "__main__":
  main()
