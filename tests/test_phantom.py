"""The demo/test phantom must produce valid, deterministic DICOM with controllable ghosting.

Everything downstream (receiver, completion logic, scoring, benchmarks) is exercised with these
series, so a silently broken header or a motion knob that does nothing would invalidate a lot
of other tests. Sizes are kept small so the module runs in a few seconds.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import UID, ExplicitVRLittleEndian, MRImageStorage

from mriqa_node.phantom import (
    FOV_MM,
    MAX_VALUE,
    NOISE_SIGMA,
    SIGNAL_SCALE,
    synth_series,
    write_series,
)

N = 6
SIZE = 128

REQUIRED = [
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "Modality",
    "Manufacturer",
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesDescription",
    "ProtocolName",
    "SOPClassUID",
    "SOPInstanceUID",
    "InstanceNumber",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "SliceLocation",
    "PixelSpacing",
    "SliceThickness",
    "SpacingBetweenSlices",
    "FrameOfReferenceUID",
    "WindowCenter",
    "WindowWidth",
    "InPlanePhaseEncodingDirection",
    "EchoTime",
    "RepetitionTime",
    "EchoTrainLength",
    "ScanningSequence",
    "SequenceVariant",
    "MagneticFieldStrength",
    "ImagesInAcquisition",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PixelData",
]


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("phantom")
    return write_series(synth_series(n_slices=N, size=SIZE, motion=0.3, seed=7), out)


@pytest.fixture(scope="module")
def read_back(written: list[Path]) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in written]


def test_write_series_names_and_file_format(written: list[Path]) -> None:
    assert [p.name for p in written] == [f"IM{i:04d}.dcm" for i in range(1, N + 1)]
    for p in written:
        raw = p.read_bytes()
        assert raw[128:132] == b"DICM"  # preamble + prefix: a real Part 10 file


def test_headers_complete_and_consistent(read_back: list[pydicom.Dataset]) -> None:
    for ds in read_back:
        missing = [kw for kw in REQUIRED if kw not in ds]
        assert not missing, missing
        for kw in REQUIRED:
            assert ds[kw].value not in (None, "", b""), kw
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPClassUID == MRImageStorage
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.file_meta.ImplementationClassUID
        assert ds.SOPClassUID == MRImageStorage
        assert ds.Modality == "MR"
        assert str(ds.PatientName) == "DEMO^PHANTOM"
        assert ds.PatientID == "DEMO0001"
        assert ds.Manufacturer == "mriqa-node demo"
        assert ds.SeriesDescription == "T2 FSE AX ABDOMEN"
        assert ds.ScanningSequence == "SE"
        assert float(ds.MagneticFieldStrength) == 1.5
        assert ds.InPlanePhaseEncodingDirection == "COL"
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert float(ds.SliceThickness) == 6.0
        assert [float(v) for v in ds.PixelSpacing] == pytest.approx([FOV_MM / SIZE] * 2)
        assert ds.ImagesInAcquisition == N
        assert (ds.Rows, ds.Columns) == (SIZE, SIZE)
        assert (ds.BitsAllocated, ds.PixelRepresentation, ds.SamplesPerPixel) == (16, 0, 1)
        assert ds.BitsStored in (12, 16) and ds.HighBit == ds.BitsStored - 1
        assert ds.PhotometricInterpretation == "MONOCHROME2"
        assert float(ds.get("RescaleSlope", 1)) == 1.0
        assert float(ds.get("RescaleIntercept", 0)) == 0.0
        for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            assert UID(ds[kw].value).is_valid, kw
        arr = ds.pixel_array
        assert arr.shape == (SIZE, SIZE) and arr.dtype == np.uint16
        assert int(arr.max()) <= MAX_VALUE
        # The window must actually show the data: centre inside the body signal range.
        lo, hi = np.percentile(arr, (50, 99.9))
        assert lo < float(ds.WindowCenter) < hi
        assert 0.2 * hi < float(ds.WindowWidth) < 2 * MAX_VALUE


def test_series_geometry_and_uids(read_back: list[pydicom.Dataset]) -> None:
    assert [ds.InstanceNumber for ds in read_back] == list(range(1, N + 1))
    z = np.array([float(ds.ImagePositionPatient[2]) for ds in read_back])
    step = float(read_back[0].SpacingBetweenSlices)
    assert np.all(np.diff(z) > 0)
    assert np.allclose(np.diff(z), step) and step >= float(read_back[0].SliceThickness)
    assert np.allclose(z, [float(ds.SliceLocation) for ds in read_back])
    assert len({ds.SOPInstanceUID for ds in read_back}) == N
    assert len({ds.SeriesInstanceUID for ds in read_back}) == 1
    assert len({ds.StudyInstanceUID for ds in read_back}) == 1
    assert len({ds.FrameOfReferenceUID for ds in read_back}) == 1
    assert read_back[0].SeriesInstanceUID != read_back[0].StudyInstanceUID


def test_image_is_body_on_dark_background(read_back: list[pydicom.Dataset]) -> None:
    arr = read_back[N // 2].pixel_array.astype(np.float64)
    corner = arr[:8, :8]
    centre = arr[SIZE // 2 - 8 : SIZE // 2 + 8, SIZE // 2 - 8 : SIZE // 2 + 8]
    assert corner.mean() < 0.03 * MAX_VALUE
    assert centre.mean() > 10 * corner.mean()


def _uids(series: list[pydicom.Dataset]) -> list[str]:
    return [ds.SOPInstanceUID for ds in series] + [series[0].SeriesInstanceUID]


def test_deterministic_by_seed() -> None:
    a = synth_series(n_slices=3, size=64, motion=0.5, seed=11)
    b = synth_series(n_slices=3, size=64, motion=0.5, seed=11)
    c = synth_series(n_slices=3, size=64, motion=0.5, seed=12)
    assert [ds.PixelData for ds in a] == [ds.PixelData for ds in b]
    assert _uids(a) == _uids(b)
    assert a[0].StudyInstanceUID == b[0].StudyInstanceUID
    assert all(x.PixelData != y.PixelData for x, y in zip(a, c, strict=True))
    assert not set(_uids(a)) & set(_uids(c))
    assert a[0].StudyInstanceUID != c[0].StudyInstanceUID


def test_study_reuse_and_distinct_series() -> None:
    first = synth_series(n_slices=2, size=64, seed=1, series_number=1)
    study = first[0].StudyInstanceUID
    second = synth_series(n_slices=2, size=64, seed=2, series_number=2, study_uid=study)
    moving = synth_series(n_slices=2, size=64, seed=1, series_number=1, motion=0.5)
    assert second[0].StudyInstanceUID == study
    assert second[0].SeriesInstanceUID != first[0].SeriesInstanceUID
    assert moving[0].SeriesInstanceUID != first[0].SeriesInstanceUID
    # Study-level attributes agree across the series of one study.
    for kw in ("StudyDate", "StudyTime", "AccessionNumber", "PatientBirthDate", "PatientSex"):
        assert first[0][kw].value == second[0][kw].value, kw
    assert second[0].SeriesNumber == 2


def test_announce_count_false_omits_images_in_acquisition() -> None:
    series = synth_series(n_slices=2, size=64, announce_count=False)
    assert all("ImagesInAcquisition" not in ds for ds in series)


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        synth_series(n_slices=1, size=64, motion=1.5)
    with pytest.raises(ValueError):
        synth_series(n_slices=0, size=64)


def _volume(motion: float, seed: int, size: int = 256, n: int = 6) -> np.ndarray:
    series = synth_series(n_slices=n, size=size, motion=motion, seed=seed)
    return np.stack([ds.pixel_array for ds in series]).astype(np.float64)


def _background_energy(seed: int) -> dict[float, float]:
    """Mean squared signal above and below the body (where phase-encoding ghosts land).

    The region is taken from the clean series with a margin larger than the largest
    displacement, inside the body's left-right extent: with motion = 0 it holds pure noise.
    """
    clean = _volume(0.0, seed)
    body = clean > 0.25 * np.percentile(clean, 99)
    rows = np.flatnonzero(body.any(axis=(0, 2)))
    cols = np.flatnonzero(body.any(axis=(0, 1)))
    margin = 16
    region = np.zeros(clean.shape[1:], dtype=bool)
    region[: rows.min() - margin, cols.min() : cols.max() + 1] = True
    region[rows.max() + margin + 1 :, cols.min() : cols.max() + 1] = True
    assert region.sum() > 0.1 * region.size  # room above/below the body to measure in
    energy = {0.0: float((clean[:, region] ** 2).mean())}
    for m in (0.5, 1.0):
        energy[m] = float((_volume(m, seed)[:, region] ** 2).mean())
    return energy


@pytest.mark.parametrize("seed", [0, 5])
def test_motion_ghosts_along_phase_encoding(seed: int) -> None:
    energy = _background_energy(seed)
    # Clean background is Rician noise only: E[|n|^2] = 2 sigma^2 (+1/12 from rounding).
    noise_only = 2 * (NOISE_SIGMA * SIGNAL_SCALE) ** 2 + 1 / 12
    assert energy[0.0] == pytest.approx(noise_only, rel=0.1)
    assert energy[0.5] > 2 * energy[0.0]
    assert energy[1.0] > 3 * energy[0.0]
    assert energy[0.0] < energy[0.5] < energy[1.0]


def test_ghosts_are_vertical_not_horizontal() -> None:
    """Phase encoding is along columns, so motion must not leak left/right of the body."""
    clean, moving = _volume(0.0, 3), _volume(1.0, 3)
    body = clean > 0.25 * np.percentile(clean, 99)
    rows = np.flatnonzero(body.any(axis=(0, 2)))
    cols = np.flatnonzero(body.any(axis=(0, 1)))
    band = slice(rows.min(), rows.max() + 1)
    side = np.zeros(clean.shape[1:], dtype=bool)
    side[band, : cols.min() - 16] = True
    side[band, cols.max() + 17 :] = True
    above = np.zeros_like(side)
    above[: rows.min() - 16, cols.min() : cols.max() + 1] = True
    side_gain = (moving[:, side] ** 2).mean() / (clean[:, side] ** 2).mean()
    above_gain = (moving[:, above] ** 2).mean() / (clean[:, above] ** 2).mean()
    assert above_gain > 3 * side_gain


def test_files_accepted_by_dcmtk(written: list[Path]) -> None:
    dcmdump = shutil.which("dcmdump")
    if dcmdump is None:
        pytest.skip("DCMTK dcmdump not on PATH")
    for p in written:
        quiet = subprocess.run([dcmdump, "-q", str(p)], capture_output=True, text=True)
        assert quiet.returncode == 0, quiet.stderr
        loud = subprocess.run([dcmdump, str(p)], capture_output=True, text=True)
        assert loud.returncode == 0
        problems = [ln for ln in (loud.stdout + loud.stderr).splitlines() if ln[:2] in ("E:", "W:")]
        assert not problems, problems


def test_full_size_series_is_fast() -> None:
    """Demo and benchmarks generate 30 x 512 x 512 on the fly; generous bound for slow CI."""
    t0 = time.perf_counter()
    series = synth_series(n_slices=30, size=512, motion=1.0, seed=1)
    elapsed = time.perf_counter() - t0
    assert len(series) == 30 and series[0].Rows == 512
    assert elapsed < 6.0, f"{elapsed:.2f}s"
