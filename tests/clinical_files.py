"""Real DICOM and NIfTI files for the clinical-image tests, written from images that installed packages ship."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medplib_datasets import files


def pydicom_file(name: str) -> Path:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file(name))


def itk_t1() -> Path | None:
    """The cross-subject T1 of MeCoVQA-mini (Debian insighttoolkit5-examples), stored L-S-A."""
    return files.deb_file("insighttoolkit5-examples", "KmeansTest_T1UCharRaw.nii.gz")


def mni_t1() -> Path:
    """nilearn's ICBM152 T1 template (RAS)."""
    folder = files.package_dir("nilearn")
    assert folder is not None, "nilearn is part of the datasets extra"
    return folder / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def dicom_dataset(pixels: np.ndarray, **elements: object) -> Dataset:
    """A CT image dataset (signed 16-bit, Explicit VR Little Endian) around `pixels` (rows, columns)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.PatientID, ds.PatientName = "medplib-test", "Test^Patient"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    for key, value in elements.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype(np.int16).tobytes()
    return ds


def save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_series(volume: np.ndarray, folder: Path, spacing=(2.0, 2.0, 3.0), **elements: object) -> list[Path]:
    """An axial CT series, one file per slice of `volume` (x, y, z) (patient LPS: x = columns, y = rows), written in
    shuffled order so a reader must sort by position."""
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    paths = []
    order = np.random.default_rng(0).permutation(volume.shape[2])
    for k in order:
        ds = dicom_dataset(volume[:, :, k].T, **elements)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName = (
            "20260101",
            "120000",
            "1",
            "",
        )
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, int(k) + 1
        ds.PatientBirthDate, ds.PatientSex = "", "O"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, float(k) * spacing[2]]
        ds.PixelSpacing = [spacing[1], spacing[0]]
        ds.SliceThickness = spacing[2]
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        paths.append(save(ds, folder / f"slice_{k:03d}.dcm"))
    return paths


def write_mixed_series(folder: Path, volume: np.ndarray) -> list[Path]:
    """A series of `volume` plus one 8x8 slice of the same series: a series of mixed sizes."""
    import pydicom

    paths = write_series(volume, folder)
    first = pydicom.dcmread(paths[0])
    small = dicom_dataset(np.zeros((8, 8)))
    for keyword in (
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "ImageOrientationPatient",
        "ImagePositionPatient",
    ):
        setattr(small, keyword, first.get(keyword))
    save(small, folder / "small.dcm")
    return paths


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def small_brain(tmp_path: Path) -> Path:
    """nilearn's T1 template at 8 mm, stored L-A-S (x reversed) so that the mask must come back reoriented."""
    image = nib.load(mni_t1())
    data = np.asarray(image.dataobj)[::8, ::8, ::8][::-1].copy()
    affine = image.affine @ np.diag([8.0, 8.0, 8.0, 1.0])
    affine[:, 0] *= -1
    affine[0, 3] = image.affine[0, 3] + 8 * image.affine[0, 0] * (data.shape[0] - 1)
    return write_nifti(tmp_path / "brain.nii.gz", data, affine)
