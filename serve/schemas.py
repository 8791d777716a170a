"""Request and response bodies of the MedPLIB HTTP API (they make the OpenAPI schema at `/openapi.json`).

Two ways in:

* `POST /v1/chat/completions`: OpenAI's chat-completions shape (`ChatCompletionRequest`), so OpenAI SDKs and
  tools work unchanged. The image is an `image_url` content part holding a data URL; region prompts and mask
  options ride in the extra `medplib` object (`extra_body={"medplib": {...}}` in the OpenAI Python client); the
  reply is a chat completion plus a `medplib` object with one mask per `<SEG>`.
* `POST /v1/predict`: the native form (`PredictRequest`): image, question, regions -> answer, masks, timings.

Coordinates are original-image pixels (x = column, y = row). Masks travel as COCO RLE (`{"size": [h, w],
"counts": ...}`, column-major runs; compressed string or list of ints) and/or base64 PNG.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from medplib.data.display import View, Window, parse_axis, parse_window
from medplib_client.masks import rle_size


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def valid_unicode(text: Any) -> Any:
    """`text` unless it is a string holding a lone surrogate (JSON allows the escape; UTF-8 and the tokenizer do
    not). Runs before pydantic's own str check, whose message would not say what is wrong."""
    if isinstance(text, str):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(
                f"text holds a lone surrogate (U+{ord(text[err.start]):04X}) at character {err.start}; "
                "send valid Unicode"
            ) from err
    return text


UnicodeText = Annotated[str, BeforeValidator(valid_unicode)]


def _not_blank(v: str) -> str:
    if not v.strip():
        raise ValueError("question is blank")
    return v


Question = Annotated[str, BeforeValidator(valid_unicode), Field(min_length=1), AfterValidator(_not_blank)]


class _ViewedImage(_Strict):
    """A request with an image file whose slice, axis and window may be chosen: `slice_index` alone (the demo
    page's slider) or a whole `view`."""

    slice_index: int | None = Field(
        None,
        ge=0,
        description="DICOM frame or volume slice (along `view.axis`, default axial); default the middle one",
    )
    view: View | None = Field(
        None,
        description="DICOM/NIfTI: slice_index, axis (0-2 or sagittal/coronal/axial) and window (a preset such as "
        "brain, bone, lung, soft_tissue, or {center, width})",
    )

    @model_validator(mode="after")
    def _one_slice(self) -> _ViewedImage:
        if (
            self.slice_index is not None
            and self.view is not None
            and self.view.slice_index not in (None, self.slice_index)
        ):
            raise ValueError(
                f"slice_index {self.slice_index} and view.slice_index {self.view.slice_index} differ; "
                "give the slice once"
            )
        return self

    def image_view(self) -> View | None:
        """`view` with `slice_index` folded in; None when neither is given."""
        if self.slice_index is None:
            return self.view
        return (self.view or View()).model_copy(update={"slice_index": self.slice_index})


# --- region prompts ------------------------------------------------------------------------------------------------
class PointPrompt(_Strict):
    """A point prompt; the model sees a small square around it."""

    x: float = Field(description="column, pixels")
    y: float = Field(description="row, pixels")


class BoxPrompt(_Strict):
    """A box prompt, corners inclusive-exclusive in pixels (x0 < x1, y0 < y1)."""

    x0: float
    y0: float
    x1: float
    y1: float

    @model_validator(mode="after")
    def _ordered(self) -> BoxPrompt:
        if not (self.x1 > self.x0 and self.y1 > self.y0):
            raise ValueError(
                f"box needs x0 < x1 and y0 < y1, got ({self.x0}, {self.y0}, {self.x1}, {self.y1})"
            )
        return self


class RLE(_Strict):
    """COCO run-length encoding: runs over the column-major flattened mask, starting with zeros."""

    size: list[int] = Field(description="[height, width]")
    counts: str | list[int] = Field(description="compressed COCO string or the list of run lengths")

    @model_validator(mode="after")
    def _well_formed(self) -> RLE:
        # The form only (MaskFormatError is a ValueError -> 422); the runs are decoded against the image later.
        rle_size({"size": self.size, "counts": self.counts})
        return self


class MaskPrompt(_Strict):
    """A free-form region: exactly one of a base64 PNG (any value >= 1 is inside) or a COCO RLE, image-sized."""

    png_base64: str | None = None
    rle: RLE | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> MaskPrompt:
        if (self.png_base64 is None) == (self.rle is None):
            raise ValueError("give exactly one of 'png_base64' or 'rle'")
        return self


