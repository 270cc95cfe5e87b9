"""TensorFlow against OpenVINO, one backbone of each registry family: the bare forward of the model each engine runs.

    python benchmarks/engines.py [--size 224] [--batches 2] [--passes 2] [--families vgg16,resnet50,...]

For each backbone, in a process of its own (TensorFlow's graphs and OpenVINO's compiled models of
one backbone never share a process with the next): the fused model exactly as the pipeline builds
it for `--engine tensorflow` (FusedModel: frozen where transforms/fused.py freezes) and for
`--engine openvino` (OpenVINOModel, f32), seeded random weights, the same random uint8 batches of
32 at --size px. Each engine is called once per batch shape first; then --passes timed passes over
the --batches batches, the engines alternating pass by pass; each engine's best pass counts.

It prints, per backbone, both rates, OpenVINO / TensorFlow, the relative L2 between the two
engines' rows, and the build time of each (TensorFlow: build, trace, freeze; OpenVINO: the same
build, then convert and compile; the model cache is off). `--engine auto` could become the default
only if OpenVINO is at least as fast for every family here (issue 24).
"""

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

# One backbone of each keras.applications family in the registry (transforms/backbones.py).
FAMILIES = ("vgg16", "resnet50", "resnet50_v2", "inception_v3", "inception_resnet_v2", "xception", "mobilenet",
            "mobilenet_v2", "mobilenet_v3_small", "densenet121", "nasnet_mobile", "efficientnet_b0",
            "efficientnet_v2_b0", "convnext_tiny")


def child(name, size, n_batches, passes):
  os.environ["EMBED_IMAGES_MODEL_CACHE"] = "off"
  import numpy as np
  from transforms import openvino_engine
  from transforms.weights import BackboneSpec, resolve_weights
  specs = [BackboneSpec(name, size, resolve_weights("random", name, size))]
  engines, builds = {}, {}
  for engine in ("tensorflow", "openvino"):
    started = time.perf_counter()
    engines[engine] = openvino_engine.make_engine(engine, specs)
    builds[engine] = time.perf_counter() - started
  rng = np.random.default_rng(0)
  batches = [{size: rng.integers(0, 256, (32, size, size, 3), dtype=np.uint8)} for _ in range(n_batches)]
  outputs = {engine: model(batches[0]) for engine, model in engines.items()}  # the first call of each
  best = {engine: float("inf") for engine in engines}
  for _ in range(passes):
    for engine, model in engines.items():
      started = time.perf_counter()
      for batch in batches:
        model(batch)
      best[engine] = min(best[engine], time.perf_counter() - started)
  # In float64: random weights can leave a backbone's pooled values near 1e-19, whose squares underflow float32.
  tf_rows, ov_rows = (np.asarray(outputs[e], np.float64) for e in ("tensorflow", "openvino"))
  rel = float(np.max(np.linalg.norm(tf_rows - ov_rows, axis=1) / np.linalg.norm(tf_rows, axis=1)))
  images = 32 * n_batches
  return {"name": name, "tensorflow": images / best["tensorflow"], "openvino": images / best["openvino"],
          "relative_l2": rel, "build_tensorflow": builds["tensorflow"], "build_openvino": builds["openvino"],
          "ov_class": type(engines["openvino"]).__name__}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--batches", type=int, default=2, help="batches of 32 per timed pass")
  parser.add_argument("--passes", type=int, default=2)
  parser.add_argument("--families", default=",".join(FAMILIES))
  parser.add_argument("--child", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    print("RESULT " + json.dumps(child(args.child, args.size, args.batches, args.passes)))
    return
  import platform
  print(f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}; {args.size} px, batches of 32, "
        f"{args.batches} a pass, best of {args.passes} passes; seeded random weights")
  print(f"{'backbone':22s} {'TF img/s':>9s} {'OV img/s':>9s} {'OV/TF':>6s} {'rel L2':>8s} {'TF build':>9s} {'OV build':>9s}")
  slower = []
  for name in args.families.split(","):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--size", str(args.size),
           "--batches", str(args.batches), "--passes", str(args.passes)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
      print(f"{name:22s} failed (rc {done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
      slower.append(name)
      continue
    r = json.loads(lines[-1][len("RESULT "):])
    if r["ov_class"] != "OpenVINOModel":
      print(f"{name:22s} OpenVINO could not convert it: ran on TensorFlow")
      slower.append(name)
      continue
    ratio = r["openvino"] / r["tensorflow"]
    if ratio < 1:
      slower.append(name)
    print(f"{name:22s} {r['tensorflow']:9.1f} {r['openvino']:9.1f} {ratio:6.2f} {r['relative_l2']:8.1e} "
          f"{r['build_tensorflow']:8.1f}s {r['build_openvino']:8.1f}s", flush=True)
  print("OpenVINO at least as fast for every family measured" if not slower
        else f"OpenVINO slower (or not run) for: {', '.join(slower)}")


if __name__ == "__main__":
  main()
