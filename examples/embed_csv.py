"""Example: your own Beam pipeline embeds a CSV of (id, uri) rows with EmbedImages and writes Parquet where you choose.

    python examples/embed_csv.py --csv products.csv --output /tmp/products \
        [--backbones mobilenet_v2] [--weights imagenet] [--image-size N] [any Beam pipeline option]

products.csv has a header line `id,uri`; uris are local paths or gs:// objects. Rows go to
OUTPUT/vectors-*.parquet (id, uri, embedding), bad images to OUTPUT/errors-*.parquet.
"""

import argparse
import csv
import io

import apache_beam as beam
import pyarrow as pa
from apache_beam.options.pipeline_options import PipelineOptions

from embed_images import EmbedImages


def parse(line):
  row = next(csv.reader(io.StringIO(line)))
  return row[0], row[1]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--csv", required=True)
  parser.add_argument("--output", required=True)
  parser.add_argument("--backbones", default="mobilenet_v2")
  parser.add_argument("--weights", default="imagenet")
  parser.add_argument("--image-size", type=int, default=None)
  args, beam_args = parser.parse_known_args(argv)

  embed = EmbedImages(args.backbones, weights=args.weights, image_size=args.image_size)
  vectors = pa.schema([("id", pa.string()), ("uri", pa.string()),
                       ("embedding", pa.list_(pa.float32(), embed.layout["dim"]))])
  errors = pa.schema([("id", pa.string()), ("uri", pa.string()), ("stage", pa.string()),
                      ("error_type", pa.string()), ("message", pa.string())])
  with beam.Pipeline(options=PipelineOptions(beam_args)) as p:
    rows, failed = (p
                    | "ReadCsv" >> beam.io.ReadFromText(args.csv, skip_header_lines=1)
                    | "Parse" >> beam.Map(parse)  # (id, uri): keyed, so the id comes back with its vector
                    | "Embed" >> embed.with_exception_handling())
    _ = (rows
         | "Row" >> beam.MapTuple(lambda id_, e: {"id": id_, "uri": e.uri, "embedding": e.embedding})
         | "WriteVectors" >> beam.io.WriteToParquet(f"{args.output}/vectors", vectors, file_name_suffix=".parquet"))
    _ = (failed
         | "ErrorRow" >> beam.MapTuple(lambda id_, e: {"id": id_, "uri": e.uri, "stage": e.stage,
                                                        "error_type": e.error_type, "message": e.message})
         | "WriteErrors" >> beam.io.WriteToParquet(f"{args.output}/errors", errors, file_name_suffix=".parquet"))


if __name__ == "__main__":
  main()
