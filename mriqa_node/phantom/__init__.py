"""The phantom: synthetic axial T2 FSE abdomen series with k-space motion, as real DICOM.

One generator core for the demo scanner (``synth_series``) and the training set
(``training.synth`` builds on ``scan``), so the demo sends the kind of image the bundled model
is trained on. Numpy and Pillow only: the node runs it without the training extras.

- ``shapes``, ``anatomy``, ``organs``: the subject (habitus, organs, tissue signals), rendered
  slice by slice;
- ``randomise``: domain randomisation of contrast, texture, partial volume, resolution, bias
  field and noise (SynthSeg-style), strength 0 (reference look) .. 1;
- ``motion``: FSE acquisition and k-space motion (breathing, bulk moves), true severity;
- ``acquire``: one subject's series from protocol to stored pixels (``scan``);
- ``dicom``: headers and files; ``series``: the demo's series.
"""

from .acquire import MAX_VALUE, MotionPlan, Scan, scan, stream
from .dicom import Header, datasets, uid, write_series
from .series import DEMO_RANDOMISE, synth_series

__all__ = [
    "DEMO_RANDOMISE",
    "MAX_VALUE",
    "Header",
    "MotionPlan",
    "Scan",
    "datasets",
    "scan",
    "stream",
    "synth_series",
    "uid",
    "write_series",
]
