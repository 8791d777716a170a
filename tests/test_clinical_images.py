"""Clinical images read correctly and within bounds: DICOM through pydicom's own LUT pipeline, compressed DICOM,
NIfTI in any storage orientation, DICOM series and zips, and the inputs that must be refused."""

from __future__ import annotations

import gzip
import io
import tracemalloc
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from clinical_files import (
    dicom_dataset,
    itk_t1,
    mni_t1,
    pydicom_file,
    save,
    write_mixed_series,
    write_nifti,
    write_series,
)
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import RLELossless

from medplib.data.display import View, parse_window
from medplib.data.image import ImageReadError, image_size, load_image
from medplib.data.reading import ReadLimits, scale_to_uint8
from medplib.data.volume import load_volume


def _gray(image: np.ndarray) -> np.ndarray:
    assert image.dtype == np.uint8 and image.ndim == 3 and (image[..., 0] == image[..., 2]).all()
    return image[..., 0]


def _ct_small_with_voi_lut(tmp_path: Path, photometric: str = "MONOCHROME2") -> Path:
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    lut = Dataset_with_lut()
    ds.VOILUTSequence = [lut]
    ds.WindowCenter, ds.WindowWidth = 40, 400  # present too: pydicom prefers the LUT, so must we
    ds.PhotometricInterpretation = photometric
    return save(ds, tmp_path / f"voi_{photometric}.dcm")


def Dataset_with_lut():  # noqa: N802 - reads as the thing it builds
    from pydicom.dataset import Dataset

    item = Dataset()
    entries, first = 1024, -200  # stored values -200..823 map through a gamma curve
    item.add_new("LUTDescriptor", "SS", [entries, first, 12])  # signed: the first mapped value is negative
    item.add_new("LUTData", "US", [int(round(4095 * (i / (entries - 1)) ** 0.5)) for i in range(entries)])
    item.LUTExplanation = "gamma 0.5"
    return item


def _reference(path: Path) -> np.ndarray:
    """pydicom's own pipeline: modality LUT, then VOI LUT (or window); the LUT's output range to 0..255."""
    ds = pydicom.dcmread(path)
    out = apply_voi_lut(
        apply_modality_lut(ds.pixel_array, ds).astype(np.int64), ds
    )  # integral HU index the LUT
    lut = np.asarray(ds.VOILUTSequence[0].LUTData)
    gray = scale_to_uint8(out, lut.min(), lut.max())
    return 255 - gray if ds.PhotometricInterpretation == "MONOCHROME1" else gray


def test_voi_lut_sequence_and_monochrome1_render_as_pydicom(tmp_path: Path) -> None:
    plain = _ct_small_with_voi_lut(tmp_path)
    ours = _gray(load_image(plain))
    assert (ours == _reference(plain)).all()
    assert len(np.unique(ours)) > 50  # a real picture, not a clipped one
    # The LUT, not the window that is also present, decided the picture.
    assert not (ours == _gray(load_image(plain, window="40,400"))).all()

    inverted = _ct_small_with_voi_lut(tmp_path, "MONOCHROME1")
    assert (_gray(load_image(inverted)) == _reference(inverted)).all()
    assert (_gray(load_image(inverted)) == 255 - ours).all()  # bright still means dense


def test_window_function_and_presets(tmp_path: Path) -> None:
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 40, 400, "SIGMOID"
    path = save(ds, tmp_path / "sigmoid.dcm")
    raw = pydicom.dcmread(path)
    hu = apply_modality_lut(raw.pixel_array, raw)
    expected = apply_voi_lut(hu, raw)
    with np.errstate(over="ignore"):
        low, high = apply_voi_lut(np.array([-1e30, 1e30]), raw)
    assert (_gray(load_image(path)) == scale_to_uint8(expected, low, high)).all()
    # A preset window overrides the file's: bone = centre 400, width 1800 HU.
    bone = _gray(load_image(path, window="bone"))
    assert (bone == scale_to_uint8(hu, 400 - 900, 400 + 900)).all()
    assert parse_window("lung").low_high == (-1350.0, 150.0)
    with pytest.raises(ValueError, match="preset"):
        parse_window("spleen")


def test_jpeg2000_dicom_decodes_like_its_uncompressed_original() -> None:
    lossless = load_image(pydicom_file("MR_small_jp2klossless.dcm"))
    assert (lossless == load_image(pydicom_file("MR_small.dcm"))).all()
    big = load_image(pydicom_file("JPEG2000.dcm"))
    assert big.shape == (1024, 256, 3) and big.std() > 0
    assert image_size(pydicom_file("JPEG2000.dcm")) == (1024, 256)


def _multiframe(tmp_path: Path, frames: list[bytes | None], size: int = 64) -> Path:
    """An RLE multi-frame CT; a frame given as None is replaced by undecodable bytes."""
    from pydicom.pixels.encoders import RLELosslessEncoder

    rng = np.random.default_rng(1)
    template = dicom_dataset(np.zeros((size, size)), NumberOfFrames=len(frames))
    encoded = []
    for k, frame in enumerate(frames):
        if frame is None:
            encoded.append(b"\xff" * 64)  # an RLE header claiming 4 billion segments
            continue
        pixels = (rng.integers(0, 50, (size, size)) + 100 * k).astype(np.int16)
        encoded.append(RLELosslessEncoder.encode(pixels, **_rle_options(template)))
    template.PixelData = encapsulate(encoded, has_bot=True)
    template["PixelData"].VR = "OB"
    template.file_meta.TransferSyntaxUID = RLELossless
    return save(template, tmp_path / "multiframe.dcm")


