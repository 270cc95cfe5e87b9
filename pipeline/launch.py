"""Launch: everything that looks at the world before a job runs, in the order it happens.

1. `check_arguments`: the whole command line against every option ours or Beam's defines (an
   unknown or misspelled option, a value of the wrong type: one line, exit 2);
2. `options.validate`: the values themselves (no I/O);
3. `build_config`: weights resolved and fingerprinted, the engine decided (local runners: the
   model converted for OpenVINO now), a manifest's schema read, each --input matched, --previous
   judged, the layout computed once;
4. `existing_outputs` / `plan_output`: an output holding a run is refused without --overwrite
   (or, interrupted, --resume, which keeps its checkpoints of the same model); `clear_outputs`
   deletes what must go only when the job is really about to run (never in a dry run, which
   prints what it would delete instead).
"""

import dataclasses
import difflib
import glob
import logging
import os
import re
import sys
import time

from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, TestOptions, _BeamArgumentParser

from pipeline.config import RunConfig, model_layout
from pipeline.options import EmbedOptions, LaunchError, _bool_value, _check_choice, as_flags, backbone_names, validate
from transforms import checkpoint, manifest, models, openvino_engine, refresh, shards, store
from transforms.backbones import BACKBONES, PREPROCESSING_MODES, get_backbone
from transforms.specs import resolve_backbone
from transforms.weights import BackboneSpec
from transforms.write import SUCCESS_FILE

OUTPUT_FILE_PATTERNS = ("embeddings-*.parquet", "errors-*.parquet", SUCCESS_FILE)
LOCAL_RUNNERS = (None, "DirectRunner", "direct", "SwitchingDirectRunner")


# How many matches of each --input are looked at, at launch, for the first shard of each format.
SHARD_PROBE_MATCHES = 1000


class _OneLineParser(_BeamArgumentParser):
  """argparse with Beam's option types whose errors are one LaunchError line, not a usage dump."""

  def error(self, message):
    if message.startswith("ambiguous option: "):  # as Beam's own parser: not an error
      return
    match = re.match(r"argument (-[^/:\s]+)(?:/\S+)?: invalid (\w+) value: (.*)", message)
    if match:
      option, kind, value = match.groups()
      kind = {"int": "an integer", "float": "a number", "_bool_value": "true or false"}.get(kind, kind)
      raise LaunchError(f"{option} must be {kind}; received: {value}")
    match = re.match(r"argument (-[^/:\s]+)(?:/\S+)?: (.*)", message)
    if match:
      raise LaunchError(f"{match.group(1)}: {match.group(2)}")
    raise LaunchError(message)


def _options_classes():
  seen, stack = {}, list(PipelineOptions.__subclasses__())
  while stack:
    cls = stack.pop()
    seen.setdefault(str(cls), cls)  # Beam's rule: a class seen twice (main session) counts once
    stack.extend(cls.__subclasses__())
  return list(seen.values())


def _import_runner(argv):
  """Imports the --runner's module, whose options classes then count as known."""
  pre = _OneLineParser(allow_abbrev=False, add_help=False)
  pre.add_argument("--runner")
  runner = pre.parse_known_args(argv)[0].runner
  if runner in LOCAL_RUNNERS:
    return
  from apache_beam.runners.runner import create_runner
  try:
    create_runner(runner)
  except (ValueError, ImportError) as e:
    raise LaunchError(f"--runner: {str(e).splitlines()[0]}; received: {runner!r}") from None


def check_arguments(argv):
  """Every argument must be an option that our or any of Beam's options classes defines, with a
  value of its type; raises LaunchError naming the first that is not (and the nearest valid one)."""
  _import_runner(argv)
  parser = _OneLineParser(allow_abbrev=False, add_help=False, conflict_handler="resolve")
  for cls in _options_classes():
    cls._add_argparse_args(parser)
  _, unknown = parser.parse_known_args(argv)
  if not unknown:
    return
  # Our hyphenated options also take Beam's underscore spelling; suggest the one --help shows.
  ours = {s for a in parser._actions for s in a.option_strings if "-" in s[2:]}
  candidates = [s for a in parser._actions for s in a.option_strings
                if s.startswith("--") and not ("_" in s and s.replace("_", "-") in ours)]
  first = unknown[0]
  if not first.startswith("-"):
    raise LaunchError(f"unexpected argument {first!r}: every value must follow its option (--name value)")
  name = first.split("=", 1)[0]
  nearest = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
  hint = f"; did you mean {nearest[0]}?" if nearest else "; see embed-images --help"
  raise LaunchError(f"unknown option {name}{hint}")


