"""`medplib predict`: one question about one image or one volume, asked of the model in this process or of a
running server (`medplib_client.ask_server`, which `medplib-client predict` uses too), and the answer written as
JSON with the masks and an overlay PNG beside it.

A volume (a NIfTI with more than one slice along the axis, a DICOM series folder or zip, NRRD/MHA) runs slice by
slice (`medplib.volume_prediction`) unless `--slice` picks one slice; it writes the 3-D mask as NIfTI with the
input's affine, a DICOM-SEG when the input was DICOM, and a mosaic overlay of the slices with mask.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medplib.data.display import View
from medplib_client import MedPLIBAPIError, MedPLIBClient, Prediction, VolumePrediction, ask_server
from medplib_client.cli import write_prediction as write_answer

MOSAIC_SLICES = 16


def is_volume_input(image: str | Path, view: View) -> bool:
    """True when `image` should run as a volume: no slice was picked and it has more than one slice."""
    if view.slice_index is not None:
        return False
    path = Path(image)
    name = path.name.lower()
    if path.is_dir() or name.endswith((".zip", ".nrrd", ".nhdr", ".mha", ".mhd")):
        return True
    if name.endswith((".nii", ".nii.gz")) and path.is_file():
        from medplib.data.nifti import default_axis, load_nifti, orientation, ras_shape
        from medplib.data.reading import ReadLimits

        header = load_nifti(path, path, ReadLimits())
        shape = tuple(int(n) for n in header.shape)
        ornt = orientation(header.affine)
        axis = default_axis(shape, ornt) if view.axis is None else view.axis
        return ras_shape(shape, ornt)[axis] > 1
    return False


def regions_from_flags(
    points: Sequence[Sequence[float]], boxes: Sequence[Sequence[float]], masks: Sequence[str]
) -> list:
    from medplib.data.schema import Box, MaskRef, Point

    regions: list[Any] = [Point(x=x, y=y) for x, y in points]
    regions += [Box(x0=a, y0=b, x1=c, y1=d) for a, b, c, d in boxes]
    regions += [MaskRef(path=str(Path(m).resolve())) for m in masks]
    return regions


def local_predictor(model: str):
    """The `Predictor` of `model` (a path, preset or `models:/` URI) in this process, with the allocator settings
    of `medplib.allocator` applied first, as a pipeline's eval actors and Serve replicas run: a 112-token answer
    of the trained `small` model (`medplib predict --model`) generated in 8.9-10.5 s with them against 10.9-12.0
    s without (three alternating pairs, 2026-11-30; 8.6-8.7 s with the settings in the environment from the
    process's start)."""
    from medplib.allocator import tune_allocator
    from medplib.inference import Predictor, resolve_model_source

    tune_allocator()
    return Predictor.from_pretrained(resolve_model_source(model))


def predict(
    image: str,
    question: str,
    *,
    model: str | None = None,
    endpoint: str | None = None,
    points: Sequence[Sequence[float]] = (),
    boxes: Sequence[Sequence[float]] = (),
    masks: Sequence[str] = (),
    view: View | dict[str, Any] | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    segment: bool = False,
) -> Prediction:
    """Exactly one of `model` (a model directory, MLflow model URI or preset, run here) and `endpoint` (a
    MedPLIB server; API key from $MEDPLIB_API_KEY). Regions are used in the order points, boxes, masks; `view`
    picks the slice, axis and window of a DICOM or NIfTI."""
    if (model is None) == (endpoint is None):
        raise ValueError(
            "predict needs exactly one of --model (run the model here) or --endpoint (ask a server)"
        )
    settings = {"max_new_tokens": max_new_tokens, "temperature": temperature, "segment": segment}
    if endpoint:
        return ask_server(
            endpoint, image, question, points=points, boxes=boxes, masks=masks, view=view, **settings
        )
    from medplib.data.image import load_image
    from medplib.inference import InvalidRequest

    predictor = local_predictor(model)
    try:
        array = load_image(image, view=View.model_validate(view) if isinstance(view, dict) else view)
    except ValueError as err:
        raise InvalidRequest("image", str(err)) from err
    return predictor.predict(array, question, regions_from_flags(points, boxes, masks), **settings)


def predict_volume_here_or_there(
    image: str,
    question: str,
    *,
    model: str | None = None,
    endpoint: str | None = None,
    view: View | None = None,
    answer_slices: str | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    segment: bool = False,
) -> tuple[Any, VolumePrediction]:
    """(the volume, its prediction): run here with `model`, or as a job on the server at `endpoint`."""
    from medplib.data.volume import load_volume

    if (model is None) == (endpoint is None):
        raise ValueError(
            "predict needs exactly one of --model (run the model here) or --endpoint (ask a server)"
        )
    view = view or View()
    axis = 2 if view.axis is None else view.axis
    volume = load_volume(image)
    settings = {"max_new_tokens": max_new_tokens, "temperature": temperature, "segment": segment}
    if endpoint:
        import httpx

        try:
            with MedPLIBClient(endpoint) as client:
                pred = client.predict_volume(
                    image, question, axis=axis, window=view.window, answer_slices=answer_slices, **settings
                )
        except (MedPLIBAPIError, httpx.HTTPError) as err:
            raise ValueError(f"{endpoint}: {err}") from err
        return volume, pred
    from medplib.volume_prediction import predict_volume

    predictor = local_predictor(model)
    pred = predict_volume(
        predictor,
        volume,
        question,
        axis=axis,
        window=view.window,
        answer_slices=answer_slices,
        batch_size=batch_size,
        **settings,
    )
    return volume, pred


def write_prediction(
    pred: Prediction, out: Path, image: np.ndarray | None = None, regions: list[Any] = ()
) -> list[Path]:
    """`out` (answer, masks, timings as JSON), `<out stem>_mask<i>.png` and, given the image, an overlay PNG
    `<out stem>_overlay.png` beside it; returns the PNG paths."""
    from medplib.data.overlay import overlay
    from medplib.data.rows import png_bytes

    if image is None:
        return write_answer(pred, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    drawn = [r for r in regions if not hasattr(r, "path")]  # mask prompts are files: drawn as given below
    overlay_path = out.with_name(f"{out.with_suffix('').name}_overlay.png")
    overlay_path.write_bytes(png_bytes(overlay(image, pred.masks, drawn)))
    return [*write_answer(pred, out, {"overlay_png": str(overlay_path)}), overlay_path]


def write_volume_prediction(
    volume: Any, pred: VolumePrediction, out: Path, question: str, window: Any = None
) -> list[Path]:
    """`out` (answers per slice, the slices read, files), the 3-D mask as `<stem>_mask.nii.gz` with the input's
    affine, `<stem>_seg.dcm` for DICOM input, and `<stem>_overlay.png` (a mosaic of slices with the mask)."""
    import nibabel as nib

    from medplib.data.overlay import mosaic, overlay, strip_slices
    from medplib.data.rows import png_bytes

    out.parent.mkdir(parents=True, exist_ok=True)
    stem = out.with_suffix("").name
    written: list[Path] = []
    result: dict[str, Any] = {
        "answer": pred.answer,
        "answers": [{"slice": k, "answer": text} for k, text in pred.answers.items()],
        "axis": pred.axis,
        "slices_read": pred.slices_read,
        "answer_slices": pred.answer_slices,
        "mask_slices": pred.mask_slices,
        "timings": pred.timings,
    }
    ras_mask = None
    if pred.mask is not None:
        mask_path = out.with_name(f"{stem}_mask.nii.gz")
        nib.save(nib.Nifti1Image(pred.mask.astype(np.uint8), volume.affine), mask_path)
        result["mask_nifti"] = str(mask_path)
        result["mask_voxels"] = int(pred.mask.sum())
        written.append(mask_path)
        if volume.dicom_headers:
            from medplib.data.dicom_seg import write_dicom_seg

            seg_path = write_dicom_seg(
                pred.mask, volume.dicom_headers, out.with_name(f"{stem}_seg.dcm"), question
            )
            result["dicom_seg"] = str(seg_path)
            written.append(seg_path)
        from nibabel.orientations import apply_orientation

        ras_mask = apply_orientation(pred.mask, volume.ornt)
    shown = strip_slices(pred.mask_slices or pred.answer_slices, volume.num_slices(pred.axis), MOSAIC_SLICES)
    tiles = []
    for k in shown:
        image = volume.display_slice(pred.axis, k, window)
        masks = [] if ras_mask is None else [np.rot90(np.take(ras_mask, k, axis=pred.axis))]
        tiles.append(overlay(image, masks))
    overlay_path = out.with_name(f"{stem}_overlay.png")
    overlay_path.write_bytes(png_bytes(mosaic(tiles)))
    result["overlay_png"] = str(overlay_path)
    result["overlay_slices"] = shown
    written.append(overlay_path)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return written
