"""One parser for both input forms of a MeCoVQA-style row, producing the normalised `Sample`.

MeCoVQA as released keeps paths inside the text::

    {"id": "...", "image": "images/ct_00--AMOS2022--amos_0001--x_0020.png", "answer_type": "open",
     "conversations": [
        {"from": "human", "value": "What organ is <region>masks/...--0003_000.png</region>?\\n<image>"},
        {"from": "gpt", "value": "The liver. <SEG><mask>masks/...--0003_000.png</mask>"}]}

Our explicit form keeps them in fields and uses bare placeholders in the text (one per listed item, in order)::

    {"id": "...", "image": "images/...png", "modality": "ct", "task": "grounding", "split": "train",
     "regions": [{"point": [x, y]} | {"box": [x0, y0, x1, y1]} | {"mask": "masks/...png"}],
     "masks": ["masks/...png"],
     "view": {"slice_index": 40, "axis": "axial", "window": "brain"},   # volumes and multi-frame images only
     "conversations": [{"from": "user", "value": "<image>\\nWhat organ is <region>?"},
                       {"from": "assistant", "value": "The liver. <SEG>"}]}

Normalisation (both forms):

* roles "human"/"user" -> human, "gpt"/"assistant" -> gpt; turns must alternate, starting with human, and include
  at least one gpt turn. Non-string `value`s are cast to str (as upstream does).
* `<image>` anywhere in the first human turn is moved to its start as `<image>\\n` (LLaVA's rule); a row with an
  image but no `<image>` tag gets one prepended. `<image>` anywhere else is an error, as is `<image>` without an
  `image` field.
* every `<region>path</region>`, `<region></region>` or bare `<region>` in a human turn becomes
  `<region></region>`; inline paths become `MaskRef`s in `Sample.regions`, empty placeholders take the next entry
  of the `regions` list. Mixing inline paths with a non-empty `regions` list is an error (the order would be
  ambiguous).
* every `<mask>path</mask>` in a gpt turn is removed and its path appended to `Sample.masks`; in the inline form
  each gpt turn needs as many `<SEG>` as `<mask>` paths, in the explicit form the row needs as many `<SEG>` as
  entries in `masks`. `<SEG>`/`<mask>` in human turns and `<region>` in gpt turns are errors.
* `task` (unless given): grounding if any `<SEG>`, else region_vqa if any region, else vqa. `modality`: the field
  if present (aliases such as "MR" or "X-ray" accepted), else the SA-Med2D-20M filename prefix
  (`ct_00--AbdomenCT1K--...png` -> ct), else "other". `id` defaults to "<file stem>:<line or index>".
  The optional string fields `answer_type`, `question_type` (MeCoVQA-mini: structure, presence, ...) and `split`
  are kept as given.

Parsing checks structure only; files, sizes and limits are checked by `medplib.data.validate`. Every failure
raises `ParseError` with a reason code (`ParseReason`) and a message naming the field and turn.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter, ValidationError

from medplib.constants import (
    IMAGE_TOKEN,
    MASK_END_TAG,
    MASK_START_TAG,
    MODALITIES,
    REGION_END_TOKEN,
    REGION_START_TOKEN,
    SEG_TOKEN,
    TASKS,
)
from medplib.data.display import View
from medplib.data.schema import Box, MaskRef, Point, RegionPrompt, Sample, Turn

ParseReason = Literal[
    "missing_field", "invalid_field", "seg_without_mask", "mask_without_seg", "region_count_mismatch"
]

ROLE_ALIASES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}

# Modality spellings seen in fields and in SA-Med2D-20M filename prefixes, mapped to constants.MODALITIES.
MODALITY_ALIASES = {
    **{name: name for name in MODALITIES},
    "mr": "mri",
    "x_ray": "xray",
    "x-ray": "xray",
    "us": "ultrasound",
}

REGION_PLACEHOLDER = REGION_START_TOKEN + REGION_END_TOKEN
# `<region>` optionally followed by a path (no `<` inside) and `</region>`; a bare `<region>` matches alone.
_REGION_RE = re.compile(re.escape(REGION_START_TOKEN) + r"(?:([^<]*)" + re.escape(REGION_END_TOKEN) + r")?")
_MASK_RE = re.compile(re.escape(MASK_START_TAG) + r"([^<]*)" + re.escape(MASK_END_TAG))

_REGION_ADAPTER: TypeAdapter[RegionPrompt] = TypeAdapter(Annotated[RegionPrompt, Field(discriminator="kind")])


class ParseError(ValueError):
    """A row that cannot become a `Sample`. `reason` is a `ParseReason` code; the message names field and turn."""

    def __init__(self, reason: ParseReason, message: str) -> None:
        self.reason: ParseReason = reason
        super().__init__(message)


def default_sample_id(source: str | Path, index: int) -> str:
    """The id given to a row without one: "<file stem>:<line or index>"."""
    name = Path(str(source)).name
    for suffix in (".jsonl", ".json"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return f"{name}:{index}"


def modality_from_filename(path: str) -> str:
    """Modality from an SA-Med2D-20M style name `{modality_sub}--{dataset}--...`; "other" when it does not match."""
    name = PurePosixPath(path).name.lower()
    if "--" not in name:
        return "other"
    prefix = name.split("--", 1)[0]
    if prefix in MODALITY_ALIASES:
        return MODALITY_ALIASES[prefix]
    for xray in ("x_ray", "xray", "x-ray"):
        if prefix.startswith(xray):
            return "xray"
    return MODALITY_ALIASES.get(prefix.split("_", 1)[0], "other")


def normalize_modality(value: str) -> str:
    """Map a modality field ("CT", "MR", "X-ray", "us", ...) to a name in constants.MODALITIES; ValueError if unknown."""
    key = value.strip().lower().replace(" ", "_")
    if key in MODALITY_ALIASES:
        return MODALITY_ALIASES[key]
    if key.startswith(("x_ray", "xray", "x-ray")):
        return "xray"
    raise ValueError(
        f"unknown modality {value!r}; expected one of {', '.join(MODALITIES)} (or mr, x-ray, us)"
    )


def _finite_numbers(values: Any, count: int, field: str) -> list[float]:
    if not isinstance(values, (list, tuple)) or len(values) != count:
        raise ParseError("invalid_field", f"{field} must be a list of {count} numbers, got {values!r}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise ParseError("invalid_field", f"{field} must hold finite numbers, got {values!r}")
    return [float(v) for v in values]


def _parse_region_entry(entry: Any, field: str) -> RegionPrompt:
    """One entry of the explicit `regions` list: {"point": [x, y]}, {"box": [...]}, {"mask": path} or a dumped prompt."""
    if not isinstance(entry, Mapping):
        raise ParseError(
            "invalid_field", f"{field} must be an object like {{'point': [x, y]}}, got {entry!r}"
        )
    if "kind" in entry:  # an already-normalised RegionPrompt (e.g. Sample.model_dump())
        try:
            return _REGION_ADAPTER.validate_python(dict(entry))
        except ValidationError as err:
            raise ParseError("invalid_field", f"{field}: {_first_error(err)}") from err
    keys = [k for k in ("point", "box", "mask") if k in entry]
    if len(keys) != 1:
        raise ParseError(
            "invalid_field", f"{field} needs exactly one of 'point', 'box', 'mask', got keys {sorted(entry)}"
        )
    key = keys[0]
    if key == "point":
        x, y = _finite_numbers(entry["point"], 2, f"{field}.point")
        return Point(x=x, y=y)
    if key == "box":
        x0, y0, x1, y1 = _finite_numbers(entry["box"], 4, f"{field}.box")
        try:
            return Box(x0=x0, y0=y0, x1=x1, y1=y1)
        except ValidationError as err:
            raise ParseError("invalid_field", f"{field}.box: {_first_error(err)}") from err
    path = entry["mask"]
    if not isinstance(path, str) or not path.strip():
        raise ParseError("invalid_field", f"{field}.mask must be a non-empty path string, got {path!r}")
    return MaskRef(path=path.strip())


def _first_error(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()))
    return f"{where + ': ' if where else ''}{first.get('msg', str(err))}"


def _parse_turns(conversations: Any) -> list[tuple[str, str]]:
    """Validate the conversation structure and return (role, text) pairs with canonical roles."""
    if not isinstance(conversations, list):
        raise ParseError(
            "invalid_field", f"'conversations' must be a list of turns, got {type(conversations).__name__}"
        )
    if not conversations:
        raise ParseError("missing_field", "'conversations' is empty")
    turns = []
    for i, turn in enumerate(conversations):
        where = f"conversations[{i}]"
        if not isinstance(turn, Mapping):
            raise ParseError(
                "invalid_field", f"{where} must be an object with 'from' and 'value', got {turn!r}"
            )
        for key in ("from", "value"):
            if turn.get(key) is None:
                raise ParseError("missing_field", f"{where} has no '{key}'")
        role = ROLE_ALIASES.get(str(turn["from"]).strip().lower())
        if role is None:
            raise ParseError(
                "invalid_field", f"{where}.from is {turn['from']!r}; expected human/user or gpt/assistant"
            )
        expected = "human" if i % 2 == 0 else "gpt"
        if role != expected:
            raise ParseError(
                "invalid_field", f"{where} is a {role} turn; turns must alternate starting with human"
            )
        value = turn["value"]
        turns.append((role, value if isinstance(value, str) else str(value)))
    if not any(role == "gpt" for role, _ in turns):
        raise ParseError("missing_field", "'conversations' has no gpt turn (no answer)")
    return turns


def _optional_str(row: Mapping[str, Any], key: str) -> str | None:
    value = row.get(key)
    if value is None:
        return None
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ParseError("invalid_field", f"'{key}' must be a string, got {value!r}")
    return str(value)


def parse_row(row: Mapping[str, Any], *, source: str | Path = "<rows>", index: int = 0) -> Sample:
    """Parse one MeCoVQA or explicit-form row into a `Sample` (see the module docstring for the rules).

    `source` and `index` (JSONL line number or JSON array index) only build the default id. Raises ParseError.
    """
    if not isinstance(row, Mapping):
        raise ParseError("invalid_field", f"row must be a JSON object, got {type(row).__name__}")
    if "conversations" not in row:
        raise ParseError("missing_field", "row has no 'conversations'")
    turns = _parse_turns(row["conversations"])

    image = row.get("image")
    if image is not None and (not isinstance(image, str) or not image.strip()):
        raise ParseError("invalid_field", f"'image' must be a non-empty path string, got {image!r}")

    raw_regions = row.get("regions") or []
    raw_masks = row.get("masks") or []
    if not isinstance(raw_regions, list):
        raise ParseError("invalid_field", f"'regions' must be a list, got {type(raw_regions).__name__}")
    if not isinstance(raw_masks, list):
        raise ParseError("invalid_field", f"'masks' must be a list, got {type(raw_masks).__name__}")
    listed_regions = [_parse_region_entry(entry, f"regions[{i}]") for i, entry in enumerate(raw_regions)]
    for i, mask in enumerate(raw_masks):
        if not isinstance(mask, str) or not mask.strip():
            raise ParseError("invalid_field", f"masks[{i}] must be a non-empty path string, got {mask!r}")
    listed_masks = [m.strip() for m in raw_masks]

    regions: list[RegionPrompt] = []
    masks: list[str] = []
    placeholders = 0  # region placeholders filled from the `regions` list
    seg_total = 0
    out_turns: list[Turn] = []
    for i, (role, text) in enumerate(turns):
        where = f"conversations[{i}] ({role})"
        if IMAGE_TOKEN in text and i != 0:
            raise ParseError(
                "invalid_field", f"{where} contains {IMAGE_TOKEN}; only the first human turn may"
            )
        if role == "human":
            for tag in (SEG_TOKEN, MASK_START_TAG, MASK_END_TAG):
                if tag in text:
                    raise ParseError("invalid_field", f"{where} contains {tag}; masks belong in gpt turns")

            def _region(match: re.Match[str], where: str = where) -> str:
                nonlocal placeholders
                path = (match.group(1) or "").strip()
                if path:
                    if listed_regions:
                        raise ParseError(
                            "invalid_field",
                            f"{where} has an inline region path {path!r} and the row also lists 'regions'; use one form",
                        )
                    regions.append(MaskRef(path=path))
                else:
                    if placeholders < len(listed_regions):
                        regions.append(listed_regions[placeholders])
                    placeholders += 1
                return REGION_PLACEHOLDER

            text = _REGION_RE.sub(_region, text)
            if REGION_END_TOKEN in text.replace(REGION_PLACEHOLDER, ""):
                raise ParseError("invalid_field", f"{where} has an unmatched {REGION_END_TOKEN}")
        else:
            for tag in (REGION_START_TOKEN, REGION_END_TOKEN):
                if tag in text:
                    raise ParseError(
                        "invalid_field", f"{where} contains {tag}; region prompts belong in human turns"
                    )
            inline = [p.strip() for p in _MASK_RE.findall(text)]
            text = _MASK_RE.sub("", text)
            if MASK_START_TAG in text or MASK_END_TAG in text:
                raise ParseError(
                    "invalid_field", f"{where} has an unclosed {MASK_START_TAG} or stray {MASK_END_TAG}"
                )
            inline_paths = [p for p in inline if p]
            seg_count = text.count(SEG_TOKEN)
            seg_total += seg_count
            if inline_paths and listed_masks:
                raise ParseError(
                    "invalid_field",
                    f"{where} has inline <mask> paths and the row also lists 'masks'; use one form",
                )
            if not listed_masks:
                if seg_count > len(inline_paths):
                    raise ParseError(
                        "seg_without_mask",
                        f"{where} has {seg_count} {SEG_TOKEN} but {len(inline_paths)} <mask>path</mask>",
                    )
                if len(inline_paths) > seg_count:
                    raise ParseError(
                        "mask_without_seg",
                        f"{where} has {len(inline_paths)} <mask>path</mask> but {seg_count} {SEG_TOKEN}",
                    )
            masks.extend(inline_paths)
        out_turns.append(Turn(role=role, text=text))

    if placeholders != len(listed_regions):
        raise ParseError(
            "region_count_mismatch",
            f"the text has {placeholders} {REGION_PLACEHOLDER} without an inline path but 'regions' lists "
            f"{len(listed_regions)}",
        )
    if listed_masks:
        if seg_total > len(listed_masks):
            raise ParseError(
                "seg_without_mask",
                f"the gpt turns have {seg_total} {SEG_TOKEN} but 'masks' lists {len(listed_masks)}",
            )
        if len(listed_masks) > seg_total:
            raise ParseError(
                "mask_without_seg",
                f"'masks' lists {len(listed_masks)} but the gpt turns have {seg_total} {SEG_TOKEN}",
            )
        masks = listed_masks

    if image is None:
        if IMAGE_TOKEN in out_turns[0].text:
            raise ParseError("missing_field", f"the first turn has {IMAGE_TOKEN} but the row has no 'image'")
        if regions or masks:
            raise ParseError("missing_field", "the row has region prompts or target masks but no 'image'")
    else:
        first = out_turns[0].text.replace(IMAGE_TOKEN, "").strip()
        out_turns[0] = Turn(role="human", text=f"{IMAGE_TOKEN}\n{first}")

    task = _optional_str(row, "task")
    if task is None:
        task = "grounding" if masks else "region_vqa" if regions else "vqa"
    elif task not in TASKS:
        raise ParseError("invalid_field", f"'task' is {task!r}; expected one of {', '.join(TASKS)}")
    modality_field = _optional_str(row, "modality")
    if modality_field is not None:
        try:
            modality = normalize_modality(modality_field)
        except ValueError as err:
            raise ParseError("invalid_field", f"'modality': {err}") from err
    else:
        modality = modality_from_filename(image) if image else "other"

    view = row.get("view")
    if view is not None:
        if image is None:
            raise ParseError("invalid_field", "'view' (slice, axis, window) needs an 'image'")
        try:
            view = View.model_validate(view)
        except ValidationError as err:
            raise ParseError("invalid_field", f"'view': {_first_error(err)}") from err
    sample_id = _optional_str(row, "id")
    try:
        return Sample(
            id=sample_id if sample_id else default_sample_id(source, index),
            image=image,
            turns=out_turns,
            regions=regions,
            masks=masks,
            view=view,
            answer_type=_optional_str(row, "answer_type"),
            question_type=_optional_str(row, "question_type"),
            modality=modality,
            task=task,
            split=_optional_str(row, "split"),
        )
    except ValidationError as err:
        raise ParseError("invalid_field", _first_error(err)) from err
