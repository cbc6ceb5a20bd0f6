"""Model artifact: a directory with ``model.keras`` and ``model.json`` (DESIGN.md contract).

The node refuses an artifact whose weights do not match the recorded sha256, or whose
preprocessing version differs from the node's: both would silently change every verdict.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mriqa_node.domain.scope import ModelScope
from mriqa_node.domain.verdict import NON_DIAGNOSTIC, SeriesPolicy
from mriqa_node.preprocess import INPUT_SIZE, PREPROCESSING_VERSION, SUPPORTED_VERSIONS

MODEL_FILE = "model.keras"
META_FILE = "model.json"
OOD_FILE = "ood.npz"  # the out-of-distribution guard: feature mean and precision
TASK_CLASSES = {
    "binary": ["non_diagnostic", "diagnostic"],
    "3class": ["non_diagnostic", "diagnostic", "excellent"],
}


class ArtifactError(Exception):
    """The artifact cannot be used; the message says why and what to do."""


@dataclass
class ArtifactMeta:
    name: str
    version: str
    task: str
    class_names: list[str]
    input_size: int
    preprocessing_version: str
    sha256: str
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    policy: dict[str, Any] = field(default_factory=lambda: SeriesPolicy().as_dict())
    output: str = "logits"  # what the model returns; the node applies softmax to logits
    # Logits are divided by this before the softmax (temperature scaling, fitted on the
    # validation split at export): calibrated probabilities. 1.0: as trained.
    temperature: float = 1.0
    trained: bool = True
    training_data: dict[str, Any] = field(default_factory=dict)
    # What the model is made for (domain.scope.ModelScope); the node leaves the rest unscored.
    scope: dict[str, Any] = field(default_factory=dict)
    # The OOD guard (ood.npz): {"threshold", "sha256", figures}; empty: no guard.
    ood: dict[str, Any] = field(default_factory=dict)
    test_metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ArtifactMeta:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        missing = {
            "name",
            "version",
            "task",
            "class_names",
            "input_size",
            "preprocessing_version",
            "sha256",
        } - known.keys()
        if missing:
            raise ArtifactError(f"{META_FILE} lacks {', '.join(sorted(missing))}")
        return cls(**known)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_meta(directory: Path) -> ArtifactMeta:
    """Read and check model.json and the weights' hash (no TensorFlow needed)."""
    directory = Path(directory)
    meta_path, model_path = directory / META_FILE, directory / MODEL_FILE
    if not meta_path.is_file() or not model_path.is_file():
        raise ArtifactError(
            f"{directory} is not a model artifact (needs {MODEL_FILE} and {META_FILE})"
        )
    try:
        meta = ArtifactMeta.from_json(json.loads(meta_path.read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise ArtifactError(f"{meta_path}: {exc}") from exc
    actual = sha256_file(model_path)
    if actual != meta.sha256:
        raise ArtifactError(
            f"{model_path}: sha256 {actual[:12]}... does not match model.json"
            f" ({meta.sha256[:12]}...); the weights were changed or damaged:"
            " re-export or reinstall the artifact"
        )
    if meta.preprocessing_version not in SUPPORTED_VERSIONS:
        raise ArtifactError(
            f"{directory}: trained with preprocessing v{meta.preprocessing_version}, node feeds"
            f" v{', v'.join(SUPPORTED_VERSIONS)}: retrain or export the model for this node version"
        )
    if not meta.class_names or meta.class_names[0] != NON_DIAGNOSTIC:
        raise ArtifactError(f"{directory}: class 0 must be {NON_DIAGNOSTIC!r}")
    if meta.input_size != INPUT_SIZE:
        raise ArtifactError(f"{directory}: input size {meta.input_size}, node uses {INPUT_SIZE}")
    if not (isinstance(meta.temperature, int | float) and 0 < meta.temperature < float("inf")):
        raise ArtifactError(f"{directory}: temperature must be a positive number")
    if meta.output != "logits" and meta.temperature != 1:
        raise ArtifactError(f"{directory}: a temperature needs output 'logits'")
    SeriesPolicy.from_dict(meta.policy)  # validates
    try:
        ModelScope.from_dict(meta.scope)
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"{directory}: scope: {exc}") from exc
    if meta.ood:
        ood = directory / OOD_FILE
        if not ood.is_file() or sha256_file(ood) != meta.ood.get("sha256"):
            raise ArtifactError(f"{ood}: missing or does not match model.json's ood.sha256")
        if not isinstance(meta.ood.get("threshold"), int | float):
            raise ArtifactError(f"{directory}: ood.threshold must be a number")
    return meta


def save_ood(directory: Path, meta: ArtifactMeta, mean: Any, precision: Any,
             threshold: float, figures: dict[str, Any]) -> ArtifactMeta:  # fmt: skip
    """Write ood.npz and record its hash and threshold in model.json."""
    import numpy as np

    directory = Path(directory)
    np.savez(directory / OOD_FILE, mean=np.asarray(mean, np.float32),
             precision=np.asarray(precision, np.float32))  # fmt: skip
    meta.ood = {"threshold": float(threshold), "sha256": sha256_file(directory / OOD_FILE),
                **figures}  # fmt: skip
    (directory / META_FILE).write_text(json.dumps(meta.to_json(), indent=2) + "\n")
    return meta


def save_artifact(model: Any, directory: Path, meta: ArtifactMeta) -> ArtifactMeta:
    """Write model.keras, then model.json with the weights' hash (the hash is filled in here)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save(directory / MODEL_FILE)
    meta.sha256 = sha256_file(directory / MODEL_FILE)
    (directory / META_FILE).write_text(json.dumps(meta.to_json(), indent=2) + "\n")
    return meta


def untrained_convnet_artifact(
    directory: Path,
    task: str = "binary",
    seed: int = 0,
    widths: tuple[int, ...] = (32, 64, 128, 256),
) -> ArtifactMeta:
    """A freshly initialised ConvNet: for tests (narrow widths run faster), and the node's
    fallback until a trained model is bundled."""
    import keras

    from mriqa_node.ml.architectures import convnet

    keras.utils.set_random_seed(seed)
    classes = TASK_CLASSES[task]
    model = convnet(INPUT_SIZE, len(classes), widths)
    meta = ArtifactMeta(
        name="convnet-untrained",
        version=f"0.0.0+seed{seed}",
        task=task,
        class_names=classes,
        input_size=INPUT_SIZE,
        preprocessing_version=PREPROCESSING_VERSION,
        sha256="",
        trained=False,
    )
    return save_artifact(model, directory, meta)