def dry_run(options: PipelineOptions) -> bool:
  """Beam's --dry_run read as a boolean (Beam keeps it a string: "False" would be true)."""
  view = options.view_as(TestOptions)
  value = view.dry_run
  if isinstance(value, str):
    try:
      value = _bool_value(value)
    except Exception:
      raise LaunchError(f"--dry_run must be true or false; received: {view.dry_run!r}") from None
  view.dry_run = bool(value)  # what runners (Dataflow's) then read
  return bool(value)


def runner_name(options: PipelineOptions):
  return options.get_all_options().get("runner")


def in_one_process(options: PipelineOptions) -> bool:
  """Whether the whole job runs as one bundle stream in this process: the local runner in memory
  with one worker (its defaults), where a shuffle has no workers to spread the inputs over."""
  direct = options.view_as(DirectOptions)
  return (runner_name(options) in LOCAL_RUNNERS and direct.direct_running_mode == "in_memory"
          and direct.direct_num_workers == 1)


def build_config(options: PipelineOptions, check_files=True) -> RunConfig:
  """Validates the options and what they name; raises LaunchError with one line naming the
  option and value."""
  opts = options.view_as(EmbedOptions)
  registered = user_models(opts)
  values = validate(opts, registered)
  if opts.store_retry_seconds is not None:
    # This process's deadline, and that of local worker processes started from it (they inherit
    # the environment); remote workers get it from the config (CommitRows.setup).
    os.environ[store.ENV] = f"{opts.store_retry_seconds:g}"
    store.configure(opts.store_retry_seconds)
  specs = [_backbone_spec(opts, registered, entry, name, layer)
           for entry, name, layer in backbone_names(opts, registered)]

  manifest_schema, extra = None, ()
  if opts.input_manifest:
    try:
      manifest_schema = manifest.manifest_schema(opts.input_manifest)
    except ValueError as e:
      raise LaunchError(as_flags(e)) from None
    extra = manifest.extra_fields(manifest_schema)
  if opts.label_from_dir:
    if any(f.name == "label" for f in extra):
      raise LaunchError(f"--label-from-dir: --input-manifest {opts.input_manifest!r} has a 'label' column already")
    extra = extra + (manifest.LABEL_FIELD,)

  if check_files and opts.input:
    check_inputs_match(opts.input)
  layouts = ()
  if opts.input:
    layouts = shard_layouts(opts.input, opts.input_format, opts.image_column, opts.image_feature,
                            values["carry_features"])
    extra = _with_shard_columns(extra, layouts, opts.label_from_dir)

  progress = {"on": True, "off": False}.get(opts.progress)
  if progress is None:
    progress = runner_name(options) in LOCAL_RUNNERS and sys.stderr.isatty()

  config = RunConfig(
      inputs=tuple(opts.input or ()),
      output=opts.output.rstrip("/"),
      backbones=tuple(specs),
      pooling=opts.pooling,
      batch_size=opts.batch_size,
      resize=opts.resize,
      fast_decode=bool(opts.fast_decode),
      max_pixels=values["max_pixels"],
      decode_timeout=float(opts.decode_timeout),
      decode_memory=values["decode_memory"],
      max_failure_fraction=float(opts.max_failure_fraction),
      read_threads=opts.read_threads,
      decode_threads=opts.decode_threads,
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
      checkpoint_every=float(opts.checkpoint_every),
      resume_verify=bool(opts.resume_verify),
      store_retry_seconds=opts.store_retry_seconds,
      previous_verify=bool(opts.previous_verify),
      input_format=opts.input_format,
      shard_layouts=layouts,
      parquet_part_rows=opts.parquet_part_rows,
      engine=decide_engine(options, specs),
      engine_requested=opts.engine,
      fan_out=not in_one_process(options),
  )
  config = dataclasses.replace(config, layout=model_layout(config))
  if opts.previous:
    config = _with_previous(config, opts.previous.rstrip("/"), opts.ignore_bad_previous)
  return config


