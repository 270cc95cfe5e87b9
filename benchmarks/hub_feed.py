"""What a KerasHub preset's full-image path costs: decode reply bytes and speed, converter vs the bare forward pass, as ratios."""

import pathlib
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
SAMPLES = sorted((ROOT / "samples").glob("*.jpg"))


def _best(fn, repeat=5):
  times = []
  for _ in range(repeat):
    started = time.perf_counter()
    fn()
    times.append(time.perf_counter() - started)
  return min(times)


def main(batch=32, size=112):
  import keras_hub
  from transforms import decode, hub
  from transforms.weights import BackboneSpec
  datas = [p.read_bytes() for p in SAMPLES] * (batch // len(SAMPLES) + 1)
  datas = datas[:batch]
  resized = _best(lambda: [decode.decode_and_resize(d, [size]) for d in datas])
  full = _best(lambda: [decode.decode_and_resize(d, [hub.FULL_IMAGE]) for d in datas])
  images = [decode.decode_and_resize(d, [hub.FULL_IMAGE, size]) for d in datas]
  full_bytes = np.mean([i.arrays[hub.FULL_IMAGE].nbytes for i in images])
  print(f"decode, full image vs resized to {size}: {resized / full:.2f}x the speed; reply bytes "
        f"{full_bytes / images[0].arrays[size].nbytes:.1f}x ({full_bytes / 1e6:.2f} MB an image)")
  with tempfile.TemporaryDirectory() as tmp:
    backbone = keras_hub.models.ViTBackbone(image_shape=(size, size, 3), patch_size=16, num_layers=2, num_heads=2,
                                            hidden_dim=64, mlp_dim=128)
    backbone.save_to_preset(tmp)
    keras_hub.layers.ViTImageConverter(image_size=(size, size), scale=1 / 127.5, offset=-1.0).save_to_preset(tmp)
    spec = hub.resolve_preset("vit", tmp, None, "avg", directory=True)
    model, converter = hub.load_features(spec), hub.Converter(spec)
    import tensorflow as tf
    forward = tf.function(lambda x: model(x, training=False))
    full_batch = [i.arrays[hub.FULL_IMAGE] for i in images]
    x = converter(full_batch)
    forward(x)
    bare = _best(lambda: forward(x).numpy())
    both = _best(lambda: forward(converter(full_batch)).numpy())
    print(f"small ViT at {size}, batch {batch}: bare forward {batch / bare:.0f} img/s; converter + forward "
          f"{batch / both:.0f} img/s ({bare / both:.2f}x the bare forward)")


if __name__ == "__main__":
  sys.exit(main())
