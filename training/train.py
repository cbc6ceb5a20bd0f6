"""Training: the paper's recipe (Adam 1e-3, batch 32, 10,000 steps) from a manifest to a run dir.

A run directory holds everything about one training run::

    config.json       the TrainConfig, the manifest's sha256, preprocessing version, runtime
    splits.json       patient ids per split and class counts (split by patient, stratified)
    history.csv       step, train_loss, train_acc, val_loss, val_acc, seconds (one row per eval)
    tb/               TensorBoard scalars (train/ and val/ loss and accuracy)
    checkpoints/      model + optimizer + step (tf.train.CheckpointManager, last 3)
    model.keras       the final model: float32 (also after mixed precision), BN re-estimated
    predictions.npz   val and test: probabilities, labels, raters, truth, ids (see _predict)

Calling ``train`` again with the same ``out_dir`` resumes from the last checkpoint (and with a
larger ``steps`` continues the run); the split is read back from splits.json so it cannot move.

Runtime: ``MultiWorkerMirroredStrategy`` when TF_CONFIG describes a cluster, ``MirroredStrategy``
with more than one GPU, the default strategy otherwise; mixed_float16 and XLA on GPU only when
"auto" (both are slower on a CPU). ``select_runtime`` makes that choice from plain inputs.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from mriqa_node.ml.artifact import TASK_CLASSES
from mriqa_node.preprocess import PREPROCESSING_VERSION
from training.data import ImageCache, Samples, default_cache_dir, make_dataset
from training.files import replaced_atomically, write_json
from training.manifest import (
    NUM_CLASSES,
    SPLITS,
    TASKS,
    Record,
    label_of,
    manifest_sha256,
    rater_columns,
    read_manifest,
    split_by_patient,
    split_report,
    task_label,
)
from training.synth.raters import TRUTH_THRESHOLDS

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
SPLITS_FILE = "splits.json"
HISTORY_FILE = "history.csv"
MODEL_FILE = "model.keras"
PREDICTIONS_FILE = "predictions.npz"
HISTORY_COLUMNS = ("step", "train_loss", "train_acc", "val_loss", "val_acc", "seconds")
# Settings a resumed run must share with the run it continues (steps and the rest may change).
RESUME_KEYS = (
    "model", "task", "label", "batch", "lr", "input_size", "widths", "width",
    "class_weights", "seed", "fractions", "manifest_sha256", "downsample", "head", "augment",
    "val_patients", "test_patients", "soft_labels",
)  # fmt: skip


@dataclass
class TrainConfig:
    manifest: str | Path
    out_dir: str | Path
    model: str = "convnet"  # convnet | resnet10
    task: str = "binary"  # binary | 3class
    label: str = "mean"  # rater1, rater2, ..., mean, worst, truth
    steps: int = 10_000
    batch: int = 32  # global batch (split across replicas)
    lr: float = 1e-3
    input_size: int = 512
    widths: tuple[int, ...] = (32, 64, 128, 256)  # convnet
    width: int = 64  # resnet10: first stage's width
    downsample: int = 1  # convnet: average-pool the input by this factor first
    head: str = "flatten"  # convnet: flatten (the paper) or gap (global average pooling)
    augment: bool = False  # flips, gamma and gain on the fly (training batches)
    # Patients (fnmatch patterns) held out as the validation / test split whatever the
    # fractions say: a named held-out source, e.g. one vendor's subjects.
    val_patients: tuple[str, ...] = ()
    test_patients: tuple[str, ...] = ()
    class_weights: bool = False  # inverse class frequency weights in the loss
    # Binary only: train on P(non-diagnostic) = sigmoid((severity - 0.5) / soft_labels) of each
    # slice's measured severity instead of its class (0: hard labels). A slice at severity
    # 0.49 is then not taught to look like a clean one, so the score rises with the
    # severity (mild motion above clean) instead of stepping at the boundary. Records without
    # a severity (a site's rated series) keep their hard label.
    soft_labels: float = 0.0
    seed: int = 0
    eval_every: int = 200
    checkpoint_every: int = 500
    cache_dir: str | Path | None = None  # None: default_cache_dir()
    mixed_precision: str | bool = "auto"  # auto (GPU only), on, off
    xla: str | bool = "auto"  # auto (GPU only), on, off
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
    bn_recalibration: int = 16  # batches for precise BN before eval/export; 0: EMA as trained
    cache_dtype: str = "float16"
    workers: int | None = None  # decode processes (None: one per CPU)
    progress: bool = True
    # Fine-tuning: start from this artifact's (or run's) model.keras instead of random weights
    # (the same architecture: model, widths, input size, classes); e.g. the node's model.
    init_from: str | Path | None = None

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)
        self.fractions = tuple(float(f) for f in self.fractions)
        self.val_patients = tuple(self.val_patients)
        self.test_patients = tuple(self.test_patients)
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.soft_labels < 0 or (self.soft_labels > 0 and self.task != "binary"):
            raise ValueError("soft_labels is a width >= 0, for the binary task only")
        if self.steps < 0 or self.batch < 1 or self.eval_every < 1 or self.checkpoint_every < 1:
            raise ValueError("steps >= 0, batch, eval_every and checkpoint_every >= 1")

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("manifest", "out_dir", "cache_dir", "init_from"):
            out[key] = None if out[key] is None else str(out[key])
        out["widths"], out["fractions"] = list(self.widths), list(self.fractions)
        out["val_patients"] = list(self.val_patients)
        out["test_patients"] = list(self.test_patients)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def model_kwargs(self) -> dict[str, Any]:
        if self.model == "convnet":
            return {"widths": self.widths, "downsample": self.downsample, "head": self.head}
        return {"width": self.width}


# --- runtime selection ----------------------------------------------------------------------


@dataclass(frozen=True)
class Runtime:
    strategy: str  # "multi_worker" | "mirrored" | "default"
    mixed_precision: bool
    xla: bool
    gpus: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _switch(value: str | bool | None, what: str) -> bool | None:
    """'auto'/None -> None (decide by hardware); on/off, true/false, 1/0 -> bool."""
    if value is None or isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v == "auto":
        return None
    if v in ("on", "true", "1", "yes", "mixed_float16"):
        return True
    if v in ("off", "false", "0", "no", "float32"):
        return False
    raise ValueError(f"{what} must be auto, on or off, got {value!r}")


def _cluster_size(tf_config: str | None) -> int:
    """Number of tasks (chief + workers) in a TF_CONFIG JSON; 0 when unset or unusable."""
    if not tf_config:
        return 0
    try:
        cluster = json.loads(tf_config).get("cluster") or {}
    except (json.JSONDecodeError, AttributeError):
        log.warning("TF_CONFIG is not valid JSON; ignoring it")
        return 0
    return sum(len(cluster.get(role) or []) for role in ("chief", "worker"))


def select_runtime(
    gpus: int,
    tf_config: str | None = None,
    mixed_precision: str | bool = "auto",
    xla: str | bool = "auto",
) -> Runtime:
    """Pure decision from what was detected: GPU count and the TF_CONFIG environment value."""
    if _cluster_size(tf_config) > 0:
        strategy = "multi_worker"
    elif gpus > 1:
        strategy = "mirrored"
    else:
        strategy = "default"
    mp, jit = _switch(mixed_precision, "mixed_precision"), _switch(xla, "xla")
    return Runtime(
        strategy=strategy,
        mixed_precision=(gpus > 0) if mp is None else mp,
        xla=(gpus > 0) if jit is None else jit,
        gpus=gpus,
    )


def detect_runtime(config: TrainConfig) -> Runtime:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        with contextlib.suppress(RuntimeError):  # already initialised: keep its setting
            tf.config.experimental.set_memory_growth(gpu, True)
    return select_runtime(
        len(gpus), os.environ.get("TF_CONFIG"), config.mixed_precision, config.xla
    )


def make_strategy(runtime: Runtime):
    import tensorflow as tf

    if runtime.strategy == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if runtime.strategy == "mirrored":
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def _is_chief(strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return True
    has_chief = "chief" in (resolver.cluster_spec().as_dict() or {})
    if resolver.task_type == "chief":
        return True
    return not has_chief and resolver.task_type == "worker" and resolver.task_id == 0


@contextlib.contextmanager
def _dtype_policy(name: str):
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


# --- labels and splits ----------------------------------------------------------------------


def class_weights(labels: Sequence[int] | np.ndarray, num_classes: int) -> np.ndarray:
    """Inverse-frequency weights n / (k * n_c), mean weight over the samples is 1.

    A class absent from ``labels`` gets weight 1 (it never occurs, so it does not matter).
    """
    labels = np.asarray(labels, np.int64)
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.ones(num_classes, np.float64)
    present = counts > 0
    weights[present] = len(labels) / (num_classes * counts[present])
    return weights.astype(np.float32)


@dataclass
class SplitData:
    records: list[Record]
    samples: Samples
    labels: np.ndarray  # task labels per sample (int32)
    targets: np.ndarray | None = None  # soft P(class) per sample [n, classes], or None


def soft_targets(records: Sequence[Record], labels: np.ndarray, width: float) -> np.ndarray:
    """[n, 2] float32 (P(non-diagnostic), P(diagnostic)) from the measured severity around the
    truth's non-diagnostic boundary; a record without severity keeps its hard label."""
    boundary = TRUTH_THRESHOLDS[1]
    severity = np.asarray([np.nan if r.severity is None else r.severity for r in records])
    p = 1.0 / (1.0 + np.exp(-(np.nan_to_num(severity) - boundary) / width))
    p = np.where(np.isnan(severity), (np.asarray(labels) == 0).astype(float), p)
    return np.stack([p, 1.0 - p], axis=1).astype(np.float32)


