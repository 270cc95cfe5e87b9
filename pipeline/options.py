"""Command-line options and their validation (pure: no I/O); pipeline/config.py is what workers get."""

import argparse
import re

from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.transforms import resources

from transforms import decode, openvino_engine, shards
from transforms.decode_pool import default_memory_ceiling
from transforms.specs import parse_backbones

DEFAULT_BACKBONES = "vgg16,inception_v3,resnet50"


def _bool_value(text):
  value = str(text).strip().lower()
  if value in ("true", "1", "yes"):
    return True
  if value in ("false", "0", "no"):
    return False
  raise argparse.ArgumentTypeError(f"expected true or false; received: {text!r}")


class _Joined(argparse.Action):
  """Repeats kept as one ';'-joined string (`--model a=x --model b=y` is `--model 'a=x;b=y'`): the
  form a Flex Template parameter, which cannot repeat, and from_dictionary pass on."""

  def __call__(self, parser, namespace, values, option_string=None):
    current = getattr(namespace, self.dest, None)
    setattr(namespace, self.dest, f"{current};{values}" if current else values)


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
          help="Glob of image files or shards (.tar WebDataset, .parquet, .tfrecord[s]/.tfrec[.gz]), "
               "local or gs:// ('**' allowed). Repeatable.")
    _flag(parser, "input-format", default="auto",
          help="auto (by extension) | image | tar | parquet | tfrecord: what every --input file is.")
    _flag(parser, "image-column", default=None,
          help="Parquet shards: the column of image bytes, or of {bytes, path} structs (default: found "
               "from the schema: jpg, image, or the only binary column).")
    _flag(parser, "image-feature", default=None,
          help="TFRecord shards: the bytes feature holding the image (default: image/encoded, or the "
               "only bytes feature).")
    _flag(parser, "carry-features", default=None, metavar="NAME[,NAME]",
          help="TFRecord shards: the scalar features carried to the output rows (default: all).")
    _flag(parser, "parquet-part-rows", type=int, default=4096,
          help="Parquet shards of several row groups are read as slices of whole row groups, each of at "
               "least this many rows, spread over the workers (0: one shard, one reader).")
    _flag(parser, "output", default=None,
          help="Output directory (local or gs://).")
    _flag(parser, "backbones", default=DEFAULT_BACKBONES,
          help="Comma list of registry backbones, --model names and KerasHub presets (hub:PRESET), each "
               "optionally NAME:LAYER for that layer's pooled output (see --list-layers NAME), or, for a "
               "KerasHub transformer, :cls or :mean (see --list-backbones); order = order in the vector.")
    _flag(parser, "model", action=_Joined, metavar="NAME=PATH", help="A user model for --backbones: a "
          ".keras file, a SavedModel directory or a KerasHub preset directory, local or gs://. Repeatable, or "
          "';'-separated.")
    _flag(parser, "model-preprocessing", action=_Joined, metavar="NAME=MODE",
          help="caffe | tf | torch | none (default: the model takes 0..255 RGB). Repeatable, or ';'-separated.")
    _flag(parser, "model-output", action=_Joined, metavar="NAME=KEY",
          help="The output of a SavedModel that has several. Repeatable, or ';'-separated.")
    _flag(parser, "model-unsafe", metavar="NAME[,NAME]",
          help="Load these .keras models with safe_mode off (Lambda layers: files you trust only).")
    _flag(parser, "model-modules", metavar="MODULE[,MODULE]", help="Modules that register user models' "
          "custom Keras objects, imported at launch and on workers (install them with --setup_file).")
    _flag(parser, "weights", default="imagenet",
          help="imagenet | random | a directory of weight files (local or gs://); registry backbones only.")
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
          help="Seconds after which one file's decode is stopped (its process killed) and failed.")
    _flag(parser, "decode-memory", default=None,
          help="Memory ceiling of each decode process, with a unit (e.g. 2GiB); a file needing more "
               "fails as too_large. Default: 24 bytes per --max-pixels pixel, at least 1GiB "
               "(2GiB at the default --max-pixels, and with --max-pixels 0).")
    _flag(parser, "max-failure-fraction", type=float, default=0.05,
          help="Failure budget; above it the run exits non-zero.")
    _flag(parser, "overwrite", action="store_true", default=False,
          help="Replace a previous run's files in --output.")
    _flag(parser, "read-threads", type=int, default=16,
          help="Reads in flight per worker (GCS reads are latency-bound).")
    _flag(parser, "decode-threads", type=int, default=0,
          help="Decode processes per worker process (0: one per CPU core of that worker).")
    _flag(parser, "accelerator", default=None,
          help="Beam accelerator resource hint for the read-decode-embed stage, "
               "e.g. 'type:nvidia-l4;count:1;install-nvidia-driver'.")
    _flag(parser, "embed-min-ram", default=None,
          help="Beam min_ram resource hint for the read-decode-embed stage, e.g. 16GB.")
    _flag(parser, "allow-tf32", action="store_true", default=False,
          help="Allow TensorFloat-32 on GPU (faster, about 1e-3 off).")
    _flag(parser, "mixed-precision", action="store_true", default=False,
          help="Run the backbones in mixed_float16 on GPU, in bf16 with --engine openvino where the CPU has "
               "it (faster, less exact).")
    _flag(parser, "engine", default="tensorflow",
          help="tensorflow | openvino | auto: what runs the model. openvino: OpenVINO's CPU plugin, f32 "
               "(pip install \".[openvino]\"); auto: openvino on workers without a GPU where it is "
               "installed, else tensorflow.")
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
    _flag(parser, "previous-verify", action="store_true", default=False,
          help="With --previous, re-read and re-hash every file instead of trusting an unchanged "
               "listing (size and mtime; gs:// generation or checksums).")
    _flag(parser, "ignore-bad-previous", action="store_true", default=False,
          help="A missing or partial --previous is ignored with a warning instead of refused.")
    _flag(parser, "resume", action="store_true", default=False,
          help="Go on with an interrupted run in --output: its committed rows are reused, the rest "
               "is embedded. On a finished run it does nothing; on an empty output it starts afresh.")
    _flag(parser, "resume-verify", action="store_true", default=False,
          help="With --resume, re-read and re-hash every file instead of trusting an unchanged "
               "listing (size and mtime; gs:// generation or checksums).")
    _flag(parser, "store-retry-seconds", type=float, default=None,
          help="How long the object store may fail every request in a row (503s, 429s, resets) before "
               "the run stops with one line naming it; each process's retries share this deadline "
               "(default 120, or EMBED_IMAGES_STORE_RETRY_SECONDS).")
    _flag(parser, "checkpoint-every", type=float, default=30.0,
          help="Seconds between commits of rows under --output/_checkpoints/ (also every 4096 rows "
               "per worker); what a killed run loses at most. 0 turns checkpoints off.")


