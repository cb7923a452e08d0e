"""Request and response bodies of the REST API (they make /openapi.json and /docs)."""
from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Prediction(BaseModel):
  label: str = Field(description="class name", examples=["Ankle boot"])
  index: int = Field(description="class index in the model's output", examples=[9])
  confidence: float = Field(ge=0, le=1, description="softmax probability", examples=[0.93])


class ModelRef(BaseModel):
  name: str = Field(examples=["fashion"])
  version: str = Field(description="registry version, or the first 12 hex of the ONNX sha256",
                       examples=["3"])
  backend: str = Field(examples=["onnx"])


class ImageInfo(BaseModel):
  width: int
  height: int
  channels: int = Field(description="channels as sent (1 grey, 2 grey+alpha, 3 colour, 4 colour+alpha)")
  format: str = Field(examples=["PNG"])


class PredictResponse(BaseModel):
  model_config = ConfigDict(json_schema_extra={"examples": [{
      "request_id": "6f1c0d7e2b9a4c1f", "model": {"name": "fashion", "version": "3", "backend": "onnx"},
      "predictions": [{"label": "Ankle boot", "index": 9, "confidence": 0.93},
                      {"label": "Sneaker", "index": 7, "confidence": 0.05}],
      "image": {"width": 28, "height": 28, "channels": 1, "format": "PNG"}, "latency_ms": 1.2}]})
  request_id: str
  model: ModelRef
  predictions: list[Prediction] = Field(description="top-k, most likely first")
  image: ImageInfo
  latency_ms: float = Field(description="server time for this request, receive to response")


class ErrorDetail(BaseModel):
  code: str = Field(description="machine-readable reason", examples=["not_an_image"])
  message: str = Field(description="what went wrong and how to fix it",
                       examples=["file 'shoe.jpg': not a recognised image (stage: header)"])
  field: Optional[str] = Field(default=None, description="the request field at fault",
                               examples=["file"])


class ErrorResponse(BaseModel):
  model_config = ConfigDict(json_schema_extra={"examples": [{
      "error": {"code": "not_an_image", "message": "file 'notes.txt': not a recognised image "
                "(UnidentifiedImageError) (stage: header)", "field": "file"},
      "request_id": "6f1c0d7e2b9a4c1f"}]})
  error: ErrorDetail
  request_id: Optional[str] = None
  # Only on 422 all_items_failed: the per-item errors of a batch in which nothing succeeded.
  results: Optional[list["BatchItem"]] = None
  succeeded: Optional[int] = None
  failed: Optional[int] = None


class BatchItem(BaseModel):
  index: int = Field(description="position of the image in the request")
  filename: Optional[str] = None
  ok: bool
  predictions: Optional[list[Prediction]] = None
  image: Optional[ImageInfo] = None
  error: Optional[ErrorDetail] = None


ErrorResponse.model_rebuild()


class BatchResponse(BaseModel):
  request_id: str
  model: ModelRef
  results: list[BatchItem]
  succeeded: int
  failed: int
  latency_ms: float


class JsonImage(BaseModel):
  """One image by value (base64) or by reference (URL, only when the server allows it)."""
  model_config = ConfigDict(extra="forbid", json_schema_extra={
      "examples": [{"name": "shoe.png", "b64": "iVBORw0KGgoAAAANSUhEUgAAABwAAAAcCAAAAABXZoBIAAAAEElEQVR42mNgGAWjYBQQAwADLAAB1wvpfAAAAABJRU5ErkJggg=="}],
      # Exactly one of the two. A malformed item is a malformed request (422 invalid_request);
      # per-item errors are for the images themselves (not base64, not an image, URL refused).
      "oneOf": [{"required": ["b64"]}, {"required": ["url"]}]})
  b64: str = Field(default=None, description="an encoded image file (PNG, JPEG, WebP, GIF, BMP "
                   "or TIFF, recognised from its bytes), base64; the same limits and per-item "
                   "errors as a multipart file",
                   json_schema_extra={"format": "byte"})
  url: str = Field(default=None, description="http(s) URL; off unless the server allows "
                   "URL fetch and the host is on its allow-list")
  name: Optional[str] = Field(default=None, max_length=256, description="echoed back as filename")

  @model_validator(mode="after")
  def _exactly_one(self):
    if (self.b64 is None) == (self.url is None):
      raise ValueError("give exactly one of 'b64' or 'url'")
    return self


class JsonPredictRequest(BaseModel):
  model_config = ConfigDict(extra="forbid")
  images: list[JsonImage] = Field(min_length=1, description="one or more images")
  top_k: Optional[int] = Field(default=None, ge=1, le=1000, description="default: server setting")


class ModelInfo(BaseModel):
  name: str
  version: str
  backend: str
  sha256: Optional[str] = None
  source: Optional[str] = Field(default=None, description="export dir or registry URI")
  classes: list[str]
  input_shape: list[int] = Field(description="[H, W, C] the model takes")
  preprocessing: dict[str, Any]
  has_drift_reference: bool
  loaded_at: float = Field(description="unix time the version was loaded")


class ModelsResponse(BaseModel):
  models: list[ModelInfo]
  limits: dict[str, Any]


class HealthResponse(BaseModel):
  status: str = Field(examples=["ok"])
  model: Optional[ModelRef] = None
  detail: Optional[str] = None


class ReloadRequest(BaseModel):
  model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
      {"model_path": "registry:fashion@production"}]})
  model_path: str = Field(min_length=1, description="export dir or registry:NAME@stage|version")


class ReloadResponse(BaseModel):
  previous: ModelRef
  current: ModelRef
  load_seconds: float


class MonitoringResponse(BaseModel):
  model_config = ConfigDict(extra="allow")
  model: Optional[ModelRef] = None
  window_size: int
  samples: int
  total_requests: int
  has_reference: bool
  threshold: float = Field(description="PSI alert level: a feature with PSI above it is drifting")
  psi: dict[str, Optional[float]] = Field(description="PSI per feature vs the training reference; "
                                          "null until min_samples requests are in the window")
  alerts: dict[str, bool]
  drift_detected: bool
  low_confidence_rate: Optional[float]
  reference_low_confidence_rate: Optional[float]