def _rle_options(ds) -> dict:
    return {
        "rows": ds.Rows,
        "columns": ds.Columns,
        "samples_per_pixel": 1,
        "bits_allocated": 16,
        "bits_stored": 16,
        "pixel_representation": 1,
        "photometric_interpretation": "MONOCHROME2",
        "number_of_frames": 1,
    }


def test_a_four_frame_dicom_decodes_one_frame_only(tmp_path: Path) -> None:
    # Frames 0-2 cannot be decoded: reading frame 3 works only if nothing else is decoded.
    path = _multiframe(tmp_path, [None, None, None, b"ok"])
    frame = load_image(path, slice_index=3)
    assert frame.shape == (64, 64, 3) and frame.std() > 0
    with pytest.raises(ImageReadError, match="cannot decode DICOM pixel data"):
        load_image(path, slice_index=1)
    with pytest.raises(ImageReadError, match="frame 4 out of range for 4 frames"):
        load_image(path, slice_index=4)


def test_a_large_multiframe_file_stays_within_one_frame_of_memory(tmp_path: Path) -> None:
    """64 frames of 512x512 (32 MiB decoded, 0.2 MiB on disk): reading one costs about one frame's work."""
    size, count = 512, 64
    template = dicom_dataset(np.zeros((size, size)), NumberOfFrames=count)
    from pydicom.pixels.encoders import RLELosslessEncoder

    frame = np.tile(
        np.repeat(np.arange(8, dtype=np.int16) * 100, size // 8), (size, 1)
    )  # long runs: small RLE
    template.PixelData = encapsulate(
        [RLELosslessEncoder.encode(frame, **_rle_options(template))] * count, has_bot=True
    )
    template["PixelData"].VR = "OB"
    template.file_meta.TransferSyntaxUID = RLELossless
    data = save(template, tmp_path / "many.dcm").read_bytes()
    tracemalloc.start()
    image = load_image(data, slice_index=40)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert image.shape == (size, size, 3)
    one_frame_float = size * size * 8
    assert peak < 6 * one_frame_float < count * size * size * 2  # all frames would be 32 MiB of int16


def test_enhanced_multiframe_uses_each_frames_own_rescale(tmp_path: Path) -> None:
    from pydicom.dataset import Dataset

    pixels = np.full((2, 8, 8), 1000, dtype=np.int16)
    ds = dicom_dataset(pixels[0], NumberOfFrames=2)
    ds.PixelData = pixels.tobytes()
    groups = []
    for intercept in (-1000, 0):  # frame 0 -> 0 HU, frame 1 -> 1000 HU
        transform = Dataset()
        transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = 1, intercept, "HU"
        group = Dataset()
        group.PixelValueTransformationSequence = [transform]
        groups.append(group)
    ds.PerFrameFunctionalGroupsSequence = groups
    path = save(ds, tmp_path / "enhanced.dcm")
    window = "500,1000"  # [0, 1000] HU
    assert _gray(load_image(path, slice_index=0, window=window)).max() == 0
    assert _gray(load_image(path, slice_index=1, window=window)).min() == 255


def test_las_and_ras_niftis_show_the_same_slice(tmp_path: Path) -> None:
    ras_image = nib.load(mni_t1())
    data, affine = np.asarray(ras_image.dataobj), ras_image.affine
    las = affine.copy()
    las[:, 0] *= -1
    las[0, 3] = affine[0, 3] + affine[0, 0] * (data.shape[0] - 1)
    ras_path = write_nifti(tmp_path / "ras.nii.gz", data, affine)
    las_path = write_nifti(tmp_path / "las.nii.gz", data[::-1].copy(), las)  # same anatomy, x stored reversed
    # and stored S-A-L with a transposed voxel order
    permuted = np.transpose(data[::-1], (2, 1, 0)).copy()
    sal_affine = las[:, [2, 1, 0, 3]]
    sal_path = write_nifti(tmp_path / "sal.nii", permuted, sal_affine)
    for axis in (0, 1, 2):
        for index in (40, 90):
            ras_slice = load_image(ras_path, view=View(axis=axis, slice_index=index))
            assert (load_image(las_path, view=View(axis=axis, slice_index=index)) == ras_slice).all()
            assert (load_image(sal_path, view=View(axis=axis, slice_index=index)) == ras_slice).all()
            expected = np.rot90(np.take(data, index, axis=axis)).astype(np.float64)
            assert (_gray(ras_slice) == scale_to_uint8(expected)).all()
        assert image_size(sal_path, axis=axis) == load_image(ras_path, axis=axis).shape[:2]
    # The patient's left hemisphere (x < 0 mm) is on the image left in an axial slice.
    left = load_image(las_path, axis="axial", slice_index=90)
    assert left.shape[1] == data.shape[0]


def test_the_cross_subject_t1_stored_lsa_is_reoriented() -> None:
    path = itk_t1()
    if path is None:
        pytest.skip("apt-get install insighttoolkit5-examples (make install does)")
    image = nib.load(path)
    assert nib.aff2axcodes(image.affine) == ("L", "S", "A")
    canonical = np.asarray(nib.as_closest_canonical(image).dataobj, dtype=np.float64)
    axial = _gray(load_image(path, axis=2, slice_index=30))
    assert (axial == scale_to_uint8(np.rot90(canonical[:, :, 30]))).all()


def test_bad_niftis_are_refused_from_the_header(tmp_path: Path) -> None:
    # a 2-D NIfTI with a zero-size dimension
    header = nib.Nifti1Header()
    header.set_data_shape((5, 0))
    header.set_data_dtype(np.int16)
    zero = tmp_path / "zero.nii"
    zero.write_bytes(header.binaryblock + b"\0" * 4)
    for source in (zero, zero.read_bytes(), gzip.compress(zero.read_bytes())):
        with pytest.raises(ImageReadError, match=r"dim\[2\] is 0") as caught:
            load_image(source)
        assert caught.value.problem == "empty"
    # truncated gzip
    noise = np.random.default_rng(0).random((16, 16, 8)).astype(np.float32)
    good = write_nifti(tmp_path / "good.nii.gz", noise, np.eye(4))
    truncated = good.read_bytes()[: good.stat().st_size * 2 // 5]  # the middle slice is cut off
    with pytest.raises(ImageReadError, match="truncated or corrupt gzip") as caught:
        load_image(truncated)
    assert caught.value.problem == "unreadable"
    (tmp_path / "truncated.nii.gz").write_bytes(truncated)
    with pytest.raises(ImageReadError, match="truncated.nii.gz"):
        load_image(tmp_path / "truncated.nii.gz")
    # a gzip bomb: 40 KB that inflate to 512 MiB, declared in the header; refused without inflating it
    header = nib.Nifti1Header()
    header.set_data_shape((1024, 1024, 512))
    header.set_data_dtype(np.uint8)
    bomb = io.BytesIO()
    with gzip.GzipFile(fileobj=bomb, mode="wb") as out:
        out.write(header.binaryblock + b"\0" * 4)
        for _ in range(16):
            out.write(bytes(32 * 1024 * 1024))
    limits = ReadLimits(max_volume_bytes=128 * 1024 * 1024)
    tracemalloc.start()
    with pytest.raises(ImageReadError, match="max_volume_bytes") as caught:
        load_image(bomb.getvalue(), limits=limits)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert caught.value.problem == "too_large" and peak < 16 * 1024 * 1024


def _series_volume() -> np.ndarray:
    data = np.asarray(nib.load(mni_t1()).dataobj)[::6, ::6, ::6].astype(np.int16) * 4 + 1024
    return data


def test_dicom_series_folder_and_zip(tmp_path: Path) -> None:
    volume = _series_volume()
    write_series(volume, tmp_path / "series")
    (tmp_path / "series" / "README.txt").write_text("not DICOM: ignored")
    loaded = load_volume(tmp_path / "series")
    assert loaded.data.shape == volume.shape and len(loaded.dicom_headers) == volume.shape[2]
    # LPS files -> RAS affine: x and y flip sign; HU = stored - 1024
    assert np.allclose(loaded.affine[:3, :3], np.diag([-2.0, -2.0, 3.0]))
    assert np.allclose(loaded.data, volume.astype(np.float32) - 1024)
    positions = [float(h.ImagePositionPatient[2]) for h in loaded.dicom_headers]
    assert positions == sorted(positions)
    middle = load_image(tmp_path / "series", axis=2, slice_index=5)
    assert middle.shape[:2] == (volume.shape[1], volume.shape[0])

    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as out:
        for path in sorted((tmp_path / "series").glob("*.dcm")):
            out.write(path, f"study/{path.name}")
    assert (load_image(archive.getvalue(), axis=2, slice_index=5) == middle).all()


def test_bad_series_and_zips_are_refused(tmp_path: Path) -> None:
    volume = _series_volume()
    paths = write_mixed_series(tmp_path / "mixed", volume)
    with pytest.raises(ImageReadError, match="mixes slice sizes") as caught:
        load_image(tmp_path / "mixed")
    assert "mixed" in str(caught.value)

    escaping = io.BytesIO()
    with zipfile.ZipFile(escaping, "w") as out:
        out.writestr("series/slice_000.dcm", paths[1].read_bytes())
        out.writestr("../../etc/cron.d/evil", b"x")
    with pytest.raises(ImageReadError, match="points outside the archive"):
        load_image(escaping.getvalue())
    (tmp_path / "escaping.zip").write_bytes(escaping.getvalue())
    with pytest.raises(ImageReadError, match="escaping.zip.*outside the archive"):
        load_volume(tmp_path / "escaping.zip")
    assert not (tmp_path.parent.parent / "etc" / "cron.d" / "evil").exists()