def decide_engine(options: PipelineOptions, specs) -> str:
  """The engine the layout records. On a local runner the worker is this machine: --engine is
  resolved here (auto: openvino where it is installed and there is no GPU) and, for openvino, the
  model converted now, into the model cache the worker reads it from (not in a dry run). A model
  OpenVINO cannot convert is one line here under --engine openvino; under auto the run is on
  TensorFlow, and so is its layout. Elsewhere (Dataflow) each worker resolves --engine itself, on
  its own hardware: the layout records what was asked."""
  opts = options.view_as(EmbedOptions)
  if runner_name(options) not in LOCAL_RUNNERS:
    return opts.engine
  try:
    return openvino_engine.engine_here(opts.engine, specs, opts.pooling, bool(opts.allow_tf32), opts.normalize,
                                       convert=not dry_run(options))
  except (openvino_engine.ConversionError, openvino_engine.EngineUnavailable) as e:
    raise LaunchError(f"--engine {opts.engine}: {e}") from None


def first_shards(patterns, input_format="auto") -> dict:
  """{format: the first shard of it} among the first SHARD_PROBE_MATCHES matches of each pattern."""
  found = {}
  for pattern in patterns:
    try:
      matched = FileSystems.match([pattern], limits=[SHARD_PROBE_MATCHES])[0].metadata_list
    except Exception as e:  # check_inputs_match says why, where it is asked to; not a store that is down
      _raise_if_unavailable("--input", pattern, e)
      continue
    for metadata in sorted(matched, key=lambda m: m.path):
      kind = shards.shard_format(metadata.path, input_format)
      if kind is not None:
        found.setdefault(kind, metadata.path)
  return found


def shard_layouts(patterns, input_format="auto", image_column=None, image_feature=None, carry_features=None):
  """Per shard format among the inputs, its image column or feature and carried columns, read off the
  first shard of that format (as a manifest's schema is read off its first batch)."""
  layouts = []
  for kind, uri in sorted(first_shards(patterns, input_format).items()):
    try:
      layouts.append(shards.shard_layout(uri, kind, image_column, image_feature, carry_features))
    except ValueError as e:
      raise LaunchError(f"--input: {as_flags(e)}") from None
  return tuple(layouts)


def _with_shard_columns(extra, layouts, label_from_dir) -> tuple:
  """The carried columns with the shards' added, each name once (the first format's type wins;
  transforms.shards.conform nulls a value of another type)."""
  fields = list(extra)
  for layout in layouts:
    for _, field in layout.columns:
      if label_from_dir and field.name == "label":
        raise LaunchError(f"--label-from-dir: {layout.format} shards carry a 'label' column already")
      if field.name not in {f.name for f in fields}:
        fields.append(field.with_nullable(True))
  return tuple(fields)


def _backbone_spec(opts, registered, entry, name, layer) -> BackboneSpec:
  """One --backbones entry resolved as `EmbedImages` resolves it (transforms.specs.resolve_backbone):
  weights fingerprinted (registry), the model copied, loaded and fingerprinted (--model), or a
  KerasHub preset fetched and loaded (hub:PRESET, a --model preset directory)."""
  try:
    return resolve_backbone(entry, name, layer, weights=opts.weights, image_size=opts.image_size,
                            pooling=opts.pooling, model=registered.get(name), modules=model_modules(opts))
  except ValueError as e:
    raise LaunchError(_model_hints(as_flags(e), name)) from None


def _model_hints(text, name) -> str:
  text = text.replace("`safe_mode`", f"--model-unsafe {name}")
  if "--backbones layer" in text:
    text += f" (embed-images --list-layers {name} lists them)"
  if "custom Keras object" in text:
    text += " (e.g. a package given with --setup_file)"
  return text


def model_modules(opts) -> tuple:
  return tuple(m.strip() for m in re.split("[,;]", opts.model_modules or "") if m.strip())


_MODEL_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")


