"""The out-of-distribution guard's features and distance, shared by the node and training.

Features: the spatial mean of the model's last 4-D activation (its last convolutional block),
whatever the head: for a GAP head it is the head's own input; for a Flatten head it keeps the
feature count at the block's width (a few hundred) instead of tens of thousands. Distance:
Mahalanobis to the training features (mean and shrunk precision, fitted by training.ood).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def feature_model(model: Any) -> Any:
    """A Keras model returning (model output, features) for ``model``."""
    import keras

    last = next(layer for layer in reversed(model.layers) if len(layer.output.shape) == 4)
    pooled = keras.layers.GlobalAveragePooling2D(name="ood_features")(last.output)
    return keras.Model(model.inputs, [model.outputs[0], pooled])


def distances(features: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Mahalanobis distances in float32 (the node's tf.function computes the same)."""
    d = np.asarray(features, np.float32) - np.asarray(mean, np.float32)
    m = np.einsum("ij,jk,ik->i", d, np.asarray(precision, np.float32), d)
    return np.sqrt(np.maximum(m, 0.0))
