"""The paper's ConvNet as a short Keras builder (training adds its own models beside it).

Four convolutions (10x10, 7x7, 3x3, 3x3), each stride 2 and each followed by ReLU then batch
normalisation, as the paper orders them; flatten; one dense layer to the class logits.

Two options leave the four convolutions as they are: ``downsample`` averages the 512 px input
down first (motion ghosts and smearing are plain at 256 px; each halving makes a step about 4x
cheaper on a CPU), and ``head="gap"`` replaces flatten with global average pooling, which
counts artefact evidence wherever it is in the image instead of learning where anatomy sits:
with a few dozen real subjects that is what generalises to another vendor's framing.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import layers

HEADS = ("flatten", "gap")


def convnet(
    input_size: int = 512,
    num_classes: int = 2,
    widths: Sequence[int] = (32, 64, 128, 256),
    name: str = "convnet",
    downsample: int = 1,
    head: str = "flatten",
) -> keras.Model:
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    inputs = keras.Input((input_size, input_size, 1), name="image")
    x = inputs
    if downsample > 1:
        x = layers.AveragePooling2D(downsample, name="downsample")(x)
    for i, (width, kernel) in enumerate(zip(widths, (10, 7, 3, 3), strict=True), start=1):
        x = layers.Conv2D(width, kernel, strides=2, padding="same", name=f"conv{i}")(x)
        x = layers.ReLU(name=f"relu{i}")(x)
        x = layers.BatchNormalization(name=f"bn{i}")(x)
    if head == "gap":
        x = layers.GlobalAveragePooling2D(name="gap")(x)
    else:
        x = layers.Flatten(name="flatten")(x)
    logits = layers.Dense(num_classes, name="logits", dtype="float32")(x)
    return keras.Model(inputs, logits, name=name)
