"""A 3-D mask as a DICOM Segmentation object (highdicom, the `dicom` extra) that references the series it was made
from, so PACS and DICOM viewers show it over the images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medplib import __version__


def write_dicom_seg(mask: np.ndarray, headers: list[Any], path: str | Path, label: str) -> Path:
    """`mask` (x, y, k) in the stored order of a DICOM-series `Volume` (slice k is `headers[k]`) -> a binary SEG
    with one frame per source image, written to `path`."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if mask.shape[2] != len(headers):
        raise ValueError(f"mask has {mask.shape[2]} slices, the series {len(headers)}")
    frames = np.ascontiguousarray(mask.transpose(2, 1, 0)).astype(np.uint8)  # (k, rows = y, columns = x)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="MedPLIB", version=__version__, family=codes.DCM.ArtificialIntelligence
    )
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=label[:64] or "segment",
        # The label says what was segmented; the coded type stays generic (the model names free text).
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=codes.SCT.AnatomicalStructure,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    seg = hd.seg.Segmentation(
        source_images=headers,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=hd.UID(),
        series_number=max(1, int(headers[0].get("SeriesNumber", 1) or 1)) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="medplib",
        manufacturer_model_name="MedPLIB",
        software_versions=__version__,
        device_serial_number="0",
        omit_empty_frames=False,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
    return path
