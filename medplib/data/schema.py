"""The normalised sample every reader produces and every consumer (tokeniser, preprocessing, eval) reads.

Both MeCoVQA as released (paths inline in the text) and our explicit form parse into `Sample`. In a `Sample`
the text carries only placeholders: `<image>` once in the first human turn when there is an image,
`<region></region>` for each region prompt (in the order of `Sample.regions`) and `<SEG>` for each target mask
(in the order of `Sample.masks`). Paths are relative to the data root and already checked to stay inside it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

from medplib.data.display import View


class Point(BaseModel):
    """A point prompt in original-image pixel coordinates (x = column, y = row)."""

    kind: Literal["point"] = "point"
    x: float
    y: float


class Box(BaseModel):
    """A box prompt in original-image pixel coordinates, corners inclusive-exclusive (x0 < x1, y0 < y1)."""

    kind: Literal["box"] = "box"
    x0: float
    y0: float
    x1: float
    y1: float

    @model_validator(mode="after")
    def _ordered(self) -> Box:
        if not (self.x1 > self.x0 and self.y1 > self.y0):
            raise ValueError(
                f"box needs x0 < x1 and y0 < y1, got ({self.x0}, {self.y0}, {self.x1}, {self.y1})"
            )
        return self


class MaskRef(BaseModel):
    """A free-form mask prompt stored as a PNG (any value >= 1 is foreground), relative to the data root."""

    kind: Literal["mask"] = "mask"
    path: str


RegionPrompt = Point | Box | MaskRef


class Turn(BaseModel):
    """One conversation turn; `role` is "human" or "gpt" as in LLaVA JSON."""

    role: Literal["human", "gpt"]
    text: str


class Sample(BaseModel):
    """One validated training/eval row."""

    id: str
    image: str | None = Field(
        None, description="image path relative to the data root; None for text-only rows"
    )
    turns: list[Turn]
    regions: list[RegionPrompt] = Field(
        default_factory=list, description="one per `<region></region>` in order"
    )
    masks: list[str] = Field(default_factory=list, description="target mask PNG per `<SEG>`, in order")
    view: View | None = Field(
        None,
        description="slice, axis and window of a volume or multi-frame image; None = the reader's default",
    )
    answer_type: str | None = None
    question_type: str | None = Field(
        None,
        description="the question's kind when the source names it (MeCoVQA-mini: structure, presence, "
        "structure_box, ...): evaluation stratifies by it and builds its question-only baseline from it",
    )
    modality: str = "other"
    task: Literal["vqa", "region_vqa", "grounding"] = "vqa"
    split: str | None = None