def _prepare_data(
    config: TrainConfig, out: Path, manifest_hash: str, chief: bool
) -> tuple[dict[str, SplitData], ImageCache]:
    records = read_manifest(config.manifest)
    labels3 = [label_of(r, config.label) for r in records]
    unlabelled = sum(lab is None for lab in labels3)
    if unlabelled:
        log.warning("%d record(s) without a %s label are left out", unlabelled, config.label)
    kept = [(r, lab) for r, lab in zip(records, labels3, strict=True) if lab is not None]
    if not kept:
        raise ValueError(f"{config.manifest}: no record has a {config.label!r} label")
    labels = {r.sop_instance_uid: task_label(lab, config.task) for r, lab in kept}
    kept_records = [r for r, _ in kept]

    splits_path = out / SPLITS_FILE
    if splits_path.is_file():  # resume: the split of the first run, whatever the code does now
        saved = json.loads(splits_path.read_text())
        where = {p: s for s in SPLITS for p in saved["patients"][s]}
        splits = {s: [r for r in kept_records if where.get(r.patient_id) == s] for s in SPLITS}
    else:
        splits = _split(kept_records, labels, config)
        if chief:
            report = split_report(splits, labels)
            write_json(
                splits_path,
                {
                    "manifest_sha256": manifest_hash,
                    "label": config.label,
                    "task": config.task,
                    "fractions": list(config.fractions),
                    "seed": config.seed,
                    "counts": report,
                    "patients": {s: sorted({r.patient_id for r in splits[s]}) for s in SPLITS},
                },
            )
    cache = ImageCache(config.cache_dir or default_cache_dir(), config.input_size,
                       config.cache_dtype)  # fmt: skip
    stats = cache.build(kept_records, workers=config.workers, progress=config.progress)
    log.info("image cache %s: %s", cache.directory, stats)
    data = {}
    for name in SPLITS:
        recs = splits[name]
        samples = cache.samples(recs)
        y = np.asarray([labels[recs[i].sop_instance_uid] for i in samples.record], np.int32)
        soft = None
        if config.soft_labels > 0:
            soft = soft_targets([recs[i] for i in samples.record], y, config.soft_labels)
        data[name] = SplitData(recs, samples, y, soft)
    if len(data["train"].samples) == 0:
        raise ValueError("the training split has no decodable image")
    return data, cache


