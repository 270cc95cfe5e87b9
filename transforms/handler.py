"""`BackbonesModelHandler`: the fused model of `EmbedImages` as a RunInference `ModelHandler` over decoded uint8 images."""

from typing import Any, Optional, Sequence

import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from transforms import decode, fused, openvino_engine
from transforms.specs import ModelSpec, model_layout, resolve_backbones


class BackbonesModelHandler(ModelHandler):
  """`RunInference(BackbonesModelHandler(["resnet50"]))` over uint8 HxWx3 arrays of any size: each is
  resized as `resize` says (squash | center-crop | pad) to every backbone's size, and each
  `PredictionResult.inference` is the vector `EmbedImages` gives for that image.

  The model arguments are `EmbedImages`'s (`engine` included); `min_batch_size`, `max_batch_size` and
  `max_batch_duration_secs` are RunInference's batching knobs. A KerasHub preset (`hub:PRESET`, or
  `models={NAME: preset directory}`) takes each image whole, through its own ImageConverter. RunInference builds the model once
  per process and shares it (`large_model=True`: once per machine).
  """

  def __init__(self, backbones, *, weights="imagenet", pooling="avg", image_size=None, resize="squash",
               models=None, model_preprocessing=None, model_outputs=None, unsafe_models=(), model_modules=(),
               normalize="none", allow_tf32=False, mixed_precision=False, engine="tensorflow",
               min_batch_size: Optional[int] = None,
               max_batch_size: int = 32, max_batch_duration_secs: Optional[float] = None, large_model=False):
    super().__init__()
    if pooling not in ("avg", "max"):
      raise ValueError(f"`pooling` must be avg or max; received: {pooling!r}")
    if resize not in decode.RESIZE_POLICIES:
      raise ValueError(f"`resize` must be {' or '.join(decode.RESIZE_POLICIES)}; received: {resize!r}")
    if normalize not in ("none", "l2"):
      raise ValueError(f"`normalize` must be none or l2; received: {normalize!r}")
    openvino_engine.check_engine(engine)
    specs = resolve_backbones(backbones, weights=weights, image_size=image_size, pooling=pooling, models=models,
                              model_preprocessing=model_preprocessing, model_outputs=model_outputs,
                              unsafe_models=unsafe_models, modules=tuple(model_modules))
    self.model = ModelSpec(specs, pooling, normalize, bool(allow_tf32), bool(mixed_precision), engine)
    self.layout = model_layout(self.model, resize)
    self._resize = resize
    self._batching = {"max_batch_size": max_batch_size}
    if min_batch_size is not None:
      self._batching["min_batch_size"] = min_batch_size
    if max_batch_duration_secs is not None:
      self._batching["max_batch_duration_secs"] = max_batch_duration_secs
    self._large_model = large_model

  def load_model(self) -> "fused.FusedModel | openvino_engine.OpenVINOModel":
    return openvino_engine.build(self.model)

  def run_inference(self, batch: Sequence[np.ndarray], model,
                    inference_args: Optional[dict[str, Any]] = None):
    resized = [decode.resize_array(image, self.model.sizes, self._resize) for image in batch]
    vectors = model({s: fused.batch_images([r[s] for r in resized], s) for s in self.model.sizes})
    return [PredictionResult(image, vector) for image, vector in zip(batch, vectors)]

  def batch_elements_kwargs(self):
    return dict(self._batching)

  def share_model_across_processes(self) -> bool:
    return self._large_model

  def get_metrics_namespace(self) -> str:
    return "BackbonesModelHandler"
