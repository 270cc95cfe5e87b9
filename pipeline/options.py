"""Command-line options, their launch-time validation, and the run configuration handed to workers."""

import argparse
import dataclasses
import datetime
import json
import logging
import os
import sys
import time
from typing import Optional

from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.transforms import resources

from transforms import decode, manifest, refresh
from transforms.backbones import BACKBONES, get_backbone
from transforms.weights import WeightsSource, resolve_weights

DEFAULT_BACKBONES = "vgg16,inception_v3,resnet50"
OUTPUT_FILE_PATTERNS = ("embeddings-*.parquet", "errors-*.parquet", "_SUCCESS.json")


class LaunchError(ValueError):
  """A bad option or launch condition: printed as one line, exit status 2."""


def _bool_value(text):
  value = str(text).strip().lower()
  if value in ("true", "1", "yes"):
    return True
  if value in ("false", "0", "no"):
    return False
  raise argparse.ArgumentTypeError(f"expected true or false; received: {text!r}")


def _flag(parser, name, **kwargs):
  # Beam's PipelineOptions.from_dictionary (Dataflow, templates) rebuilds flags
  # from dests, i.e. with underscores; registering both spellings keeps a
  # hyphenated option's value through that round trip instead of resetting it.
  spellings = ["--" + name]
  if "-" in name:
    spellings.append("--" + name.replace("-", "_"))
  if kwargs.get("action") == "store_true":
    # Also --flag=true / --flag=false: the form a Flex Template launcher passes.
    del kwargs["action"]
    kwargs.update(nargs="?", const=True, type=_bool_value)
  parser.add_argument(*spellings, dest=name.replace("-", "_"), **kwargs)