class LaunchError(ValueError):
  """A bad option or launch condition: printed as one line, exit status 2."""


_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
               "t": 10**12, "tb": 10**12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_size(option: str, text: str) -> int:
  """'2GiB', '1.5GB', '512MiB' -> bytes; a LaunchError naming `option` otherwise."""
  match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
  unit = match and _SIZE_UNITS.get(match.group(2).lower())
  if not match or not unit or not match.group(2):
    raise LaunchError(f"--{option} must be a size with a unit, e.g. 2GiB or 1500MB; received: {text!r}")
  return int(float(match.group(1)) * unit)


# Stages name their own arguments in their errors (`weights`); the command line names its flags.
_FLAGS = {"`weights`": "--weights", "`backbones`": "--backbones", "`manifest`": "--input-manifest",
          "`previous`": "--previous", "`layer`": "--backbones layer", "`image_size`": "--image-size",
          "`output`": "--model-output", "`modules`": "--model-modules", "`model`": "--model",
          "`image_column`": "--image-column", "`image_feature`": "--image-feature",
          "`carry_features`": "--carry-features"}


def as_flags(error: Exception) -> str:
  """A stage's error message, first line, with its argument names worded as this tool's flags."""
  text = str(error).splitlines()[0] if str(error) else type(error).__name__
  for argument, flag in _FLAGS.items():
    text = text.replace(argument, flag)
  return text


def _check_choice(option, value, choices):
  if value not in choices:
    raise LaunchError(
        f"--{option} must be one of {', '.join(choices)}; received: {value!r}")


def _check_positive(option, value, minimum=1):
  if value is None or value < minimum:
    raise LaunchError(f"--{option} must be at least {minimum}; received: {value!r}")


def backbone_names(opts, models=()) -> list:
  """The --backbones entries as transforms.specs.parse_backbones gives them (entry, registry or
  `models` name or hub:PRESET, layer or None); `models`: the names --model registers
  (launch.user_models parses those options)."""
  try:
    return parse_backbones(opts.backbones or "", models, opts.image_size)
  except ValueError as e:
    raise LaunchError(as_flags(e)) from None