def _split(records: list[Record], labels: dict[str, int], config: TrainConfig):
    """Named held-out patients first (``val_patients``, ``test_patients``), the rest by
    patient in the configured fractions."""
    from fnmatch import fnmatchcase

    def held(r: Record, patterns: Sequence[str]) -> bool:
        return any(fnmatchcase(r.patient_id, p) for p in patterns)

    fixed = {
        "val": [r for r in records if held(r, config.val_patients)],
        "test": [r for r in records if held(r, config.test_patients)],
    }
    taken = {r.patient_id for rs in fixed.values() for r in rs}
    rest = [r for r in records if r.patient_id not in taken]
    splits = split_by_patient(
        rest, [labels[r.sop_instance_uid] for r in rest], config.fractions, config.seed
    )
    for name, rs in fixed.items():
        splits[name] = rs + splits[name]
    return splits


# --- the run --------------------------------------------------------------------------------


def train(config: TrainConfig, strategy: Any = None) -> Path:
    """Train (or resume) and return the run directory. ``strategy`` overrides the detected
    tf.distribute strategy (tests, or a caller that built one at start-up)."""
    import keras
    import tensorflow as tf

    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runtime = detect_runtime(config)
    if strategy is None:
        strategy = make_strategy(runtime)
    elif strategy.num_replicas_in_sync > 1 and runtime.strategy == "default":
        runtime = Runtime("mirrored", runtime.mixed_precision, runtime.xla, runtime.gpus)
    chief = _is_chief(strategy)
    manifest_hash = manifest_sha256(config.manifest)
    _check_resume(out, config, manifest_hash)
    if chief:
        write_json(
            out / CONFIG_FILE,
            {
                **config.to_json(),
                "manifest_sha256": manifest_hash,
                "preprocessing_version": PREPROCESSING_VERSION,
                "num_classes": NUM_CLASSES[config.task],
                "class_names": TASK_CLASSES[config.task],
                "runtime": {**runtime.as_dict(), "replicas": strategy.num_replicas_in_sync},
                "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
            },
        )
    log.info("runtime: %s, %d replica(s)", runtime, strategy.num_replicas_in_sync)
    data, cache = _prepare_data(config, out, manifest_hash, chief)
    num_classes = NUM_CLASSES[config.task]
    train_y = data["train"].labels
    train_targets = data["train"].targets if data["train"].targets is not None else train_y
    weights = (
        class_weights(train_y, num_classes) if config.class_weights
        else np.ones(num_classes, np.float32)
    )  # fmt: skip

    policy = "mixed_float16" if runtime.mixed_precision else "float32"
    with _dtype_policy(policy), strategy.scope():
        keras.utils.set_random_seed(config.seed)
        from training.models import build_model

        model = build_model(config.model, config.input_size, num_classes, **config.model_kwargs())
        if config.init_from:
            _init_weights(model, Path(config.init_from))
        optimizer = keras.optimizers.Adam(config.lr)
        if runtime.mixed_precision:
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        optimizer.build(model.trainable_variables)
        step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        seconds = tf.Variable(0.0, dtype=tf.float64, trainable=False, name="seconds")
    # The plain Adam is checkpointed (under mixed precision the loss-scale wrapper's inner one;
    # the dynamic loss scale re-adapts in a few steps): a run can resume with or without it.
    adam = getattr(optimizer, "inner_optimizer", optimizer)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=adam, step=step, seconds=seconds)
    ckpt_dir = out / "checkpoints" if chief else out / f"tmp-worker-{_task_id(strategy)}"
    manager = tf.train.CheckpointManager(checkpoint, str(ckpt_dir), max_to_keep=3)
    if manager.latest_checkpoint:
        status = checkpoint.restore(manager.latest_checkpoint)
        try:
            status.assert_existing_objects_matched()
        except AssertionError as exc:
            raise RuntimeError(
                f"{manager.latest_checkpoint} does not fit this model and optimizer: {exc}"
            ) from exc
        log.info("resuming from %s (step %d)", manager.latest_checkpoint, int(step))
    start = int(step.numpy())
    if start > config.steps:
        log.warning("%s is already at step %d (> steps=%d): nothing to train", out, start,
                    config.steps)  # fmt: skip
    history = _History(out / HISTORY_FILE, keep_up_to=start, enabled=chief)

    evaluator = _Evaluator(config, num_classes, cache, data["train"])
    val_ds = make_dataset(
        cache, data["val"].samples.rows, data["val"].labels, config.batch, drop_remainder=False
    )
    if start < config.steps:
        train_step = make_train_step(
            model, optimizer, strategy, config.batch, weights, xla=runtime.xla
        )
        # Mixed precision: float16 straight from the cache, cast on the device (same values).
        transport = "float16" if runtime.mixed_precision and cache.dtype == "float16" else None
        train_ds = make_dataset(
            cache, data["train"].samples.rows, train_targets, config.batch,
            shuffle=True, repeat=True, seed=config.seed + start,  # fresh order after a resume
            dtype=transport or "float32", augment=config.augment,
        )  # fmt: skip
        iterator = iter(strategy.experimental_distribute_dataset(train_ds))
        writer = tf.summary.create_file_writer(str(out / "tb")) if chief else None
        _run_loop(
            train_step, evaluator, model, iterator, val_ds, start, config, step, seconds, manager,
            history, writer, chief,
        )  # fmt: skip
    if chief:
        evaluator.sync(model)
        evaluator.model.save(out / MODEL_FILE)
        _predict(evaluator, cache, data, config, out / PREDICTIONS_FILE)
    return out


