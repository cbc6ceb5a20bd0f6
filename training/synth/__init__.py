"""Realistic synthetic training data: axial T2 FSE abdomen series with k-space motion artefacts,
domain randomisation and two simulated raters, written as real DICOM with a training manifest.

The paper's data is private; this generator lets every part of training and evaluation run end
to end on any machine. The images come from the node's phantom core (``mriqa_node.phantom``),
which the demo scanner uses too; see ``generate`` for the layout it writes.
"""

from mriqa_node.phantom.motion import apply_motion

from .generate import MANIFEST_COLUMNS, SynthConfig, generate
from .raters import rate

__all__ = ["MANIFEST_COLUMNS", "SynthConfig", "apply_motion", "generate", "rate"]
