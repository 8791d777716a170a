"""A question about a whole volume, answered slice by slice through the one request path (`Predictor.encode` then
`Predictor.run`, `batch_size` slices per generation pass), giving a 3-D mask in the volume's own voxel order.

    volume = load_volume("scan.nii.gz")
    pred = predict_volume(predictor, volume, "Segment the left hippocampus.", segment=True)
    pred.mask.shape == volume.data.shape; pred.slices_read; pred.answers

With `segment` every slice along `axis` is read (the mask needs all of them); without it only the answer slices
are. Which slices' text answers are kept is `answer_slices`: "mask" (where the mask is present; the default with
`segment`), "all", a range "A:B" (end exclusive) or one index; without `segment` the default is the middle slice.
The volume's `answer` is the most frequent answer among those slices (the earliest wins a tie).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np

from medplib.data.display import Window
from medplib.data.volume import Volume
from medplib_client.prediction import VolumePrediction  # numpy only: the client returns it too


def parse_slices(spec: str | int | None, count: int, what: str = "answer_slices") -> list[int] | str | None:
    """ "mask", "all", "A:B" (end exclusive, either side may be left out) or an index -> the slice list, "mask" or
    None (the default). Raises ValueError naming `what`."""
    if spec is None:
        return None
    text = str(spec).strip().lower()
    if text in ("mask", "all"):
        return text if text == "mask" else list(range(count))
    try:
        if ":" in text:
            start, _, stop = text.partition(":")
            picked = list(range(count))[int(start) if start else None : int(stop) if stop else None]
        else:
            index = int(text)
            if not -count <= index < count:
                raise ValueError(f"{what}: slice {index} out of range for {count} slices")
            picked = [index % count]
    except ValueError as err:
        if what in str(err):
            raise
        raise ValueError(f"{what} must be 'mask', 'all', 'A:B' or a slice index, got {spec!r}") from err
    if not picked:
        raise ValueError(f"{what} {spec!r} selects no slice of {count}")
    return picked


def _majority(texts: list[str]) -> str:
    if not texts:
        return ""
    counts = Counter(texts)
    best = max(counts.values())
    return next(t for t in texts if counts[t] == best)


def predict_volume(
    predictor: Any,
    volume: Volume,
    question: str,
    *,
    axis: int = 2,
    window: Window | None = None,
    answer_slices: str | int | None = None,
    segment: bool = False,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    progress: Callable[[int, int], None] | None = None,
) -> VolumePrediction:
    """Ask `question` of every slice needed (see the module docstring); `progress(done, total)` after each batch.
    Raises ValueError (an `InvalidRequest` from `encode`) naming the field at fault."""
    count = volume.num_slices(axis)
    selection = parse_slices(answer_slices, count)
    if selection == "mask" and not segment:
        raise ValueError("answer_slices 'mask' needs segment (the mask decides the slices)")
    if segment:
        read = list(range(count))
    else:
        read = selection if isinstance(selection, list) else [count // 2]
    ras_mask = np.zeros(volume.ras_shape(), dtype=bool) if segment else None
    texts: dict[int, str] = {}
    started = time.perf_counter()
    model_s = 0.0
    settings = {"max_new_tokens": max_new_tokens, "temperature": temperature, "segment": segment}
    for start in range(0, len(read), batch_size):
        batch = read[start : start + batch_size]
        encoded = [predictor.encode(volume.display_slice(axis, k, window), question) for k in batch]
        t0 = time.perf_counter()
        preds = predictor.run(encoded, **settings)  # one generation pass for the batch
        model_s += time.perf_counter() - t0
        for k, pred in zip(batch, preds, strict=True):
            texts[k] = pred.text
            if ras_mask is not None and pred.masks:
                volume.put_display_mask(ras_mask, axis, k, np.logical_or.reduce(pred.masks))
        if progress is not None:
            progress(min(start + batch_size, len(read)), len(read))
    mask_slices = []
    if ras_mask is not None:
        other = tuple(a for a in range(3) if a != axis)
        mask_slices = [int(k) for k in np.nonzero(ras_mask.any(axis=other))[0]]
    if selection == "mask" or (selection is None and segment):
        chosen = mask_slices
    elif isinstance(selection, list):
        chosen = selection
    else:
        chosen = read
    answers = {k: texts[k] for k in chosen}
    return VolumePrediction(
        answer=_majority(list(answers.values())),
        axis=axis,
        slices_read=read,
        answer_slices=chosen,
        answers=answers,
        mask=None if ras_mask is None else volume.to_stored(ras_mask),
        mask_slices=mask_slices,
        timings={"total_s": time.perf_counter() - started, "model_s": model_s},
    )
