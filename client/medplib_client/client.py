"""A small Python client for the MedPLIB server's native API (no Ray, no torch: httpx, numpy, Pillow).

    from medplib_client import MedPLIBClient
    client = MedPLIBClient("http://127.0.0.1:8000")          # API key: api_key= or $MEDPLIB_API_KEY
    pred = client.predict("scan.png", "Please segment the liver.", box=(10, 20, 120, 140), segment=True)
    pred.text, pred.masks[0].shape                          # a medplib Prediction: bool masks at the image size
    pred.save_masks("out/scan")                             # out/scan_mask0.png, ...

For the OpenAI-compatible route use any OpenAI client with `base_url=URL + "/v1"` and
`extra_body={"medplib": {...}}` (see serve/schemas.py).
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from medplib_client.masks import b64decode, decode_rle, encode_rle, png_decode
from medplib_client.prediction import Prediction, VolumePrediction

Pair = tuple[float, float]
Quad = tuple[float, float, float, float]


class MedPLIBAPIError(RuntimeError):
    """The server refused or failed a request; `status`, `param` (the field at fault) and `error_id` say why."""

    def __init__(
        self, status: int, message: str, param: str | None = None, error_id: str | None = None
    ) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.param = param
        self.error_id = error_id


def _image_bytes(image: str | Path | bytes | np.ndarray | Image.Image) -> bytes:
    if isinstance(image, (str, Path)):
        # Sent as is (the server reads PNG, JPEG, DICOM and NIfTI); a DICOM series folder goes as a zip.
        return _volume_bytes(image)
    if isinstance(image, bytes):
        return image
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image.astype(np.uint8) * 255 if image.dtype == bool else image)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _volume_bytes(image: str | Path | bytes) -> bytes:
    """A NIfTI file's bytes as they are; a DICOM series folder zipped (flat, file names only)."""
    if isinstance(image, bytes):
        return image
    path = Path(image)
    if not path.is_dir():
        return path.read_bytes()
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(p for p in path.iterdir() if p.is_file()):
            archive.write(file, file.name)
    return buf.getvalue()


def _many(value: Any, arity: int) -> list[Sequence[float]]:
    """One pair/quad or a list of them -> a list."""
    if value is None:
        return []
    if len(value) == arity and all(isinstance(v, (int, float)) for v in value):
        return [value]
    return list(value)


def _mask_region(mask: str | Path | np.ndarray) -> dict[str, Any]:
    if isinstance(mask, (str, Path)):
        return {"kind": "mask", "png_base64": base64.b64encode(Path(mask).read_bytes()).decode("ascii")}
    return {"kind": "mask", "rle": encode_rle(np.asarray(mask).astype(bool))}


def decode_mask(item: dict[str, Any]) -> np.ndarray:
    """A `MaskOut` of a response -> bool (H, W)."""
    if item.get("rle"):
        return decode_rle(item["rle"])
    if item.get("png_base64"):
        return png_decode(b64decode(item["png_base64"], "png_base64"))
    raise ValueError("the response mask carries neither 'rle' nor 'png_base64' (mask_encoding)")