class PointRegion(PointPrompt):
    kind: Literal["point"]


class BoxRegion(BoxPrompt):
    kind: Literal["box"]


class MaskRegion(MaskPrompt):
    kind: Literal["mask"]


Region = Annotated[PointRegion | BoxRegion | MaskRegion, Field(discriminator="kind")]
MaskEncoding = Literal["rle", "png", "both"]


# --- chat completions -------------------------------------------------------------------------------------------
class MedPLIBOptions(_Strict):
    """The `medplib` extension of a chat request. Regions are used in the order points, boxes, masks; mark them in
    the text with `<region>` (one per prompt, in that order) or let the server append the markers."""

    points: list[PointPrompt] = Field(default_factory=list)
    boxes: list[BoxPrompt] = Field(default_factory=list)
    masks: list[MaskPrompt] = Field(default_factory=list)
    segment: bool = Field(
        False, description="return a mask even when the answer has no <SEG> (grounding mode)"
    )
    return_masks: bool = Field(True, description="include the masks in the response")
    mask_encoding: MaskEncoding = Field("both", description="'rle', 'png' or 'both'")
    view: View | None = Field(
        None,
        description="DICOM/NIfTI: slice_index, axis (0-2 or sagittal/coronal/axial) and window (a preset such as "
        "brain, bone, lung, soft_tissue, or {center, width})",
    )


class ImageURL(BaseModel):
    url: str = Field(description="a data URL: data:image/png;base64,... (remote URLs are not fetched)")
    detail: str | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: UnicodeText


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


def _content_as_parts(value: Any) -> Any:
    if value is None:
        return []
    if isinstance(value, str):
        return [{"type": "text", "text": value}]
    return value


class ChatMessage(BaseModel):
    """One message. `content` is a string or a list of `text` / `image_url` parts."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[
        list[ContentPart],
        BeforeValidator(_content_as_parts, json_schema_input_type=str | list[ContentPart] | None),
    ] = Field(default_factory=list)
    name: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """OpenAI chat-completions request. A conversation alternates user and assistant messages and ends with the
    user's question; the image goes in the first user message, and the model's conversation template lays out
    the earlier turns as in training. Region prompts (`medplib`) belong to the last question. `top_p`, `seed` and
    `stop` are honoured; other OpenAI fields that do not apply here (`user`, `logprobs`, ...) are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="the id from /v1/models (or omit)")
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate at most")
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens")
    temperature: float | None = Field(None, ge=0, le=2, description="0 or omitted = greedy")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling (with temperature > 0)")
    seed: int | None = Field(
        None, ge=0, lt=2**63, description="seeds the sampler: the same request gives the same answer"
    )
    stop: UnicodeText | list[UnicodeText] | None = Field(
        None, description="up to 4 strings; the answer ends before the first one generated"
    )
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    medplib: MedPLIBOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops


class MaskRLE(BaseModel):
    size: list[int] = Field(description="[height, width]")
    counts: str = Field(description="compressed COCO RLE string (pycocotools.mask.decode reads it)")


class MaskOut(BaseModel):
    """One predicted mask at the original image size."""

    index: int = Field(description="which <SEG> of the answer (0-based)")
    size: list[int] = Field(description="[height, width]")
    score: float = Field(description="the mask decoder's predicted IoU")
    area: int = Field(description="foreground pixels")
    rle: MaskRLE | None = None
    png_base64: str | None = Field(None, description="8-bit PNG, 0 and 255")


class Timings(BaseModel):
    queue_s: float = Field(description="waiting for a batch slot on the replica")
    preprocess_s: float
    generate_s: float
    model_s: float = Field(description="the whole model call (preprocess + generate + masks) for the batch")
    server_s: float = Field(description="from request parsed to response built on the replica")
    batch_size: int = Field(description="requests that shared this generation pass")
    first_token_s: float | None = Field(
        None, description="streaming: from generation start to the first token"
    )


class MedPLIBResult(BaseModel):
    masks: list[MaskOut] = Field(default_factory=list)
    timings: Timings | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    medplib: MedPLIBResult


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed completion; the last content chunk carries `medplib` (the masks)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    medplib: MedPLIBResult | None = None


