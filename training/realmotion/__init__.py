"""Real anatomy as training data: clean real series with physically simulated motion in
k-space and nuisances that are not motion, written as DICOM with a training manifest."""

from training.realmotion.corrupt import CorruptConfig, corrupt_slice, write_corrupted
from training.realmotion.sources import SourceSeries, find_series

__all__ = ["CorruptConfig", "SourceSeries", "corrupt_slice", "find_series", "write_corrupted"]