class MedPLIBClient:
    """Talks to `POST /v1/predict`, the volume jobs (`/v1/volumes`), `GET /v1/models` and `GET /healthz` of a
    MedPLIB server."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 120.0) -> None:
        self.base_url = base_url.rstrip("/")
        key = api_key if api_key is not None else os.environ.get("MEDPLIB_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> MedPLIBClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check(self, response: httpx.Response) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            body = {}
        if response.status_code >= 400:
            err = body.get("error", {}) if isinstance(body, dict) else {}
            raise MedPLIBAPIError(
                response.status_code,
                err.get("message", response.text[:500]),
                err.get("param"),
                err.get("error_id"),
            )
        return body

    def predict(
        self,
        image: str | Path | bytes | np.ndarray | Image.Image,
        question: str,
        *,
        point: Pair | Sequence[Pair] | None = None,
        box: Quad | Sequence[Quad] | None = None,
        mask: str | Path | np.ndarray | Sequence[str | Path | np.ndarray] | None = None,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        segment: bool = False,
        view: Any = None,
    ) -> Prediction:
        """Ask `question` about `image` with optional region prompts (pixels; one or a list of each kind; used in
        the order points, boxes, masks). A mask is a PNG path or a bool array of the image's size. `view` (a
        dict such as `{"slice_index": 40, "axis": "axial", "window": "brain"}`, or a `medplib.data.display.View`)
        picks the slice, axis and window of a DICOM or NIfTI."""
        regions: list[dict[str, Any]] = [{"kind": "point", "x": x, "y": y} for x, y in _many(point, 2)]
        regions += [{"kind": "box", "x0": a, "y0": b, "x1": c, "y1": d} for a, b, c, d in _many(box, 4)]
        masks = [] if mask is None else [mask] if isinstance(mask, (str, Path, np.ndarray)) else list(mask)
        regions += [_mask_region(m) for m in masks]
        payload = {
            "image": base64.b64encode(_image_bytes(image)).decode("ascii"),
            "question": question,
            "regions": regions,
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "segment": segment,
            "mask_encoding": "rle",
        }
        if view is not None:
            payload["view"] = view if isinstance(view, dict) else view.model_dump(mode="json")
        body = self._check(self._http.post("/v1/predict", json=payload))
        return Prediction(
            text=body["answer"],
            masks=[decode_mask(m) for m in body["masks"]],
            scores=[m["score"] for m in body["masks"]],
            timings=body.get("timings", {}),
            num_generated_tokens=body.get("num_generated_tokens", 0),
        )

    def predict_volume(
        self,
        image: str | Path | bytes,
        question: str,
        *,
        axis: int | str = 2,
        window: Any = None,
        answer_slices: str | None = None,
        segment: bool = True,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        poll_s: float = 0.5,
        timeout_s: float = 3600.0,
    ) -> VolumePrediction:
        """Ask about a whole volume (a NIfTI file, a DICOM series folder, which is zipped for the upload, or the
        bytes of either) as a job: POST /v1/volumes, then poll until it is done. Returns a `VolumePrediction`
        whose mask is in the input's stored voxel order (reading it needs nibabel: the client's `volumes` extra)."""
        import gzip
        import time

        payload = {
            "image": base64.b64encode(_volume_bytes(image)).decode("ascii"),
            "question": question,
            "axis": axis,
            "window": window if window is None or isinstance(window, (str, dict)) else window.model_dump(),
            "answer_slices": answer_slices,
            "segment": segment,
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "mask_format": "nifti",
        }
        job = self._check(self._http.post("/v1/volumes", json=payload))
        deadline = time.monotonic() + timeout_s
        while job["status"] in ("queued", "running"):
            if time.monotonic() > deadline:
                raise MedPLIBAPIError(504, f"volume job {job['id']} not done after {timeout_s:g} s")
            time.sleep(poll_s)
            job = self._check(self._http.get(f"/v1/volumes/{job['id']}"))
        if job["status"] == "failed":
            err = job.get("error") or {}
            raise MedPLIBAPIError(500, err.get("message", "volume job failed"), None, err.get("error_id"))
        result = job["result"]
        mask = None
        if result.get("mask_nifti_base64"):
            try:
                import nibabel as nib
            except ImportError as err:
                raise ImportError(
                    "reading the volume's NIfTI mask needs nibabel: pip install 'medplib-client[volumes]'"
                ) from err
            raw = gzip.decompress(b64decode(result["mask_nifti_base64"], "mask_nifti_base64"))
            mask = np.asarray(nib.Nifti1Image.from_bytes(raw).dataobj).astype(bool)
        return VolumePrediction(
            answer=result["answer"],
            axis=result["axis"],
            slices_read=result["slices_read"],
            answer_slices=result["answer_slices"],
            answers={a["slice"]: a["answer"] for a in result["answers"]},
            mask=mask,
            mask_slices=result["mask_slices"],
        )

    def models(self) -> list[str]:
        return [m["id"] for m in self._check(self._http.get("/v1/models"))["data"]]

    def health(self) -> dict[str, Any]:
        return self._check(self._http.get("/healthz"))


def ask_server(
    endpoint: str,
    image: str | Path,
    question: str,
    *,
    points: Sequence[Sequence[float]] = (),
    boxes: Sequence[Sequence[float]] = (),
    masks: Sequence[str | Path] = (),
    view: Any = None,
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    segment: bool = False,
) -> Prediction:
    """One question to the server at `endpoint` (API key from $MEDPLIB_API_KEY); `view` as in
    `MedPLIBClient.predict`. A refusal or a connection failure becomes a ValueError naming the endpoint, which the
    command lines report in one line."""
    try:
        with MedPLIBClient(endpoint) as client:
            return client.predict(
                image,
                question,
                point=list(points),
                box=list(boxes),
                mask=list(masks),
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                segment=segment,
                view=view,
            )
    except (MedPLIBAPIError, httpx.HTTPError) as err:
        raise ValueError(f"{endpoint}: {err}") from err