def _init_weights(model, source: Path) -> None:
    """Copy a trained model's weights into ``model`` (fine-tuning); refuses another shape."""
    import keras

    path = source / MODEL_FILE if source.is_dir() else source
    trained = keras.models.load_model(path, compile=False)
    mine, theirs = model.weights, trained.weights
    shapes = [tuple(w.shape) for w in mine], [tuple(w.shape) for w in theirs]
    if shapes[0] != shapes[1]:
        raise ValueError(f"--init-from {source}: its architecture differs from this run's"
                         " (model, widths, input size and classes must match)")  # fmt: skip
    for dst, src in zip(mine, theirs, strict=True):
        dst.assign(src.numpy())
    log.info("fine-tuning from %s (%d weight tensors)", path, len(mine))


def make_train_step(model, optimizer, strategy, batch: int, weights=None, xla: bool = False):
    """A compiled ``train_step(iterator) -> (ce_sum, correct, n)`` over a distributed iterator
    of (images, labels): one optimizer step on the global ``batch``, the loss weighted per
    class by ``weights`` (None: unweighted); labels are class indices, or soft targets
    [b, classes] (float), whose most likely class then counts for the accuracy and weight;
    summed over replicas (plain, unweighted cross entropy sum, correct predictions and count,
    for logging). XLA compiles forward and backward;
    the optimizer (with its cross-replica all-reduce) stays outside the compiled function.
    """
    import tensorflow as tf

    num_classes = int(model.output_shape[-1])
    cw = tf.constant(np.ones(num_classes) if weights is None else weights, tf.float32)
    variables = model.trainable_variables

    @tf.function(jit_compile=xla)
    def gradients(x, y):
        with tf.GradientTape() as tape:
            logits = tf.cast(model(x, training=True), tf.float32)
            if y.dtype.is_floating:  # soft targets
                ce = tf.nn.softmax_cross_entropy_with_logits(labels=y, logits=logits)
                y = tf.argmax(y, axis=-1, output_type=tf.int32)
            else:
                ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
            loss = tf.nn.compute_average_loss(ce * tf.gather(cw, y), global_batch_size=batch)
            scaled = optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, variables)
        return grads, _sums(ce, logits, y)

    def replica_step(x, y):
        grads, sums = gradients(x, y)
        optimizer.apply_gradients(zip(grads, variables, strict=True))
        return sums

    @tf.function
    def train_step(iterator):
        x, y = next(iterator)
        sums = strategy.run(replica_step, args=(x, y))
        return [strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for v in sums]

    return train_step


