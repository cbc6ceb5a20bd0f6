"""The phantom must produce valid, deterministic DICOM with controllable ghosting, and one
generator core must serve the demo and the training set, with domain randomisation.

Everything downstream (receiver, completion logic, scoring, benchmarks) is exercised with these
series, so a silently broken header or a motion knob that does nothing would invalidate a lot
of other tests. Sizes are kept small so the module runs in a few seconds.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import UID, ExplicitVRLittleEndian, MRImageStorage

import mriqa_node.phantom.series as demo_series
from mriqa_node.phantom import MAX_VALUE, MotionPlan, scan, synth_series, write_series
from mriqa_node.phantom.anatomy import draw_subject
from mriqa_node.phantom.randomise import DARK_TISSUES, Randomisation

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
        assert ds.Manufacturer == "mriqa-node phantom"
        assert ds.SeriesDescription == "T2 FSE AX ABDOMEN"
        assert ds.ScanningSequence == "SE"
        field = float(ds.MagneticFieldStrength)
        assert field in (1.5, 3.0)
        assert float(ds.ImagingFrequency) == pytest.approx(42.577 * field, rel=1e-3)
        assert ds.InPlanePhaseEncodingDirection == "COL"
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert 2.0 < float(ds.SliceThickness) < float(ds.SpacingBetweenSlices)
        spacing = [float(v) for v in ds.PixelSpacing]
        assert spacing[0] == spacing[1] and 350 < spacing[0] * SIZE < 480  # the FOV
        _, n_ro, n_pe, _ = ds.AcquisitionMatrix
        assert 0 < n_pe <= SIZE and 0 < n_ro <= SIZE and n_pe == ds.NumberOfPhaseEncodingSteps
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
    assert np.allclose(np.diff(z), -step, atol=1e-3)  # instance 1 is the most superior
    assert step >= float(read_back[0].SliceThickness)
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
    with pytest.raises(ValueError):
        synth_series(n_slices=1, size=64, randomise=1.5)


def _volume(motion: float, seed: int, size: int = 256, n: int = 6) -> np.ndarray:
    series = synth_series(n_slices=n, size=size, motion=motion, seed=seed)
    return np.stack([ds.pixel_array for ds in series]).astype(np.float64)


def _body(clean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns the body occupies in a clean volume (its mean over slices: above the
    noise, yet dark tissue at the body's edge still counts)."""
    mean = clean.mean(axis=0)
    body = mean > 0.15 * np.percentile(mean, 99)
    return np.flatnonzero(body.any(axis=1)), np.flatnonzero(body.any(axis=0))


def _background_energy(seed: int) -> dict[float | str, float]:
    """Mean squared signal above and below the body (where phase-encoding ghosts land), and
    in the corners (beside the body's rows and columns: noise only, whatever the motion).

    The region is taken from the clean series with a margin larger than the largest
    displacement, inside the body's left-right extent: with motion = 0 it holds pure noise.
    """
    clean = _volume(0.0, seed)
    rows, cols = _body(clean)
    margin = 16
    region = np.zeros(clean.shape[1:], dtype=bool)
    region[: rows.min() - margin, cols.min() : cols.max() + 1] = True
    region[rows.max() + margin + 1 :, cols.min() : cols.max() + 1] = True
    assert region.sum() > 0.1 * region.size  # room above/below the body to measure in
    corners = np.zeros_like(region)
    corners[: rows.min() - margin, : cols.min() - margin] = True
    corners[: rows.min() - margin, cols.max() + margin + 1 :] = True
    assert corners.sum() > 200
    energy: dict[float | str, float] = {
        0.0: float((clean[:, region] ** 2).mean()),
        "corners": float((clean[:, corners] ** 2).mean()),
    }
    for m in (0.5, 1.0):
        energy[m] = float((_volume(m, seed)[:, region] ** 2).mean())
    return energy


@pytest.mark.parametrize("seed", [0, 5])
def test_motion_ghosts_along_phase_encoding(seed: int) -> None:
    energy = _background_energy(seed)
    # Without motion the background above and below the body is noise, as in the corners.
    assert energy[0.0] == pytest.approx(energy["corners"], rel=0.2)
    assert energy[0.5] > 2 * energy[0.0]
    assert energy[1.0] > 3 * energy[0.0]
    assert energy[0.0] < energy[0.5] < energy[1.0]


