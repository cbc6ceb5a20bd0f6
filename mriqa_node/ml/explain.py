"""Grad-CAM heat maps: where in a slice the model sees the non-diagnostic evidence.

For the technologist console: a map per slice, in the slice's own pixel grid, that says which
region drove P(non-diagnostic) up (Selvaraju et al., 2017). Works for any artifact whose model
has convolutions; the feature map is found automatically (see ``feature_layer``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mriqa_node.ml.artifact import MODEL_FILE, ArtifactError, ArtifactMeta, read_meta
from mriqa_node.ml.scorer import Device, detect_device


def feature_layer(model: Any) -> Any:
    """The last layer with a spatial ([n, h, w, c]) output: the feature map the head reads.

    ``bn4`` in the paper's ConvNet, the final block's ReLU in ResNet-10 (which, unlike the last
    Conv2D, includes the shortcut). Taking the map after batch normalisation, not before it,
    matters: Grad-CAM is linear in the features, so the mean activation every position shares
    (ReLU outputs are non-negative) paints the whole background; normalisation centres it away
    (trained toy models: 90-97 % of the heat in the artefact's quadrant on ``bn4``, 60-85 % on
    ``relu4``).
    """
    import keras

    if not any(isinstance(layer, keras.layers.Conv2D) for layer in model.layers):
        raise ArtifactError(f"model {model.name!r} has no Conv2D layer: no Grad-CAM for it")
    return [layer for layer in model.layers if len(layer.output.shape) == 4][-1]


class HeatMapper:
    """Loads a model artifact and turns preprocessed slices into Grad-CAM maps in [0, 1].

    The map explains the log-odds of the non-diagnostic class, log(p0 / (1 - p0)) =
    z0 - logsumexp(z1..): unlike the raw logit z0 it ignores evidence that raises every class
    alike (softmax is shift-invariant), and unlike log p0 or p0 its gradient does not vanish
    when the model is confident, which is exactly when the console shows the map. The artifact's
    temperature is left out on purpose: it scales the log-odds, and each map is normalised to its
    peak, so it cannot change a map.
    """

    def __init__(self, artifact_dir: Path, device: Device | None = None) -> None:
        import keras
        import tensorflow as tf

        self.artifact_dir = Path(artifact_dir)
        self.meta: ArtifactMeta = read_meta(self.artifact_dir)
        self.device = device or detect_device()
        size = self.meta.input_size
        logits = self.meta.output == "logits"
        with tf.device(self.device.name):
            model = keras.saving.load_model(self.artifact_dir / MODEL_FILE, compile=False)
            self.layer_name = feature_layer(model).name
            self._model = keras.Model(
                model.inputs[0], [model.get_layer(self.layer_name).output, model.outputs[0]]
            )

        def grad_cam(x: tf.Tensor) -> tf.Tensor:
            with tf.GradientTape() as tape:
                features, y = self._model(x, training=False)
                features = tf.cast(features, tf.float32)
                z = tf.cast(y, tf.float32)
                z = z if logits else tf.math.log(tf.maximum(z, 1e-12))
                log_odds = z[:, 0] - tf.reduce_logsumexp(z[:, 1:], axis=1)
            # Summing over the batch keeps images independent: each log-odds depends on its own
            # features only.
            grads = tf.cast(tape.gradient(log_odds, features), tf.float32)
            weights = tf.reduce_mean(grads, axis=[1, 2], keepdims=True)
            cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1, keepdims=True))
            cam = tf.image.resize(cam, (size, size), method="bilinear")[..., 0]
            peak = tf.reduce_max(cam, axis=[1, 2], keepdims=True)
            return tf.math.divide_no_nan(cam, peak)  # an all-zero map stays zero

        self._grad_cam = tf.function(
            grad_cam,
            input_signature=[tf.TensorSpec([None, size, size, 1], tf.float32)],
            jit_compile=self.device.gpu,
            reduce_retracing=True,
            autograph=False,  # no tensor-dependent control flow to convert
        )

    @property
    def sha256(self) -> str:
        """The weights' hash: maps are a pure function of it and the pixels (a cache key)."""
        return self.meta.sha256

    def heat_maps(self, images: np.ndarray) -> np.ndarray:
        """[n, size, size, 1] float32 in [0, 1] (preprocess output) -> [n, size, size] in [0, 1]."""
        import tensorflow as tf

        size = self.meta.input_size
        if images.shape[0] == 0:
            return np.zeros((0, size, size), np.float32)
        with tf.device(self.device.name):
            return self._grad_cam(tf.convert_to_tensor(images, tf.float32)).numpy()