def validate(opts, models=()) -> dict:
  """Checks every option that needs no I/O; returns the normalised values RunConfig takes."""
  if not opts.input and not opts.input_manifest:
    raise LaunchError("--input (a glob of image files) or --input-manifest is required; received: none")
  if opts.input and opts.input_manifest:
    raise LaunchError(f"give either --input or --input-manifest, not both; received: --input {opts.input[0]!r} "
                      f"and --input-manifest {opts.input_manifest!r}")
  if not opts.output:
    raise LaunchError("--output is required (a directory); received: none")
  if opts.image_size is not None:
    _check_positive("image-size", opts.image_size)
  backbone_names(opts, models)
  _check_choice("pooling", opts.pooling, ("avg", "max"))
  _check_choice("resize", opts.resize, decode.RESIZE_POLICIES)
  _check_choice("progress", opts.progress, ("auto", "on", "off"))
  _check_choice("normalize", opts.normalize, ("none", "l2"))
  _check_choice("engine", opts.engine, openvino_engine.ENGINES)
  if opts.engine == "openvino" and not openvino_engine.openvino_installed():
    raise LaunchError(f"--engine openvino needs the openvino package, which is not installed here: "
                      f"{openvino_engine.INSTALL}")
  _check_choice("input-format", opts.input_format, ("auto", "image", *shards.FORMATS))
  if opts.input_manifest and opts.input_format != "auto":
    raise LaunchError(f"--input-format goes with --input; received: --input-format {opts.input_format!r} "
                      f"with --input-manifest")
  for option in ("image_column", "image_feature", "carry_features"):
    value = getattr(opts, option)
    if value is not None and not str(value).strip(" ,"):
      raise LaunchError(f"--{option.replace('_', '-')} must name something; received: {value!r}")
  _check_positive("batch-size", opts.batch_size)
  _check_positive("read-threads", opts.read_threads)
  _check_positive("decode-threads", opts.decode_threads, minimum=0)
  _check_positive("num-shards", opts.num_shards, minimum=0)
  _check_positive("row-group-size", opts.row_group_size)
  _check_positive("parquet-part-rows", opts.parquet_part_rows, minimum=0)
  if opts.embed_min_ram is not None:
    try:
      resources.parse_resource_hints({"min_ram": opts.embed_min_ram})
    except ValueError:  # else a traceback from with_resource_hints while the graph is built
      raise LaunchError(f"--embed-min-ram must be a size with a unit, e.g. 16GB or 16GiB; "
                        f"received: {opts.embed_min_ram!r}") from None
  max_pixels = opts.max_pixels
  if max_pixels is not None and max_pixels < 0:
    raise LaunchError(f"--max-pixels must be a number of pixels, or 0 for no pixel limit; received: {max_pixels!r}")
  max_pixels = max_pixels or None  # 0 lifts the pixel checks (never the memory ceiling)
  if opts.decode_memory is None:
    memory = default_memory_ceiling(max_pixels)
  else:
    memory = parse_size("decode-memory", opts.decode_memory)
    if memory < 64 << 20:
      raise LaunchError(f"--decode-memory must be at least 64MiB (a decode process needs that to start); "
                        f"received: {opts.decode_memory!r}")
  if opts.store_retry_seconds is not None and not opts.store_retry_seconds > 0:
    raise LaunchError(f"--store-retry-seconds must be a positive number of seconds; received: "
                      f"{opts.store_retry_seconds!r}")
  if not opts.decode_timeout or opts.decode_timeout <= 0:
    raise LaunchError(f"--decode-timeout must be a positive number of seconds; received: {opts.decode_timeout!r}")
  if opts.checkpoint_every is None or opts.checkpoint_every < 0:
    raise LaunchError(f"--checkpoint-every must be a number of seconds (0: no checkpoints); "
                      f"received: {opts.checkpoint_every!r}")
  if opts.previous_verify and not opts.previous:
    raise LaunchError("--previous-verify goes with --previous; received: --previous-verify alone")
  if opts.resume_verify and not opts.resume:
    raise LaunchError("--resume-verify goes with --resume; received: --resume-verify alone")
  if not 0.0 <= opts.max_failure_fraction <= 1.0:
    raise LaunchError(
        f"--max-failure-fraction must be between 0 and 1; received: {opts.max_failure_fraction!r}")
  carry = None
  if opts.carry_features is not None:
    carry = tuple(n.strip() for n in opts.carry_features.split(",") if n.strip())
  return {"max_pixels": max_pixels, "decode_memory": memory, "carry_features": carry}