def name_values(option, text) -> dict:
  """'a=x;b=y' (the option repeated, joined) -> {"a": "x", "b": "y"}."""
  pairs = {}
  for part in filter(None, (p.strip() for p in (text or "").split(";"))):
    name, sep, value = (x.strip() for x in part.partition("="))
    if not sep or not value or not _MODEL_NAME.fullmatch(name) or name in pairs:
      raise LaunchError(f"--{option} takes NAME=VALUE once per NAME (a letter, then letters, digits, _ . -); "
                        f"received: {part!r}")
    pairs[name] = value
  return pairs


def user_models(opts) -> dict:
  """The --model* options checked together: {name: {path, preprocessing, output, safe_mode}}."""
  paths = name_values("model", opts.model)
  clash = [name for name in paths if name in BACKBONES]
  if clash:
    raise LaunchError(f"--model {clash[0]}: a registry backbone has that name; give your model another")
  named = {"model-preprocessing": name_values("model-preprocessing", opts.model_preprocessing),
           "model-output": name_values("model-output", opts.model_output),
           "model-unsafe": [n.strip() for n in re.split("[,;]", opts.model_unsafe or "") if n.strip()]}
  for option, names in named.items():
    for name in (n for n in names if n not in paths):
      raise LaunchError(f"--{option} names {name!r}, which no --model registers; registered: {', '.join(paths) or 'none'}")
  for mode in named["model-preprocessing"].values():
    _check_choice("model-preprocessing", mode, PREPROCESSING_MODES)
  return {name: {"path": path, "preprocessing": named["model-preprocessing"].get(name, "none"),
                 "output": named["model-output"].get(name), "safe_mode": name not in named["model-unsafe"]}
          for name, path in paths.items()}


def list_layers(name, argv) -> str:
  """`embed-images --list-layers NAME`: a registry backbone's layers (built without weights) or those
  of a .keras model given with --model, with their output shapes."""
  check_arguments(argv)
  opts = PipelineOptions(argv).view_as(EmbedOptions)
  registered = user_models(opts)
  try:
    if name in registered:
      model = registered[name]
      choices = models.user_model_layers(model["path"], model["safe_mode"], model_modules(opts))
    elif name in BACKBONES:
      choices = models.registry_layers(name, opts.image_size or get_backbone(name).native_size)
    else:
      raise LaunchError(f"--list-layers: unknown backbone {name!r}; valid names: "
                        f"{', '.join([*BACKBONES, *registered])} (a .keras model: add --model {name}=PATH)")
  except ValueError as e:
    if isinstance(e, LaunchError):
      raise
    raise LaunchError(_model_hints(as_flags(e), name)) from None
  return models.format_layers(choices)


def _raise_if_unavailable(option, value, error):
  """A LaunchError naming the store and its last status, when `error` says the store stayed down."""
  found = store.unavailable_in(error)
  if found:
    raise LaunchError(f"{option} {value!r}: the store {found[0]} is unavailable (no request succeeded for "
                      f"{store.OUTAGE.seconds:g} s, --store-retry-seconds); last status: {found[1]}") from None


def check_inputs_match(patterns):
  """Each --input must match at least one file; asks for one match only, never a listing."""
  for pattern in patterns:
    try:
      result = FileSystems.match([pattern], limits=[1])[0]
    except Exception as e:  # a missing bucket, a malformed path: say which --input
      _raise_if_unavailable("--input", pattern, e)
      raise LaunchError(f"--input {pattern!r} could not be matched: {e}".splitlines()[0])
    if not result.metadata_list:
      hint = ""
      if any(c in pattern for c in "[*?") and FileSystems.exists(pattern):
        hint = "; a file of that exact name exists, but [ ] * ? are glob characters in --input: write [[] for ["
      raise LaunchError(f"--input {pattern!r} matched no file{hint}")


