"""EmbedImages in a user's own pipeline: keyed and unkeyed, uris and bytes, errors, windows, streaming, and RunInference."""

import hashlib
import subprocess
import sys

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_pipeline import TestPipeline as BeamPipeline
from apache_beam.testing.test_stream import TestStream as Stream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms import window
from PIL import Image

from embed_images import BackbonesModelHandler, EmbedImages, Embedding, ImageError
from pipeline.main import run
from pipeline.reader import read_embeddings
from tests import hostile
from tests.corpus import SAMPLES
from tests.recipe import relative_l2

MODEL = dict(weights="random", image_size=32)
BACKBONES = ["mobilenet_v3_small", "mobilenet_v2"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """The sample photos, a garbage file and a hostile one (100 Mpx behind a 256x256 ICNS header)."""
  root = tmp_path_factory.mktemp("images")
  photos = []
  for path in sorted(SAMPLES.glob("*.jpg"))[:4]:
    (root / path.name).write_bytes(path.read_bytes())
    photos.append(str(root / path.name))
  (root / "garbage.txt").write_bytes(b"<html>not an image</html>")
  (root / "bomb.icns").write_bytes(hostile.icns_with_inner_png(hostile.blank_png(10_000, 10_000, complete=False)))
  return {"photos": photos, "garbage": str(root / "garbage.txt"), "bomb": str(root / "bomb.icns"), "root": root}


@pytest.fixture(scope="module")
def cli_rows(files, tmp_path_factory):
  """uri -> vector, as the command line embeds the photos."""
  out = tmp_path_factory.mktemp("cli") / "out"
  assert run(["--input", f"{files['root']}/*.jpg", "--output", str(out), "--backbones", ",".join(BACKBONES),
              "--weights", "random", "--image-size", "32"]) == 0
  rows = read_embeddings(str(out))
  return dict(zip(rows.uris, rows.vectors)), rows.layout


def _close_to(want: dict, key_of=lambda e: e.uri):
  """A matcher: every output's vector within 1e-5 of `want[key]`, every key once."""
  def check(outputs):
    got = {}
    for output in outputs:
      key, embedding = output if isinstance(output, tuple) else (key_of(output), output)
      assert isinstance(embedding, Embedding) and embedding.embedding.dtype == np.float32
      got[key] = embedding.embedding
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for key, vector in got.items():
      assert relative_l2(vector[None], want[key][None]).max() < 1e-5, key
  return check


def test_uris_and_bytes_keyed_and_unkeyed_equal_the_command_line(files, cli_rows):
  want, layout = cli_rows
  embed = EmbedImages(BACKBONES, **MODEL, batch_size=3)
  assert embed.layout["dim"] == layout["dim"] == 576 + 1280
  assert [(b["name"], b["offset"], b["dim"]) for b in embed.layout["backbones"]] == [
      (b["name"], b["offset"], b["dim"]) for b in layout["backbones"]]
  photos = files["photos"]
  data = {uri: open(uri, "rb").read() for uri in photos}
  with BeamPipeline() as p:
    uris = p | "Uris" >> beam.Create(photos) | "EmbedUris" >> embed
    assert_that(uris, _close_to(want), label="uris")
    keyed = p | "Keyed" >> beam.Create([(f"id-{i}", uri) for i, uri in enumerate(photos)]) | "EmbedKeyed" >> embed
    assert_that(keyed, _close_to({f"id-{i}": want[uri] for i, uri in enumerate(photos)}), label="keyed")
    raw = p | "Bytes" >> beam.Create([data[uri] for uri in photos]) | "EmbedBytes" >> embed
    # bytes come out with no uri: matched to the command line's rows by content
    by_sha = {hashlib.sha256(data[u]).hexdigest(): want[u] for u in photos}
    assert_that(raw, _close_to(by_sha, key_of=lambda e: e.sha256 if e.uri is None else "uri set"), label="bytes")
    keyed_bytes = (p | "KeyedBytes" >> beam.Create([(i, data[uri]) for i, uri in enumerate(photos)])
                   | "EmbedKeyedBytes" >> embed)
    assert_that(keyed_bytes, _close_to({i: want[uri] for i, uri in enumerate(photos)}), label="keyed bytes")


def test_bad_images_land_in_errors_beside_good_ones(files, cli_rows):
  want, _ = cli_rows
  missing = str(files["root"] / "gone.jpg")
  inputs = [*files["photos"], files["garbage"], files["bomb"], missing]
  with BeamPipeline() as p:
    main, errors = (p | beam.Create([(uri, uri) for uri in inputs])
                    | EmbedImages(BACKBONES, **MODEL, batch_size=2).with_exception_handling())
    assert_that(main, _close_to(want), label="main")
    kinds = errors | beam.MapTuple(lambda key, e: (key, e.uri, e.stage, e.error_type, isinstance(e, ImageError)))
    assert_that(kinds, equal_to([
        (files["garbage"], files["garbage"], "decode", "unidentified_image", True),
        (files["bomb"], files["bomb"], "decode", "decompression_bomb", True),
        (missing, missing, "read", "FileNotFoundError", True)]), label="errors")


def test_without_exception_handling_a_bad_image_fails_the_pipeline_naming_it(files):
  with pytest.raises(Exception, match=r"garbage\.txt: decode failed \(unidentified_image\)"):
    with BeamPipeline() as p:
      _ = p | beam.Create([files["photos"][0], files["garbage"]]) | EmbedImages(BACKBONES[:1], **MODEL)


def _where(element, w=beam.DoFn.WindowParam, t=beam.DoFn.TimestampParam):
  key, value = element
  return key, type(value).__name__, float(w.start), float(w.end), float(t)


def test_each_output_keeps_its_window_and_timestamp_errors_too(files):
  photos = files["photos"]
  stamped = [(photos[0], 2.0), (photos[1], 3.5), (photos[2], 12.0), (files["garbage"], 14.0), (photos[3], 25.0)]
  with BeamPipeline() as p:
    main, errors = (p | beam.Create(stamped)
                    | beam.MapTuple(lambda uri, t: window.TimestampedValue((uri, uri), t))
                    | beam.WindowInto(window.FixedWindows(10))
                    | EmbedImages(BACKBONES[:1], **MODEL, batch_size=32).with_exception_handling())
    assert_that(main | "WhereMain" >> beam.Map(_where), equal_to([
        (photos[0], "Embedding", 0, 10, 2.0), (photos[1], "Embedding", 0, 10, 3.5),
        (photos[2], "Embedding", 10, 20, 12.0), (photos[3], "Embedding", 20, 30, 25.0)]), label="main")
    assert_that(errors | "WhereErrors" >> beam.Map(_where),
                equal_to([(files["garbage"], "ImageError", 10, 20, 14.0)]), label="errors")
    # Per window, a downstream aggregation sees its own rows only.
    counts = main | beam.combiners.Count.Globally().without_defaults()
    assert_that(counts, equal_to([2, 1, 1]), label="per window")


def test_a_streaming_pipeline_gives_each_window_its_rows(files):
  photos = files["photos"]
  stream = (Stream()
            .advance_watermark_to(0)
            .add_elements([window.TimestampedValue(photos[0], 1), window.TimestampedValue(photos[1], 4)])
            .advance_watermark_to(11)
            .add_elements([window.TimestampedValue(photos[2], 15)])
            .advance_watermark_to_infinity())
  options = PipelineOptions()
  options.view_as(StandardOptions).streaming = True
  with BeamPipeline(options=options) as p:
    rows = (p | stream
            | beam.WindowInto(window.FixedWindows(10))
            | EmbedImages(BACKBONES[:1], **MODEL, batch_size=32, max_batch_duration_secs=1)
            | beam.Map(lambda e, w=beam.DoFn.WindowParam, t=beam.DoFn.TimestampParam:
                       (e.uri, float(w.start), float(t))))
    assert_that(rows, equal_to([(photos[0], 0, 1), (photos[1], 0, 4), (photos[2], 10, 15)]))


class _Clock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def test_a_batch_is_sent_when_its_oldest_image_has_waited_long_enough(files):
  """The DoFn driven by hand with an injected clock: a trickle is never held for a full batch."""
  clock = _Clock()
  embed = EmbedImages(BACKBONES[:1], **MODEL, batch_size=32, max_batch_duration_secs=5, clock=clock)
  dofn = embed._dofn()
  dofn.setup()
  try:
    dofn.start_bundle()
    where = dict(window=window.GlobalWindow(), timestamp=0)
    assert list(dofn.process(files["photos"][0], **where)) == []  # arrived at 0: not due
    clock.now = 4.9
    assert list(dofn.process(files["photos"][1], **where)) == []  # the oldest waited 4.9 s
    clock.now = 5.0
    out = list(dofn.process(files["photos"][2], **where))  # the oldest waited 5 s: all three go
    assert [v.value.uri for v in out] == files["photos"][:3]
    assert list(dofn.process(files["photos"][3], **where)) == []  # a new batch starts its own wait
    assert [v.value.uri for v in dofn.finish_bundle()] == [files["photos"][3]]  # the bundle's end sends the rest
  finally:
    dofn.teardown()


def test_run_inference_with_the_model_handler_equals_embed_images(files, cli_rows):
  want, _ = cli_rows
  arrays = [np.asarray(Image.open(uri).convert("RGB")) for uri in files["photos"]]
  handler = BackbonesModelHandler(BACKBONES, **MODEL)
  assert handler.layout["dim"] == 576 + 1280
  with BeamPipeline() as p:
    results = (p | beam.Create(list(zip(files["photos"], arrays)))
               | RunInference(KeyedModelHandler(handler))
               | beam.MapTuple(lambda uri, result: (uri, Embedding(uri, "", 0, 0, result.inference))))
    assert_that(results, _close_to(want))


def test_resource_hints_go_on_the_read_decode_embed_step():
  from tests.dataflow_dry_run import resource_hints_by_transform
  p = beam.Pipeline()
  _ = (p | beam.Create(["a.jpg"])
       | "Embed" >> EmbedImages(BACKBONES[:1], **MODEL).with_resource_hints(accelerator="type:nvidia-l4;count:1"))
  hinted = {name for name, hints in resource_hints_by_transform(p.to_runner_api()).items() if hints}
  assert hinted == {"Embed", "Embed/ReadDecodeEmbed", "Embed/ReadDecodeEmbed/ParDo(_EmbedDoFn)"}


def test_bad_arguments_name_the_argument_and_the_value():
  with pytest.raises(ValueError, match=r"`backbones`: unknown backbone 'resnet5'"):
    EmbedImages("resnet5", weights="random")
  with pytest.raises(ValueError, match=r"`pooling` must be avg or max; received: 'mean'"):
    EmbedImages(BACKBONES, weights="random", pooling="mean")
  with pytest.raises(ValueError, match=r"`image_size` 16 is too small for mobilenet_v3_small: its minimum is 32"):
    EmbedImages(BACKBONES, weights="random", image_size=16)


def test_importing_and_using_the_library_prints_nothing():
  code = ("import apache_beam as beam\n"
          "from embed_images import EmbedImages, read_embeddings\n"
          "e = EmbedImages('mobilenet_v3_small', weights='random', image_size=32)\n"
          "print(e.layout['dim'])\n")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert (result.stdout, result.stderr) == ("576\n", "")
