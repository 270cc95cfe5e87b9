"""The run configuration: what launch validated and resolved, handed to workers by value."""

import dataclasses
from typing import Optional

from transforms import decode, specs
from transforms.specs import ModelSpec

# How the stages' argument names read on the command line, for the messages of error rows.
OPTION_NAMES = (("max_pixels", "--max-pixels"), ("timeout", "--decode-timeout"), ("memory", "--decode-memory"),
                ("resize", "--resize"), ("fast", "--fast-decode"))


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
  decode_memory: Optional[int] = None  # bytes; None: no ceiling (never chosen by the command line)
  max_failure_fraction: float = 0.05
  read_threads: int = 16
  decode_threads: int = 0  # 0: the worker's own cores, counted on the worker
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
  previous_verify: bool = False  # re-read every object instead of trusting an unchanged listing
  # --previous's rows hold this run's extra columns: an unchanged shard's images reuse theirs, unread
  previous_shard_columns: bool = False
  refresh: Optional[dict] = None  # what happened to --previous, and why; goes into _SUCCESS.json
  layout: Optional[dict] = None  # computed once at launch (model_layout); carried by value to workers
  checkpoint_every: float = 0.0  # seconds; 0: no checkpoints (the command line's default is 30)
  resume: bool = False  # set only when --output holds committed rows of this model to reuse
  resume_verify: bool = False
  store_retry_seconds: Optional[float] = None  # None: EMBED_IMAGES_STORE_RETRY_SECONDS, else 120
  input_format: str = "auto"
  shard_layouts: tuple = ()  # transforms.shards.ShardLayout per shard format found at launch
  parquet_part_rows: int = 4096  # 0: a Parquet shard is never read in slices
  # tensorflow | openvino | auto (transforms/openvino_engine.py): on local runners what launch decided
  # runs (launch.decide_engine), on others --engine as given (each worker resolves auto itself)
  engine: str = "tensorflow"
  engine_requested: Optional[str] = None  # --engine as given; None: `engine`
  # Reshuffle the inputs before the embed stage, so that its work spreads over the workers. False
  # where one process runs everything (launch.in_one_process): there the listing streams straight
  # into the embed stage, one fused stage, and decoding starts with the first file listed. It also
  # sets how many buckets the join with committed rows has (reuse.join_buckets).
  fan_out: bool = True

  @property
  def sizes(self):
    return tuple(sorted({b.size for b in self.backbones}))

  @property
  def dim(self):
    return sum(b.dim for b in self.backbones)

  @property
  def decode_spec(self) -> decode.DecodeSpec:
    return decode.DecodeSpec(sizes=self.sizes, resize=self.resize, max_pixels=self.max_pixels,
                             fast=self.fast_decode, timeout=self.decode_timeout, memory=self.decode_memory,
                             option_names=OPTION_NAMES)


def model_spec(config: RunConfig) -> ModelSpec:
  return ModelSpec(config.backbones, config.pooling, config.normalize, config.allow_tf32, config.mixed_precision,
                   config.engine)


def model_layout(config: RunConfig) -> dict:
  """What a reader needs to interpret the vector, in Parquet metadata and _SUCCESS.json."""
  return specs.model_layout(model_spec(config), config.resize, config.fast_decode, config.engine_requested)
