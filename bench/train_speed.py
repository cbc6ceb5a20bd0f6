"""Training speed at the node's 512x512 input: model steps/s against input-pipeline images/s.

Phantom series (mriqa_node.phantom, 512 px) are written as DICOM, decoded once into an
ImageCache (decode rate reported), then, in one process:

  pipeline    make_dataset over the cache (shuffle, repeat, batch, parallel gather, prefetch),
              no model: how many images/s the input side can deliver
  models      training steps (the training package's own compiled train step, Adam, batch 32)
              on one in-memory batch after warm-up: how many images/s the model consumes
  fed         the fastest model again, alternately fed by the pipeline and by the in-memory
              batch (same compiled step): what the pipeline costs the training loop

ratio = pipeline images/s / model images/s (the pipeline should stay >= 3x ahead). The last
columns extrapolate to the paper's 10,000 steps and to what one hour buys.
Run: .venv/bin/python bench/train_speed.py [--steps 3] [--batch 32] [--models ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import machine_line, table

MODELS = {
    "convnet-32": ("convnet", {"widths": (32, 64, 128, 256)}),
    "convnet-16": ("convnet", {"widths": (16, 32, 64, 128)}),
    "resnet10-64": ("resnet10", {"width": 64}),
    # The bundled model's recipe: the paper's four convolutions on a 2x pooled input, GAP head.
    "bundle": ("convnet", {"widths": (16, 32, 64, 128), "downsample": 2, "head": "gap"}),
}


def make_cache(root: Path, n_series: int, n_slices: int):
    from mriqa_node.phantom import synth_series, write_series
    from training.data import ImageCache
    from training.manifest import Record

    records = []
    for s in range(n_series):
        datasets = synth_series(n_slices, 512, motion=float(s % 2), seed=s, patient_id=f"B{s}")
        paths = write_series(datasets, root / "dicom" / f"s{s}")
        for ds, path in zip(datasets, paths, strict=True):
            records.append(
                Record(path, f"B{s}", ds.StudyInstanceUID, ds.SeriesInstanceUID,
                       ds.SOPInstanceUID, int(ds.InstanceNumber), {"rater1": s % 2})
            )  # fmt: skip
    cache = ImageCache(root / "cache", 512)
    t0 = time.perf_counter()
    cache.build(records, progress=False)
    decode_rate = len(records) / (time.perf_counter() - t0)
    return cache, decode_rate


def pipeline_rate(
    cache, batch: int, batches: int, dtype: str = "float32", augment: bool = False
) -> float:
    import numpy as np

    from training.data import make_dataset

    rows = np.arange(len(cache))
    ds = make_dataset(cache, rows, rows % 2, batch, shuffle=True, repeat=True, seed=0, dtype=dtype,
                      augment=augment)  # fmt: skip
    it = iter(ds)
    for _ in range(3):  # warm-up: threads, autotuning, page cache
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        x, _y = next(it)
    _ = x.numpy()
    return batches * batch / (time.perf_counter() - t0)


def model_rate(kind: str, kwargs: dict, batch: int, steps: int, pipeline=None) -> dict:
    """Seconds per training step on one in-memory batch; with ``pipeline`` (a dataset), also
    fed by it, alternating blocks of steps of the two on the same compiled step, so that drift
    and noise on a shared machine hit both alike."""
    import keras
    import numpy as np
    import tensorflow as tf

    from training.models import build_model
    from training.train import make_train_step

    keras.utils.set_random_seed(0)
    strategy = tf.distribute.get_strategy()
    model = build_model(kind, 512, 2, **kwargs)
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(model.trainable_variables)
    step = make_train_step(model, optimizer, strategy, batch)
    rng = np.random.default_rng(0)
    x = rng.random((batch, 512, 512, 1), np.float32)
    y = (np.arange(batch) % 2).astype(np.int32)
    sources = {"memory": iter(tf.data.Dataset.from_tensors((x, y)).repeat())}
    if pipeline is not None:
        sources["pipeline"] = iter(pipeline)
    t0 = time.perf_counter()
    for it in sources.values():
        float(step(it)[0])  # trace + first step
    warm = time.perf_counter() - t0
    spent = dict.fromkeys(sources, 0.0)
    done = dict.fromkeys(sources, 0)
    block = 1 if pipeline is None else 2
    while min(done.values()) < steps:
        for name, it in sources.items():
            t0 = time.perf_counter()
            for _ in range(block):
                out = step(it)
            float(out[0])
            spent[name] += time.perf_counter() - t0
            done[name] += block
    per_step = {name: spent[name] / done[name] for name in sources}
    return {"params": model.count_params(), "warm_s": warm, "s_per_step": per_step["memory"],
            "fed_s_per_step": per_step.get("pipeline")}  # fmt: skip


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--series", type=int, default=4, help="phantom series of 32 slices")
    args = parser.parse_args()

    import tensorflow as tf

    print(f"# training speed at 512x512, batch {args.batch}")
    print(machine_line())
    print(f"TensorFlow {tf.__version__}, GPUs: {len(tf.config.list_physical_devices('GPU'))}")
    with tempfile.TemporaryDirectory(prefix="mriqa-train-bench-") as tmp:
        cache, decode = make_cache(Path(tmp), args.series, 32)
        pipe = pipeline_rate(cache, args.batch, batches=40)
        pipe16 = pipeline_rate(cache, args.batch, batches=40, dtype="float16")
        augmented = pipeline_rate(cache, args.batch, batches=40, augment=True)
        print(f"cache: {len(cache)} images decoded at {decode:.0f} files/s (one-off)")
        print(f"input pipeline alone: {pipe:.0f} images/s as float32 (CPU training),")
        print(f"  {pipe16:.0f} images/s as float16 (mixed-precision GPU training),")
        print(f"  {augmented:.0f} images/s as float32 with --augment (the bundle recipe;")
        print("  the ratio column uses the slower of the two float32 rates)\n")
        pipe = min(pipe, augmented)
        rows, results = [], {}
        for name in args.models:
            kind, kwargs = MODELS[name]
            r = model_rate(kind, kwargs, args.batch, args.steps)
            results[name] = r
            ips = args.batch / r["s_per_step"]
            rows.append([
                name, f"{r['params'] / 1e6:.2f} M", f"{1 / r['s_per_step']:.3f}", f"{ips:.1f}",
                f"{r['s_per_step']:.2f}", f"{pipe / ips:.0f}x", hours(10_000 * r["s_per_step"]),
                int(3600 / r["s_per_step"]),
            ])  # fmt: skip
        headers = ["model", "params", "steps/s", "images/s", "s/step", "pipeline ratio",
                   "10k steps", "steps in 1 h"]  # fmt: skip
        print(table(headers, rows))
        fastest = min(results, key=lambda n: results[n]["s_per_step"])
        import numpy as np

        from training.data import make_dataset

        rows_ = np.arange(len(cache))
        ds = make_dataset(cache, rows_, rows_ % 2, args.batch, shuffle=True, repeat=True)
        kind, kwargs = MODELS[fastest]
        both = model_rate(kind, kwargs, args.batch, max(4, args.steps), pipeline=ds)
        slow = both["fed_s_per_step"] / both["s_per_step"] - 1
        print(
            f"\n{fastest}, end to end (alternating blocks of 2 steps): fed by the pipeline"
            f" {both['fed_s_per_step']:.2f} s/step, in-memory batch {both['s_per_step']:.2f}"
            f" s/step ({slow:+.0%})"
        )


if __name__ == "__main__":
    main()
