"""The intake path against damaged files: every input gets a result or a reason, never an
exception that would stop the worker (the long run is stress/fuzz_intake.py)."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import MRImageStorage, RLELossless, generate_uid

from mriqa_node.phantom import synth_series, write_series
from mriqa_node.preprocess import Unscorable, preprocess
from mriqa_node.worker import prepare_data
from tests.fuzz import CLAIM, ingest, mutate, seed_files

SEEDS = [p.read_bytes() for p in seed_files()]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**63))
def test_mutated_real_files_get_a_result_or_a_reason(seed: int) -> None:
    rng = random.Random(seed)
    outcome = ingest(mutate(rng.choice(SEEDS), rng))  # raises if the worker would
    assert outcome.startswith(("accepted", "refused"))


def test_every_truncation_of_a_file_gets_a_reason(tmp_path) -> None:
    """pydicom raises struct.error, OSError, its own BytesLengthException and more for a file
    cut short, depending on where; the worker stored only some as a reason (struct.error and
    OSError escaped and sent the claim round the worker loop)."""
    (path,) = write_series(synth_series(1, size=32, seed=1), tmp_path)
    data = path.read_bytes()
    reasons = set()
    for cut in range(0, len(data), 3):
        prepared = prepare_data(CLAIM, data[:cut], 64)
        assert prepared.frames is not None or prepared.reason, cut
        if prepared.reason and prepared.reason.startswith("cannot read dataset: "):
            reasons.add(prepared.reason.split(": ")[1])
    assert "error" in reasons, reasons  # struct.error, which escaped before


def _rle_16bit(segments: list[bytes]) -> Dataset:
    offsets = [64]
    for segment in segments[:-1]:
        offsets.append(offsets[-1] + len(segment))
    header = struct.pack("<16I", len(segments), *offsets, *[0] * (15 - len(segments)))
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = MRImageStorage, generate_uid(), "MR"
    ds.Rows = ds.Columns = 16
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation, ds.SamplesPerPixel = 0, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = encapsulate([header + b"".join(segments)])
    ds["PixelData"].VR = "OB"
    return ds


def test_a_decoder_panic_is_a_reason_not_a_dead_worker() -> None:
    """RLE segments that decode past the frame make pylibjpeg-rle (Rust) panic; its
    PanicException is a BaseException, which went through every handler (found by fuzzing)."""
    overflowing = [bytes([0x81, 7]) * 3] * 2  # 384 bytes per segment for a 256-pixel frame
    with pytest.raises(Unscorable, match="cannot decode RLE Lossless"):
        preprocess(_rle_16bit(overflowing))