def _with_previous(config, previous, ignore_bad):
  """Checks --previous at launch: reuse its rows, re-embed everything (model changed), or refuse."""
  if previous == config.output:
    raise LaunchError(f"--previous {previous!r} is the --output directory; write the refresh elsewhere")
  try:
    summary = refresh.read_previous_summary(previous)
  except refresh.PreviousRunError as e:
    if not ignore_bad:
      raise LaunchError(f"{as_flags(e)}; pass --ignore-bad-previous to embed everything instead") from None
    reason = f"ignored: {as_flags(e)}"
    logging.warning("--previous: %s; embedding everything", reason)
    return dataclasses.replace(config, refresh={"previous": previous, "reused": False, "reason": reason})
  reason = refresh.model_difference(summary["layout"], config.layout)
  if reason:
    logging.warning("--previous %s: %s; re-embedding everything", previous, reason)
    return dataclasses.replace(config, refresh={"previous": previous, "reused": False, "reason": reason})
  shard_columns = bool(config.shard_layouts) and refresh.kept_columns(previous, config.extra_fields)
  return dataclasses.replace(config, previous=previous, previous_shard_columns=shard_columns,
                             refresh={"previous": previous, "reused": True, "reason": "same model"})


def _matches(pattern) -> list:
  try:
    return [m.path for m in FileSystems.match([pattern])[0].metadata_list]
  except Exception as e:  # a directory that does not exist yet; not a store that is down
    _raise_if_unavailable("--output", pattern, e)
    return []


def existing_outputs(output) -> list:
  """This tool's files in `output`, finished or partial: the final files, the checkpoints, and
  the temporary folders of Beam's file sinks that a killed run leaves."""
  found = [path for pattern in OUTPUT_FILE_PATTERNS for path in _matches(FileSystems.join(output, pattern))]
  found += checkpoint.files(output)
  if store.OUTAGE.expired:  # checkpoint.files takes any failure for "no checkpoints yet"
    _raise_if_unavailable("--output", output, store.OUTAGE.error())
  # gs://: the objects under them; local: the folders themselves (Beam's match lists files only),
  # which FileSystems.delete removes whole.
  if "://" in output:
    found += _matches(FileSystems.join(output, "beam-temp-**"))
  else:
    found += glob.glob(os.path.join(glob.escape(output), "beam-temp-*"))
  # _SUCCESS.json first: if a deletion is interrupted, the remains read as partial.
  return sorted(set(found), key=lambda p: (not p.endswith(SUCCESS_FILE), p))


def refuse_previous_run(output, found, overwrite):
  """Two runs never mix in one directory: without --overwrite, an output holding one is refused."""
  if found and not overwrite:
    interrupted = not any(p.endswith(SUCCESS_FILE) for p in found) and _checkpoint_files(found)
    what, hint = (("an interrupted run", "pass --resume to go on from it, or --overwrite to start over")
                  if interrupted else ("a previous run", "choose another directory or pass --overwrite"))
    raise LaunchError(
        f"--output {output!r} already holds {what} ({len(found)} files, e.g. {os.path.basename(found[0])}); {hint}")


def plan_output(config: RunConfig, found: list, overwrite: bool, resume: bool):
  """(config, files to delete before the job runs, whether --resume found a finished run).

  --resume keeps the committed checkpoints of the same model and deletes only the dead run's
  partial final files; checkpoints of another model are refused (or, with --overwrite, deleted)."""
  if not resume:
    refuse_previous_run(config.output, found, overwrite)
    return config, found, False
  if any(p.endswith(SUCCESS_FILE) for p in found):
    return config, _checkpoint_files(found), True
  committed = [p for p in _checkpoint_files(found) if p.endswith(".parquet")]
  if not committed:
    return config, found, False  # nothing to go on from: a run from scratch
  layout = checkpoint.read_layout(config.output)
  reason = refresh.model_difference(layout, config.layout) if layout else f"no {checkpoint.LAYOUT_FILE}"
  if reason:
    if overwrite:
      return config, found, False
    raise LaunchError(f"--resume: the checkpoints in {config.output!r} were made with another model "
                      f"({reason}); pass --overwrite to start over")
  keep = set(_checkpoint_files(found))
  return dataclasses.replace(config, resume=True), [p for p in found if p not in keep], False


def _checkpoint_files(found) -> list:
  """The checkpoints among `existing_outputs`' list (which listed them once: on gs:// each listing
  is a request)."""
  return [p for p in found if f"/{checkpoint.DIRECTORY}/" in p]


def clear_outputs(found):
  """Deletes a previous run's files (other files stay): only when the job is about to run."""
  if found:
    FileSystems.delete(list(found))
