"""Which 2-D picture of a clinical image the model is shown: the slice, the axis it is cut along and the intensity
window. A `View` travels with a request (`medplib predict`, the API's `medplib` extension), a dataset row (its
`view` field) and `medplib data prepare` (its default window).

Axes are anatomical, after reorientation to RAS+ (nibabel's closest canonical orientation): 0 sagittal (along
left-right), 1 coronal (posterior-anterior), 2 axial (inferior-superior). The display convention: the RAS slice is
turned 90 degrees counter-clockwise (`np.rot90`), so anterior or superior is at the top and, in axial and coronal
slices, the patient's left is on the viewer's left (neurological view), whatever order the file stores voxels in.

A window maps [centre - width/2, centre + width/2] (in the image's own units after rescaling: Hounsfield units for
CT) linearly to black..white. Without one, DICOM uses its own VOI LUT or window (pydicom's rules) and everything
else is scaled from the plane's own minimum to maximum.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

# (centre, width) in Hounsfield units, as radiology references list them.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "bone": (400.0, 1800.0),
    "lung": (-600.0, 1500.0),
    "soft_tissue": (50.0, 400.0),
    "mediastinum": (50.0, 350.0),
}
AXES = {"sagittal": 0, "coronal": 1, "axial": 2}
AXIS_NAMES = {v: k for k, v in AXES.items()}


class Window(BaseModel):
    """An intensity window: [centre - width/2, centre + width/2] maps to black..white."""

    model_config = ConfigDict(extra="forbid")

    center: float = Field(description="window centre (level), in the image's units (HU for CT)")
    width: float = Field(gt=0, description="window width, same units")

    @property
    def low_high(self) -> tuple[float, float]:
        return self.center - self.width / 2, self.center + self.width / 2


def parse_window(value: Any) -> Window | None:
    """A preset name (`brain`, `bone`, `lung`, `soft_tissue`, ...), "centre,width", a [centre, width] pair, a
    mapping or a `Window`; None passes through. Raises ValueError saying what is accepted."""
    if value is None or isinstance(value, Window):
        return value
    if isinstance(value, dict):
        return Window.model_validate(value)
    if isinstance(value, str):
        key = value.strip().lower().replace(" ", "_").replace("-", "_")
        if key in WINDOW_PRESETS:
            center, width = WINDOW_PRESETS[key]
            return Window(center=center, width=width)
        parts = value.split(",")
        try:
            value = [float(p) for p in parts]
        except ValueError:
            value = None
        if value is None or len(parts) != 2:
            raise ValueError(
                f"window must be a preset ({', '.join(WINDOW_PRESETS)}) or 'centre,width', got {parts!r}"
            )
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return Window(center=float(value[0]), width=float(value[1]))
    raise ValueError(f"window must be a preset name, 'centre,width' or [centre, width], got {value!r}")


def parse_axis(value: Any) -> int:
    """0/1/2 or sagittal/coronal/axial -> 0/1/2."""
    if isinstance(value, str):
        key = value.strip().lower()
        if key in AXES:
            return AXES[key]
        if key.isdigit():
            value = int(key)
    if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1, 2):
        return value
    raise ValueError(f"axis must be 0/1/2 or sagittal/coronal/axial, got {value!r}")


class View(BaseModel):
    """Slice, axis and window of the picture taken from a volume or multi-frame file (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    slice_index: int | None = Field(
        None,
        description="slice along `axis` (a volume) or frame (a multi-frame DICOM); None = the middle one",
    )
    axis: int | None = Field(
        None, description="0 sagittal, 1 coronal, 2 axial (after reorientation to RAS); None = axial"
    )
    window: Window | None = Field(None, description="intensity window; None = the file's own or min-max")

    @field_validator("axis", mode="before")
    @classmethod
    def _axis(cls, v: Any) -> int | None:
        return None if v is None else parse_axis(v)

    @field_validator("window", mode="before")
    @classmethod
    def _window(cls, v: Any) -> Window | None:
        return parse_window(v)