class _Evaluator:
    """A float32 copy of the model outside any strategy (what the node will run): takes the
    training model's weights, re-estimates batch-norm statistics on training batches
    (``bn_recalibration``), then evaluates and predicts."""

    def __init__(self, config: TrainConfig, num_classes: int, cache, train: SplitData) -> None:
        import tensorflow as tf

        from training.models import BatchNormCalibrator, build_model

        with _dtype_policy("float32"):
            self.model = build_model(
                config.model, config.input_size, num_classes, **config.model_kwargs()
            )
        self.calibrate = BatchNormCalibrator(self.model)
        self.bn_batches = config.bn_recalibration if len(train.samples) else 0

        def bn_data():
            """The same training batches at every sync, so that a run resumed at its last
            step exports the very model the uninterrupted run did."""
            ds = make_dataset(cache, train.samples.rows, train.labels, config.batch,
                              shuffle=True, repeat=True, seed=config.seed + 1)  # fmt: skip
            return ds.take(self.bn_batches)

        self._bn_data = bn_data
        model = self.model

        @tf.function(reduce_retracing=True)
        def logits(x):
            return tf.cast(model(x, training=False), tf.float32)

        self.logits = logits

    def sync(self, training_model) -> None:
        for dst, src in zip(self.model.weights, training_model.weights, strict=True):
            dst.assign(src.value)  # float32 master weights, also under mixed precision
        if self.bn_batches > 0:
            self.calibrate(iter(self._bn_data()))

    def evaluate(self, ds) -> tuple[float, float]:
        import tensorflow as tf

        total = np.zeros(3)
        for x, y in ds:
            z = self.logits(x)
            ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=z)
            total += [float(v) for v in _sums(ce, z, y)]
        if total[2] == 0:
            return math.nan, math.nan
        return total[0] / total[2], total[1] / total[2]

    def predict(self, ds) -> np.ndarray:
        """[n, classes] raw logits (the export fits its temperature on them)."""
        out = [np.zeros((0, self.model.output_shape[-1]), np.float32)]
        out += [self.logits(x).numpy() for x, _ in ds]
        return np.concatenate(out)


