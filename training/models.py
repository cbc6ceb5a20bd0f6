"""Model builders: the paper's ConvNet (shared with the node) and the ResNet-10 baseline.

Both take a [size, size, 1] image in [0, 1] and return class logits from a float32 final layer,
so they train under the mixed_float16 policy and load in the node (which applies softmax).
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import layers

from mriqa_node.ml.architectures import convnet

__all__ = ["MODELS", "BatchNormCalibrator", "build_model", "convnet", "resnet10"]


def _conv_bn(x, filters: int, kernel: int, strides: int, name: str, relu: bool = True):
    x = layers.Conv2D(
        filters, kernel, strides=strides, padding="same", use_bias=False, name=f"{name}_conv"
    )(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x) if relu else x


def basic_block(x, filters: int, strides: int, name: str):
    """Two 3x3 convolutions with batch norm; a 1x1 projection shortcut when the shape changes."""
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = _conv_bn(x, filters, 1, strides, f"{name}_proj", relu=False)
    x = _conv_bn(x, filters, 3, strides, f"{name}_1")
    x = _conv_bn(x, filters, 3, 1, f"{name}_2", relu=False)
    x = layers.Add(name=f"{name}_add")([shortcut, x])
    return layers.ReLU(name=f"{name}_out")(x)


def resnet10(
    input_size: int = 512, num_classes: int = 2, width: int = 64, name: str = "resnet10"
) -> keras.Model:
    """ResNet-10: 7x7/2 stem and 3x3/2 max pool, four stages of one basic block each
    (widths w, 2w, 4w, 8w; strides 1, 2, 2, 2), global average pooling, dense logits."""
    inputs = keras.Input((input_size, input_size, 1), name="image")
    x = _conv_bn(inputs, width, 7, 2, "stem")
    x = layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)
    stages = ((1, 1), (2, 2), (4, 2), (8, 2))  # (width multiplier, stride)
    for i, (mult, strides) in enumerate(stages, start=1):
        x = basic_block(x, width * mult, strides, name=f"stage{i}")
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    logits = layers.Dense(num_classes, name="logits", dtype="float32")(x)
    return keras.Model(inputs, logits, name=name)


MODELS = ("convnet", "resnet10")


def build_model(
    name: str,
    input_size: int = 512,
    num_classes: int = 2,
    widths: Sequence[int] | None = None,
    width: int | None = None,
    downsample: int = 1,
    head: str = "flatten",
) -> keras.Model:
    """``convnet`` takes ``widths`` (four), ``downsample`` and ``head``; ``resnet10`` takes
    ``width`` (the first stage's)."""
    if name == "convnet":
        widths = tuple(widths or (32, 64, 128, 256))
        return convnet(input_size, num_classes, widths, downsample=downsample, head=head)
    if name == "resnet10":
        return resnet10(input_size, num_classes, int(width or 64))
    raise ValueError(f"unknown model {name!r} (one of {', '.join(MODELS)})")


class BatchNormCalibrator:
    """Re-estimates every BatchNormalization layer's moving statistics for the current weights
    ("precise BN"): the average batch mean and variance of each layer's input over some
    training batches, with the network in training mode as during training.

    The moving averages kept during training (momentum 0.99, ~100 steps of memory) describe
    the weights of the last hundred or so steps; early in training, or in short runs, they lag
    so far behind that inference-mode outputs are useless (a run of a few hundred steps can be
    perfect in training mode and at chance in inference mode). Recomputing them costs a few
    forward passes and changes nothing else.
    """

    def __init__(self, model: keras.Model) -> None:
        import tensorflow as tf

        self.layers = [x for x in model.layers if isinstance(x, layers.BatchNormalization)]
        if not self.layers:
            self._moments = None
            return
        probe = keras.Model(model.input, [layer.input for layer in self.layers])

        @tf.function(reduce_retracing=True)
        def moments(x):
            outs = probe(x, training=True)
            return [tf.nn.moments(tf.cast(o, tf.float32), axes=[0, 1, 2]) for o in outs]

        self._moments = moments

    def __call__(self, batches) -> int:
        """``batches``: an iterable of image batches (or (images, labels) pairs). Returns the
        number of batches used (0 leaves the statistics as they were)."""
        if self._moments is None:
            return 0
        sums, n = None, 0
        for batch in batches:
            x = batch[0] if isinstance(batch, tuple | list) else batch
            stats = self._moments(x)
            if sums is None:
                sums = [[m, v] for m, v in stats]
            else:
                for acc, (m, v) in zip(sums, stats, strict=True):
                    acc[0] += m
                    acc[1] += v
            n += 1
        if n == 0:
            return 0
        for layer, (m, v) in zip(self.layers, sums, strict=True):
            layer.moving_mean.assign(m / n)
            layer.moving_variance.assign(v / n)
        return n
