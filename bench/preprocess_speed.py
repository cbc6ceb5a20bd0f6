"""Per-slice cost of the node's preprocessing, and of the demo scanner's phantom series.

Preprocessing (mriqa_node.preprocess.preprocess, to the model's input) of a 512x512 16-bit MR
slice, with and without a VOI window, beside pydicom decoding the same slice's pixels (the
peer: work every receiver does anyway). The demo's phantom: 30 slices of 512x512 with motion
(mriqa_node.phantom.synth_series), the series the demo scanner and the benchmarks send.
Medians of --repeat runs; these were timed assertions in the tests before.
Run: .venv/bin/python bench/preprocess_speed.py [--repeat 15]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from _common import machine_line, table
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from mriqa_node.phantom import synth_series
from mriqa_node.preprocess import preprocess


def mr_slice(pixels: np.ndarray, **tags: object) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "MR"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel = 15, 0, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = pixels.astype("<u2").tobytes()
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    return ds


def median_seconds(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def decode(ds: Dataset) -> np.ndarray:
    ds._pixel_array = None  # pydicom caches the decoded array: decode again each time
    ds._pixel_id = {}
    return ds.pixel_array


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    pixels = np.random.default_rng(10).integers(0, 4096, (512, 512), dtype=np.uint16)
    rows = []
    for name, ds in (("windowed", mr_slice(pixels, WindowCenter=2000, WindowWidth=3000)),
                     ("no window", mr_slice(pixels))):  # fmt: skip
        ours = median_seconds(lambda ds=ds: preprocess(ds), args.repeat)
        peer = median_seconds(lambda ds=ds: decode(ds), args.repeat)
        rows.append([f"preprocess 512x512 ({name})", f"{ours * 1e3:.2f} ms",
                     f"{peer * 1e3:.2f} ms", f"{ours / peer:.1f}x"])  # fmt: skip
    series = median_seconds(lambda: synth_series(n_slices=30, size=512, motion=1.0, seed=1),
                            max(3, args.repeat // 5))  # fmt: skip
    rows.append(["phantom series 30 x 512x512, motion", f"{series:.2f} s", "-", "-"])
    print(machine_line())
    print(table(["step", "median", "pydicom decode", "vs decode"], rows))


if __name__ == "__main__":
    main()