def _sums(ce, logits, y):
    import tensorflow as tf

    pred = tf.argmax(logits, axis=-1, output_type=tf.int32)
    correct = tf.reduce_sum(tf.cast(tf.equal(pred, y), tf.float32))
    return tf.reduce_sum(ce), correct, tf.cast(tf.size(y), tf.float32)


def _run_loop(
    train_step, evaluator, model, iterator, val_ds, start, config, step, seconds, manager, history,
    writer, chief,
) -> None:  # fmt: skip
    from tqdm.auto import tqdm

    base = float(seconds.numpy())
    t0 = time.perf_counter()
    acc = None  # running (ce_sum, correct, n) since the last eval, as tensors (no sync)
    bar = tqdm(
        total=config.steps, initial=start, desc=f"train {config.model}", unit="step",
        disable=not (config.progress and chief), dynamic_ncols=True,
    )  # fmt: skip
    shown = time.monotonic()
    for s in range(start + 1, config.steps + 1):
        sums = train_step(iterator)
        acc = sums if acc is None else [a + b for a, b in zip(acc, sums, strict=True)]
        bar.update()
        last = s == config.steps
        if not bar.disable and (time.monotonic() - shown > 1.0 or last):
            ce, correct, n = (float(v) for v in acc)
            bar.set_postfix(loss=f"{ce / n:.4f}", acc=f"{correct / n:.3f}")
            shown = time.monotonic()
        if chief and (s % config.eval_every == 0 or last):  # other workers go straight on
            ce, correct, n = (float(v) for v in acc)
            evaluator.sync(model)
            val_loss, val_acc = evaluator.evaluate(val_ds)
            elapsed = base + time.perf_counter() - t0
            row = (s, ce / n, correct / n, val_loss, val_acc, elapsed)
            history.append(row)
            if writer is not None:
                with writer.as_default():
                    for name, value in zip(HISTORY_COLUMNS[1:5], row[1:5], strict=True):
                        split, metric = name.split("_")
                        _scalar(f"{split}/{metric}", value, s)
                writer.flush()
            acc = None
            if not bar.disable:
                bar.write(
                    f"step {s}: train loss {row[1]:.4f} acc {row[2]:.3f}"
                    f" | val loss {val_loss:.4f} acc {val_acc:.3f}"
                )
        if s % config.checkpoint_every == 0 or last:
            step.assign(s)
            seconds.assign(base + time.perf_counter() - t0)
            manager.save(checkpoint_number=s)
    bar.close()
    if writer is not None:
        writer.close()


def _scalar(tag: str, value: float, step: int) -> None:
    """A TensorBoard scalar without needing the tensorboard package (its scalar plugin's
    metadata, written with TensorFlow's own summary op)."""
    import tensorflow as tf
    from tensorflow.core.framework import summary_pb2

    meta = summary_pb2.SummaryMetadata()
    meta.plugin_data.plugin_name = "scalars"
    tf.summary.write(tag, tf.constant(value, tf.float32), step=step, metadata=meta)


