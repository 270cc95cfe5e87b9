"""Example: a streaming pipeline embeds images as they arrive, in one-minute fixed windows, with EmbedImages.

    python examples/streaming.py --watch 'incoming/*.jpg' --output /tmp/stream \
        [--backbones mobilenet_v2] [--weights imagenet] [--image-size N] [--window-secs 60] \
        [--stop-after-secs S] [any Beam pipeline option]

Beam's file watcher (`fileio.MatchContinuously`) emits each new file once, stamped when it was
found; EmbedImages keeps each image in its window (batches are sent when full, after
`max_batch_duration_secs`, and at the end of every bundle, so a trickle is never held back), and
each window's vectors are written to their own files, OUTPUT/window-<start>-*.npz, by a
`WriteToFiles` sink. `--stop-after-secs` stops watching (for a demonstration or a test).
"""

import argparse
import io
import json
import time

import apache_beam as beam
import numpy as np
from apache_beam.io import fileio
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.transforms import window

from embed_images import EmbedImages


class NpzSink(fileio.FileSink):
  """A window's embeddings as one .npz: `uris` and `embeddings`."""

  def open(self, fh):
    self._fh, self._uris, self._vectors = fh, [], []

  def write(self, embedding):
    self._uris.append(embedding.uri)
    self._vectors.append(embedding.embedding)

  def flush(self):
    buffer = io.BytesIO()
    np.savez(buffer, uris=np.array(self._uris), embeddings=np.stack(self._vectors))
    self._fh.write(buffer.getvalue())


def window_name(w, pane, shard_index, total_shards, compression, destination):
  return f"window-{int(w.start)}-{shard_index:05d}-of-{total_shards:05d}.npz"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--watch", required=True, help="a glob watched for new files")
  parser.add_argument("--output", required=True)
  parser.add_argument("--backbones", default="mobilenet_v2")
  parser.add_argument("--weights", default="imagenet")
  parser.add_argument("--image-size", type=int, default=None)
  parser.add_argument("--window-secs", type=float, default=60)
  parser.add_argument("--poll-secs", type=float, default=1)
  parser.add_argument("--stop-after-secs", type=float, default=None)
  args, beam_args = parser.parse_known_args(argv)
  options = PipelineOptions(beam_args)
  options.view_as(StandardOptions).streaming = True

  embed = EmbedImages(args.backbones, weights=args.weights, image_size=args.image_size,
                      max_batch_duration_secs=args.poll_secs)
  stop = time.time() + args.stop_after_secs if args.stop_after_secs else None
  with beam.Pipeline(options=options) as p:
    _ = (p
         | "Watch" >> fileio.MatchContinuously(args.watch, interval=args.poll_secs, stop_timestamp=stop or
                                               beam.utils.timestamp.MAX_TIMESTAMP)
         | "Path" >> beam.Map(lambda metadata: metadata.path)
         | "Windows" >> beam.WindowInto(window.FixedWindows(args.window_secs))
         | "Embed" >> embed
         | "Write" >> fileio.WriteToFiles(args.output, sink=lambda _: NpzSink(), file_naming=window_name,
                                          shards=1))
  print(json.dumps({"layout_dim": embed.layout["dim"]}))


if __name__ == "__main__":
  main()