# --- native ------------------------------------------------------------------------------------------------------
class PredictRequest(_ViewedImage):
    """The native request: one image, one question, region prompts in the order of the `<region>` marks."""

    image: str = Field(description="base64 of the file (PNG, JPEG, DICOM, NIfTI) or a data URL")
    question: Question
    regions: list[Region] = Field(default_factory=list)
    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0, le=2)
    segment: bool = Field(False, description="return a mask even when the answer has no <SEG>")
    return_masks: bool = True
    mask_encoding: MaskEncoding = "both"


class PredictResponse(BaseModel):
    id: str
    model: str
    answer: str
    masks: list[MaskOut]
    num_generated_tokens: int
    prompt_tokens: int
    timings: Timings


class PreviewRequest(_ViewedImage):
    """An image file to show: the demo page renders DICOM and NIfTI slices through it."""

    image: str = Field(description="base64 of the file (PNG, JPEG, DICOM, NIfTI) or a data URL")


class PreviewResponse(BaseModel):
    png_base64: str = Field(description="the slice the model sees, as an 8-bit RGB PNG")
    width: int
    height: int
    num_slices: int = Field(
        description="slices (NIfTI, along the view's axis) or frames (DICOM) in the file; 1 for a plain image"
    )
    slice_index: int = Field(description="the slice shown")


# --- misc --------------------------------------------------------------------------------------------------------
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "medplib"
    source: str = Field(description="what the replicas loaded: MLflow URI, directory or preset")
    max_regions: int
    max_tokens: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "unhealthy"]
    model: str
    last_success_s_ago: float | None = None
    detail: str | None = None


class ErrorBody(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, server_error, ...")
    param: str | None = Field(None, description="the request field at fault, dotted")
    code: str | None = None
    error_id: str | None = Field(None, description="quote it when reporting a server error: it is in the log")


class ErrorResponse(BaseModel):
    """Every error, 4xx and 5xx, in OpenAI's shape."""

    error: ErrorBody


# --- volumes -----------------------------------------------------------------------------------------------------
class VolumeRequest(_Strict):
    """A question about a whole volume, run slice by slice as a job: POST returns its id, GET polls it."""

    image: str = Field(
        description="base64 (or a data URL) of a NIfTI (.nii or .nii.gz) or a zipped DICOM series"
    )
    question: Question
    axis: int = Field(2, description="0 sagittal, 1 coronal, 2 axial (after reorientation to RAS)")
    window: Window | None = Field(
        None, description="a preset (brain, bone, lung, soft_tissue, ...) or {center, width}"
    )
    answer_slices: str | None = Field(
        None, description="whose text answers to keep: 'mask', 'all', 'A:B' or an index (default: see /docs)"
    )
    segment: bool = Field(True, description="make the 3-D mask (reads every slice along `axis`)")
    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0, le=2)
    mask_format: Literal["nifti", "rle", "both"] = Field(
        "nifti",
        description="the 3-D mask as gzipped NIfTI bytes with the input's affine, COCO RLE per slice, or both",
    )

    @field_validator("axis", mode="before")
    @classmethod
    def _axis(cls, v: Any) -> int:
        return parse_axis(v)

    @field_validator("window", mode="before")
    @classmethod
    def _window(cls, v: Any) -> Window | None:
        return parse_window(v)


class SliceAnswer(BaseModel):
    slice: int
    answer: str


class SliceMask(BaseModel):
    slice: int = Field(description="index along `axis`; the mask is that slice as displayed (see /docs)")
    rle: MaskRLE


class VolumeResult(BaseModel):
    answer: str = Field(description="the most frequent answer over `answer_slices`")
    answers: list[SliceAnswer]
    axis: int
    slices_read: list[int]
    answer_slices: list[int]
    mask_slices: list[int] = Field(description="slices where the mask is present")
    mask_nifti_base64: str | None = Field(None, description="gzipped NIfTI, the input's shape and affine")
    masks_rle: list[SliceMask] | None = None


class VolumeJob(BaseModel):
    """A volume job's state; `result` once `status` is done, `error` when it failed."""

    id: str
    object: Literal["volume.job"] = "volume.job"
    status: Literal["queued", "running", "done", "failed"]
    slices_done: int = 0
    slices_total: int
    created: int
    result: VolumeResult | None = None
    error: ErrorBody | None = None