def test_ghosts_are_vertical_not_horizontal() -> None:
    """Phase encoding is along columns, so motion must not leak left/right of the body."""
    clean, moving = _volume(0.0, 3), _volume(1.0, 3)
    rows, cols = _body(clean)
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


# --- one core, domain randomisation ---------------------------------------------------------

# Tissues whose reference (T2 FSE) means are far enough apart that biological spread never
# reorders them: fluid > fat > spleen > liver > muscle.
T2_ORDER = ("fluid", "fat", "spleen", "liver", "muscle")


def _order(signals: dict[str, float]) -> tuple[str, ...]:
    return tuple(sorted(T2_ORDER, key=lambda t: -signals[t]))


def _signals(seed: int, randomise: float) -> dict[str, float]:
    return scan((seed, 0), 1, 32, MotionPlan(), randomise).subject.sig


def test_randomise_zero_keeps_the_reference_contrast() -> None:
    for seed in range(6):
        reference = draw_subject(np.random.default_rng([seed, 0, 1])).sig  # any stream will do
        assert _order(reference) == T2_ORDER
        signals = _signals(seed, 0.0)
        assert _order(signals) == T2_ORDER, seed
        assert signals["air"] < 0.05 and signals["bone"] < 0.1


def test_randomise_one_draws_each_tissue_contrast_independently() -> None:
    orders = {_order(_signals(seed, 1.0)) for seed in range(6)}
    assert len(orders) >= 3, orders  # the contrast ordering differs between subjects
    assert any(order != T2_ORDER for order in orders)
    for seed in range(6):  # no signal in air and cortical bone, in any sequence
        signals = _signals(seed, 1.0)
        assert all(signals[t] < 0.1 for t in DARK_TISSUES)
    with pytest.raises(ValueError):
        Randomisation.draw(np.random.default_rng(0), 1.5, ["fat"])


def test_randomise_widens_resolution_and_noise() -> None:
    def protocols(randomise: float) -> list:
        return [scan((s, 1), 1, 128, MotionPlan(), randomise).protocol for s in range(8)]

    for p in protocols(0.0):
        assert p.thickness_mm in (5.0, 6.0, 7.0) and 22.0 <= p.snr <= 55.0
        assert 0.49 <= p.acq.n_pe / 128 <= 0.63
    wide = protocols(1.0)
    assert any(p.thickness_mm not in (5.0, 6.0, 7.0) for p in wide)
    assert any(not 22.0 <= p.snr <= 55.0 for p in wide)
    assert any(not 0.49 <= p.acq.n_pe / 128 <= 0.63 for p in wide)


def test_scan_is_deterministic_by_key_at_full_randomisation() -> None:
    a = scan((4, 2), 3, 64, MotionPlan.level(0.6), 1.0, severity=True)
    b = scan((4, 2), 3, 64, MotionPlan.level(0.6), 1.0, severity=True)
    c = scan((5, 2), 3, 64, MotionPlan.level(0.6), 1.0, severity=True)
    np.testing.assert_array_equal(a.pixels, b.pixels)
    np.testing.assert_array_equal(a.severity, b.severity)
    assert a.subject.sig == b.subject.sig and a.protocol == b.protocol
    assert not np.array_equal(a.pixels, c.pixels)
    # The randomisation has a stream of its own: the anatomy does not change with it.
    still = scan((4, 2), 3, 64, MotionPlan(), 0.0)
    assert still.subject.fov_mm == a.subject.fov_mm and still.subject.sig != a.subject.sig


def test_demo_and_training_use_one_generator_core() -> None:
    # The module, not training.synth.generate (the package exports a function of that name).
    training_generate = importlib.import_module("training.synth.generate")
    assert demo_series.scan is training_generate.scan is scan
    assert demo_series.datasets is training_generate.datasets
    assert 0.0 < demo_series.DEMO_RANDOMISE < training_generate.SynthConfig().randomise == 1.0