def _predict(evaluator, cache: ImageCache, data: dict[str, SplitData], config, path) -> None:
    """predictions.npz, per split in (val, test), keys ``{split}_{field}``:

    logits [n, classes] the model's output; probs their softmax (temperature 1); labels
    (training labels); label3 (3-class label of the label source); raters [n, r] (-1 unrated,
    columns in ``rater_names``); truth (-1 if unknown); patient_ids, series_uids, sop_uids;
    frames (frame within the file); instance.
    Plus task, class_names, label_source. Strings are unicode arrays (no pickle needed).
    """
    from training.calibration import softmax

    rater_names = rater_columns(r for d in data.values() for r in d.records)
    out: dict[str, Any] = {
        "task": np.str_(config.task),
        "class_names": np.asarray(TASK_CLASSES[config.task]),
        "label_source": np.str_(config.label),
        "rater_names": np.asarray(rater_names, dtype=str),
    }
    for split in ("val", "test"):
        d = data[split]
        recs = [d.records[i] for i in d.samples.record]
        ds = make_dataset(cache, d.samples.rows, d.labels, config.batch, drop_remainder=False)
        out[f"{split}_logits"] = evaluator.predict(ds)
        out[f"{split}_probs"] = softmax(out[f"{split}_logits"]).astype(np.float32)
        out[f"{split}_labels"] = d.labels.astype(np.int32)
        out[f"{split}_label3"] = np.asarray(
            [_or(label_of(r, config.label)) for r in recs], np.int32
        )
        out[f"{split}_raters"] = np.asarray(
            [[_or(r.raters.get(n)) for n in rater_names] for r in recs], np.int32
        ).reshape(len(recs), len(rater_names))
        out[f"{split}_truth"] = np.asarray([_or(r.true_class) for r in recs], np.int32)
        out[f"{split}_patient_ids"] = np.asarray([r.patient_id for r in recs], dtype=str)
        out[f"{split}_series_uids"] = np.asarray([r.series_uid for r in recs], dtype=str)
        out[f"{split}_sop_uids"] = np.asarray([r.sop_instance_uid for r in recs], dtype=str)
        out[f"{split}_frames"] = d.samples.frame.astype(np.int32)
        out[f"{split}_instance"] = np.asarray([_or(r.instance) for r in recs], np.int32)
    with replaced_atomically(path) as tmp:
        np.savez(tmp, **out)


def _or(value: int | None, missing: int = -1) -> int:
    return missing if value is None else int(value)


def _task_id(strategy) -> int:
    resolver = getattr(strategy, "cluster_resolver", None)
    return int(getattr(resolver, "task_id", 0) or 0)


def _check_resume(out: Path, config: TrainConfig, manifest_hash: str) -> None:
    path = out / CONFIG_FILE
    if not path.is_file():
        return
    before = json.loads(path.read_text())
    now = {**config.to_json(), "manifest_sha256": manifest_hash}
    keys = [k for k in RESUME_KEYS if not (k == "widths" and config.model != "convnet")]
    keys = [k for k in keys if not (k == "width" and config.model != "resnet10")]
    changed = [k for k in keys if k in before and before[k] != now[k]]
    if changed:
        detail = ", ".join(f"{k}: {before[k]!r} -> {now[k]!r}" for k in changed)
        raise ValueError(
            f"{out} holds a run with other settings ({detail}); use a new out_dir to start over"
        )


@dataclass
class _History:
    """history.csv, appended row by row; a resumed run drops rows past its checkpoint."""

    path: Path
    keep_up_to: int
    enabled: bool = True

    def __post_init__(self) -> None:
        if not self.enabled:
            return
        kept = []
        if self.path.is_file():
            with self.path.open(newline="") as fh:
                kept = [row for row in csv.DictReader(fh) if int(row["step"]) <= self.keep_up_to]
        with self.path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(HISTORY_COLUMNS)
            for row in kept:
                writer.writerow([row[c] for c in HISTORY_COLUMNS])

    def append(self, row: tuple) -> None:
        if not self.enabled:
            return
        with self.path.open("a", newline="") as fh:
            csv.writer(fh).writerow(
                [row[0], *(f"{v:.6g}" if isinstance(v, float) else v for v in row[1:])]
            )


def read_history(run_dir: Path | str) -> list[dict[str, float]]:
    with (Path(run_dir) / HISTORY_FILE).open(newline="") as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]