class EmbedOptions(PipelineOptions):
  """Options of `embed-images`; every Beam pipeline option passes through as well."""

  @classmethod
  def _add_argparse_args(cls, parser):
    _flag(parser, "input", action="append", default=None,
          help="Glob of image files, local or gs:// ('**' allowed). Repeatable.")
    _flag(parser, "output", default=None,
          help="Output directory (local or gs://).")
    _flag(parser, "backbones", default=DEFAULT_BACKBONES,
          help="Comma list of backbone names; order = order in the vector.")
    _flag(parser, "weights", default="imagenet",
          help="imagenet | random | a directory of weight files (local or gs://).")
    _flag(parser, "pooling", default="avg", help="avg | max")
    _flag(parser, "image-size", type=int, default=None,
          help="One square input size for all backbones (default: each its native size).")
    _flag(parser, "batch-size", type=int, default=32, help="Images per model call.")
    _flag(parser, "resize", default="squash",
          help="squash (the Keras recipe) | center-crop | pad")
    _flag(parser, "fast-decode", action="store_true", default=False,
          help="Pillow's reduced JPEG decode for large photos (faster, not exact).")
    _flag(parser, "max-pixels", type=int, default=decode.PIL_MAX_PIXELS,
          help="Reject images with more pixels than this before decoding.")
    _flag(parser, "decode-timeout", type=float, default=60.0,
          help="Seconds after which one file's decode is given up as a failure.")
    _flag(parser, "max-failure-fraction", type=float, default=0.05,
          help="Failure budget; above it the run exits non-zero.")
    _flag(parser, "overwrite", action="store_true", default=False,
          help="Replace a previous run's files in --output.")
    _flag(parser, "read-threads", type=int, default=16,
          help="Reads in flight per worker (GCS reads are latency-bound).")
    _flag(parser, "decode-threads", type=int, default=0,
          help="Decode threads per worker (0: one per CPU core).")
    _flag(parser, "accelerator", default=None,
          help="Beam accelerator resource hint for the read-decode-embed stage, "
               "e.g. 'type:nvidia-l4;count:1;install-nvidia-driver'.")
    _flag(parser, "embed-min-ram", default=None,
          help="Beam min_ram resource hint for the read-decode-embed stage, e.g. 16GB.")
    _flag(parser, "allow-tf32", action="store_true", default=False,
          help="Allow TensorFloat-32 on GPU (faster, about 1e-3 off).")
    _flag(parser, "mixed-precision", action="store_true", default=False,
          help="Run the backbones in mixed_float16 on GPU (faster, less exact).")
    _flag(parser, "num-shards", type=int, default=0,
          help="Number of embeddings files (0: the runner decides).")
    _flag(parser, "row-group-size", type=int, default=8192,
          help="Rows per Parquet row group.")
    _flag(parser, "progress", default="auto", help="auto | on | off: tqdm progress bars.")
    _flag(parser, "input-manifest", default=None,
          help="CSV, JSONL or Parquet file (local or gs://) with a 'uri' column; other columns "
               "are carried to the output rows. Instead of --input.")
    _flag(parser, "label-from-dir", action="store_true", default=False,
          help="Add a 'label' column: each file's parent folder name.")
    _flag(parser, "dedupe", action="store_true", default=False,
          help="Embed each distinct file content once; every uri still gets its row.")
    _flag(parser, "normalize", default="none",
          help="none | l2: L2-normalise each backbone's part before concatenation.")
    _flag(parser, "previous", default=None,
          help="An earlier run's output: rows of unchanged files are carried over.")
    _flag(parser, "ignore-bad-previous", action="store_true", default=False,
          help="A missing or partial --previous is ignored with a warning instead of refused.")


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
  name: str
  size: int
  weights: WeightsSource


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Everything a worker needs, validated; pickled into the DoFns explicitly."""
  inputs: tuple
  output: str
  backbones: tuple  # of BackboneSpec
  pooling: str = "avg"
  batch_size: int = 32
  resize: str = "squash"
  fast_decode: bool = False
  max_pixels: Optional[int] = decode.PIL_MAX_PIXELS
  decode_timeout: float = 60.0
  max_failure_fraction: float = 0.05
  read_threads: int = 16
  decode_threads: int = 0
  accelerator: Optional[str] = None
  embed_min_ram: Optional[str] = None
  allow_tf32: bool = False
  mixed_precision: bool = False
  num_shards: int = 0
  row_group_size: int = 8192
  progress: bool = False
  started_at: float = 0.0
  normalize: str = "none"
  extra_fields: tuple = ()  # pyarrow Fields carried from a manifest or --label-from-dir
  manifest: Optional[str] = None
  manifest_schema: object = None  # pyarrow.Schema fixed at launch, so every worker reads the same types
  label_from_dir: bool = False
  dedupe: bool = False
  previous: Optional[str] = None  # set only when the previous run's rows are valid for this one
  refresh: Optional[dict] = None  # what happened to --previous, and why; goes into _SUCCESS.json

  @property
  def sizes(self):
    return tuple(sorted({b.size for b in self.backbones}))

  @property
  def dim(self):
    return sum(get_backbone(b.name).dim for b in self.backbones)

  def layout(self):
    """What a reader needs to interpret the vector, in Parquet metadata and _SUCCESS.json."""
    entries, offset = [], 0
    for spec in self.backbones:
      backbone = get_backbone(spec.name)
      entries.append({
          "name": spec.name,
          "offset": offset,
          "dim": backbone.dim,
          "input_size": spec.size,
          "preprocessing": backbone.preprocessing,
          "weights": spec.weights.kind,
          "weights_fingerprint": spec.weights.fingerprint,
      })
      offset += backbone.dim
    return {
        "dim": offset,
        "backbones": entries,
        "pooling": self.pooling,
        "normalize": self.normalize,
        "resize": self.resize,
        "fast_decode": self.fast_decode,
        "mixed_precision": self.mixed_precision,
        "allow_tf32": self.allow_tf32,
        "versions": package_versions(),
    }


def package_versions():
  import apache_beam
  import keras
  import PIL
  import pyarrow
  versions = {
      "python": sys.version.split()[0],
      "apache_beam": apache_beam.__version__,
      "keras": keras.__version__,
      "pillow": PIL.__version__,
      "pyarrow": pyarrow.__version__,
  }
  try:
    import tensorflow as tf
    versions["tensorflow"] = tf.__version__
  except ImportError:
    pass
  return versions


def _check_choice(option, value, choices):
  if value not in choices:
    raise LaunchError(
        f"--{option} must be one of {', '.join(choices)}; received: {value!r}")


def _check_positive(option, value, minimum=1):
  if value is None or value < minimum:
    raise LaunchError(f"--{option} must be at least {minimum}; received: {value!r}")


def check_inputs_match(patterns):
  """Each --input must match at least one file; asks for one match only, never a listing."""
  for pattern in patterns:
    try:
      result = FileSystems.match([pattern], limits=[1])[0]
    except Exception as e:  # a missing bucket, a malformed path: say which --input
      raise LaunchError(f"--input {pattern!r} could not be matched: {e}".splitlines()[0])
    if not result.metadata_list:
      hint = ""
      if any(c in pattern for c in "[*?") and FileSystems.exists(pattern):
        hint = "; a file of that exact name exists, but [ ] * ? are glob characters in --input: write [[] for ["
      raise LaunchError(f"--input {pattern!r} matched no file{hint}")


def existing_outputs(output):
  found = []
  for pattern in OUTPUT_FILE_PATTERNS:
    try:
      result = FileSystems.match([FileSystems.join(output, pattern)])[0]
    except Exception:
      continue
    found.extend(m.path for m in result.metadata_list)
  return found


def prepare_output(output, overwrite):
  """Refuse to mix two runs in one directory; with --overwrite, clear the old run first."""
  found = existing_outputs(output)
  if found and not overwrite:
    raise LaunchError(
        f"--output {output!r} already holds a previous run ({len(found)} files, e.g. "
        f"{os.path.basename(found[0])}); choose another directory or pass --overwrite")
  if found:
    # _SUCCESS.json first: if the deletion is interrupted, the remains read as partial.
    found.sort(key=lambda p: not p.endswith("_SUCCESS.json"))
    FileSystems.delete(found)


def build_config(options: PipelineOptions, check_files=True) -> RunConfig:
  """Validates the options; raises LaunchError with one line naming the option and value."""
  opts = options.view_as(EmbedOptions)
  if not opts.input and not opts.input_manifest:
    raise LaunchError("--input (a glob of image files) or --input-manifest is required; received: none")
  if opts.input and opts.input_manifest:
    raise LaunchError(f"give either --input or --input-manifest, not both; received: --input {opts.input[0]!r} "
                      f"and --input-manifest {opts.input_manifest!r}")
  if not opts.output:
    raise LaunchError("--output is required (a directory); received: none")
  names = [n.strip() for n in (opts.backbones or "").split(",") if n.strip()]
  if not names:
    raise LaunchError(f"--backbones must name at least one backbone; received: {opts.backbones!r}")
  for name in names:
    if name not in BACKBONES:
      raise LaunchError(
          f"--backbones: unknown backbone {name!r}; valid names: {', '.join(BACKBONES)}")
  if len(set(names)) != len(names):
    raise LaunchError(f"--backbones names a backbone twice; received: {opts.backbones!r}")
  _check_choice("pooling", opts.pooling, ("avg", "max"))
  _check_choice("resize", opts.resize, decode.RESIZE_POLICIES)
  _check_choice("progress", opts.progress, ("auto", "on", "off"))
  _check_choice("normalize", opts.normalize, ("none", "l2"))
  _check_positive("batch-size", opts.batch_size)
  _check_positive("read-threads", opts.read_threads)
  _check_positive("decode-threads", opts.decode_threads, minimum=0)
  _check_positive("num-shards", opts.num_shards, minimum=0)
  _check_positive("row-group-size", opts.row_group_size)
  if opts.embed_min_ram is not None:
    try:
      resources.parse_resource_hints({"min_ram": opts.embed_min_ram})
    except ValueError:  # else a traceback from with_resource_hints while the graph is built
      raise LaunchError(f"--embed-min-ram must be a size with a unit, e.g. 16GB or 16GiB; "
                        f"received: {opts.embed_min_ram!r}") from None
  if opts.max_pixels is not None and opts.max_pixels <= 0:
    opts.max_pixels = None  # --max-pixels 0 disables the check
  if not opts.decode_timeout or opts.decode_timeout <= 0:
    raise LaunchError(f"--decode-timeout must be a positive number of seconds; received: {opts.decode_timeout!r}")
  if not 0.0 <= opts.max_failure_fraction <= 1.0:
    raise LaunchError(
        f"--max-failure-fraction must be between 0 and 1; received: {opts.max_failure_fraction!r}")

  specs = []
  for name in names:
    backbone = get_backbone(name)
    size = opts.image_size or backbone.native_size
    if size < backbone.min_size:
      raise LaunchError(
          f"--image-size {size} is too small for {name}: its minimum is {backbone.min_size}")
    try:
      weights = resolve_weights(opts.weights, name, size)
    except ValueError as e:
      raise LaunchError(str(e).splitlines()[0]) from None
    specs.append(BackboneSpec(name, size, weights))

  manifest_schema, extra = None, ()
  if opts.input_manifest:
    try:
      manifest_schema = manifest.manifest_schema(opts.input_manifest)
    except ValueError as e:
      raise LaunchError(str(e).splitlines()[0]) from None
    extra = manifest.extra_fields(manifest_schema)
  if opts.label_from_dir:
    if any(f.name == "label" for f in extra):
      raise LaunchError(f"--label-from-dir: --input-manifest {opts.input_manifest!r} has a 'label' column already")
    extra = extra + (manifest.LABEL_FIELD,)

  if check_files and opts.input:
    check_inputs_match(opts.input)

  progress = {"on": True, "off": False}.get(opts.progress)
  if progress is None:
    runner = options.get_all_options().get("runner") or "DirectRunner"
    progress = "Direct" in str(runner) and sys.stderr.isatty()

  config = RunConfig(
      inputs=tuple(opts.input or ()),
      output=opts.output.rstrip("/"),
      backbones=tuple(specs),
      pooling=opts.pooling,
      batch_size=opts.batch_size,
      resize=opts.resize,
      fast_decode=bool(opts.fast_decode),
      max_pixels=opts.max_pixels,
      decode_timeout=float(opts.decode_timeout),
      max_failure_fraction=float(opts.max_failure_fraction),
      read_threads=opts.read_threads,
      decode_threads=opts.decode_threads or (os.cpu_count() or 1),
      accelerator=opts.accelerator,
      embed_min_ram=opts.embed_min_ram,
      allow_tf32=bool(opts.allow_tf32),
      mixed_precision=bool(opts.mixed_precision),
      num_shards=opts.num_shards,
      row_group_size=opts.row_group_size,
      progress=progress,
      started_at=time.time(),
      normalize=opts.normalize,
      extra_fields=extra,
      manifest=opts.input_manifest,
      manifest_schema=manifest_schema,
      label_from_dir=bool(opts.label_from_dir),
      dedupe=bool(opts.dedupe),
  )
  if opts.previous:
    config = _with_previous(config, opts.previous.rstrip("/"), opts.ignore_bad_previous)
  return config


def _with_previous(config, previous, ignore_bad):
  """Checks --previous at launch: reuse its rows, re-embed everything (model changed), or refuse."""
  if previous == config.output:
    raise LaunchError(f"--previous {previous!r} is the --output directory; write the refresh elsewhere")
  try:
    summary = refresh.read_previous_summary(previous)
  except refresh.PreviousRunError as e:
    if not ignore_bad:
      raise LaunchError(f"{e}; pass --ignore-bad-previous to embed everything instead") from None
    reason = f"ignored: {e}"
    logging.warning("--previous: %s; embedding everything", reason)
    return dataclasses.replace(config, refresh={"previous": previous, "reused": False, "reason": reason})
  reason = refresh.model_difference(summary["layout"], config.layout())
  if reason:
    logging.warning("--previous %s: %s; re-embedding everything", previous, reason)
    return dataclasses.replace(config, refresh={"previous": previous, "reused": False, "reason": reason})
  return dataclasses.replace(config, previous=previous,
                             refresh={"previous": previous, "reused": True, "reason": "same model"})


def describe(config: RunConfig) -> str:
  started = datetime.datetime.fromtimestamp(config.started_at, datetime.timezone.utc)
  return json.dumps({"started": started.isoformat(), "layout": config.layout()}, indent=2)
