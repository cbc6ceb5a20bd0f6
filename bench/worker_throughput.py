"""Worker throughput: slices/s of `Worker.drain()` against the bare compiled model, same run.

For each max_batch: a fresh SQLite database + spool is filled with N phantom slices (512x512)
through the Intake service (no worker running), then `Worker.drain()` (built as
Node._make_worker builds it, on one shared Scorer) is timed until the queue is empty. The bare
rate is `Scorer.predict` on preallocated random batches of the same sizes, for the same number
of slices. The ratio worker/bare says how much the queue, the decoding and preprocessing and
the recording cost on top of the model (target >= 90 %).
Run: .venv/bin/python bench/worker_throughput.py [--help]
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_line, median, table

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def phantom_datasets(n: int, slices_per_series: int = 30):
    from mriqa_node.phantom import synth_series

    out = []
    k = 0
    while len(out) < n:
        out += synth_series(slices_per_series, motion=0.3 * (k % 3), seed=500 + k, series_number=k)
        k += 1
    return out[:n]


def encode(ds) -> bytes:
    """The bytes the receiver keeps: preamble, file meta and data set (as pynetdicom hands them)."""
    import pydicom

    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def fill(root: Path, model: Path, max_batch: int, encoded: list[tuple[object, bytes]]):
    """A fresh node database + spool holding every instance as pending work; returns the Node."""
    from mriqa_node.config import load_config
    from mriqa_node.node import Node

    settings = load_config(
        None,
        storage={"spool_dir": root / "spool", "database_url": f"sqlite:///{root / 'mriqa.db'}"},
        model={"path": str(model)},
        worker={"max_batch": max_batch},
    )
    node = Node(settings)
    node.upgrade_db()
    for header, data in encoded:
        node.intake.store(header, data, "BENCH")
    return node


class Timers:
    """Wall time spent inside selected methods of one object, per method (thread-safe)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.lock = threading.Lock()

    def wrap(self, obj: object, name: str, label: str | None = None) -> None:
        inner = getattr(obj, name)
        key = label or name

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                with self.lock:
                    self.seconds[key] += time.perf_counter() - t0

        setattr(obj, name, timed)


def bare_rate(scorer, n: int, batch: int) -> tuple[float, float]:
    """(slices/s, process CPU ms per slice) of the compiled model alone."""
    import numpy as np

    size = scorer.meta.input_size
    rng = np.random.default_rng(0)
    sizes = [batch] * (n // batch) + ([n % batch] if n % batch else [])
    batches = {b: rng.random((b, size, size, 1), dtype=np.float32) for b in set(sizes)}
    for b in batches.values():  # first call at a new batch size sets up kernels: not timed
        scorer.predict(b)
    t0, c0 = time.perf_counter(), time.process_time()
    for b in sizes:
        scorer.predict(batches[b])
    return n / (time.perf_counter() - t0), 1000 * (time.process_time() - c0) / n


def worker_rate(node, scorer, n: int, shadow=None) -> tuple[float, dict[str, float], float, float]:
    """(slices/s, seconds inside wrapped methods, drain seconds, process CPU ms per slice);
    with ``shadow``, a candidate scores the same slices beside it (its model time is
    ``shadow_predict`` in the seconds)."""
    import numpy as np

    from mriqa_node import worker as worker_mod
    from mriqa_node.worker import Worker

    w = node.settings.worker
    worker = Worker(
        node.queue,
        node.series,
        node.spool,
        scorer,
        w.max_batch,
        w.max_wait_ms,
        w.poll_seconds,
        wake=node.work_available,
    )
    if shadow is not None:
        worker.set_shadow(shadow)
    size = scorer.meta.input_size
    sizes = {w.max_batch, n % w.max_batch or w.max_batch}
    for b in sizes:  # same untimed kernel set-up as the bare run gets
        scorer.predict(np.zeros((b, size, size, 1), np.float32))

    timers = Timers()
    timers.wrap(worker.queue, "claim")
    timers.wrap(worker.queue, "record")
    timers.wrap(worker.series, "try_decide")
    timers.wrap(worker, "_score_and_record")
    real_predict = scorer.predict
    timers.wrap(scorer, "predict")
    real_prepare = worker_mod.prepare
    timers.wrap(worker_mod, "prepare")
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        handled = worker.drain()
        elapsed = time.perf_counter() - t0
        cpu_ms = 1000 * (time.process_time() - c0) / n
    finally:
        worker_mod.prepare = real_prepare
        scorer.predict = real_predict
        worker._pool.shutdown(wait=True)
    timers.seconds["shadow_predict"] = worker.shadow_seconds
    depth = node.queue.depth()
    if handled != n or worker.scored_slices != n or depth:
        raise RuntimeError(
            f"drain handled {handled}, scored {worker.scored_slices} of {n}; {depth} left"
        )
    return worker.scored_slices / elapsed, dict(timers.seconds), elapsed, cpu_ms


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--slices", type=int, default=200, help="instances to score (default 200)")
    ap.add_argument("--batches", default="8,16,32", help="max_batch values (default 8,16,32)")
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="worker runs per max_batch, each between two bare runs (default 1)",
    )
    ap.add_argument("--widths", default="32,64,128,256", help="ConvNet widths (default full)")
    ap.add_argument("--model", type=Path, help="use this model artifact instead of building one")
    ap.add_argument(
        "--shadow",
        action="store_true",
        help="also: the worker with a shadow candidate (another model of the same size) at the"
        " first max_batch, against the worker alone",
    )
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    widths = tuple(int(w) for w in args.widths.split(","))
    # Rescan alerts (the untrained model flags phantom series) are not what is measured here.
    logging.getLogger("mriqa_node").setLevel(logging.ERROR)

    from mriqa_node.dicom.headers import parse_header
    from mriqa_node.ml.scorer import Scorer

    with tempfile.TemporaryDirectory(prefix="mriqa-bench-worker-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        datasets = phantom_datasets(args.slices)
        encoded = [
            (parse_header(ds, ds.file_meta.TransferSyntaxUID), encode(ds)) for ds in datasets
        ]
        del datasets
        model = args.model
        if model is None:
            from mriqa_node.ml.artifact import untrained_convnet_artifact

            model = root / "model"
            untrained_convnet_artifact(model, widths=widths)
        scorer = Scorer(model)
        scorer.warm_up()
        print(
            f"# worker throughput: {args.slices} slices 512x512 (single-frame MR), model"
            f" {scorer.meta.name} widths {args.widths if args.model is None else '(given)'}"
            f" on {scorer.device.description}; set-up {time.perf_counter() - t0:.1f} s"
        )
        print(f"# machine: {machine_line()}")

        rows = []
        for batch in batches:
            bares = [bare_rate(scorer, args.slices, batch)]
            runs = []
            for rep in range(args.repeat):
                node = fill(root / f"b{batch}-{rep}", model, batch, encoded)
                try:
                    rate, spent, elapsed, cpu_ms = worker_rate(node, scorer, args.slices)
                finally:
                    node.engine.dispose()
                bares.append(bare_rate(scorer, args.slices, batch))
                # The bare reference of this worker run: the bare runs just before and after.
                ref = (bares[-2][0] + bares[-1][0]) / 2
                ref_cpu = (bares[-2][1] + bares[-1][1]) / 2
                runs.append((rate, rate / ref, spent, elapsed, cpu_ms, ref_cpu / cpu_ms))
                print(
                    f"  max_batch {batch:>2} run {rep + 1}: bare {bares[-2][0]:5.1f} /"
                    f" {bares[-1][0]:5.1f} slices/s, worker {rate:5.1f} slices/s"
                    f" ({100 * rate / ref:.0f} %); CPU/slice bare {ref_cpu:.0f} ms,"
                    f" worker {cpu_ms:.0f} ms;"
                    f" drain {elapsed:.1f} s of which in the model {spent.get('predict', 0):.1f} s",
                    flush=True,
                )
            elapsed = median([r[3] for r in runs])
            model_s = median([r[2].get("predict", 0.0) for r in runs])
            db_s = median(
                [sum(r[2].get(k, 0.0) for k in ("claim", "record", "try_decide")) for r in runs]
            )
            prep_s = median([r[2].get("prepare", 0.0) for r in runs])
            rows.append(
                [
                    batch,
                    f"{median([b[0] for b in bares]):.1f}",
                    f"{median([r[0] for r in runs]):.1f}",
                    f"{100 * median([r[1] for r in runs]):.0f} %",
                    f"{elapsed:.1f}",
                    f"{100 * model_s / elapsed:.0f} %",
                    f"{db_s:.2f}",
                    f"{prep_s:.1f}",
                    f"{median([b[1] for b in bares]):.0f}",
                    f"{median([r[4] for r in runs]):.0f}",
                    f"{100 * median([r[5] for r in runs]):.0f} %",
                ]
            )
    print()
    print(
        table(
            [
                "max_batch",
                "bare model slices/s",
                "worker slices/s",
                "worker/bare",
                "drain s",
                "drain in model",
                "in DB s",
                "preprocess s (overlapped)",
                "bare CPU ms/slice",
                "worker CPU ms/slice",
                "bare/worker CPU",
            ],
            rows,
        )
    )
    print(
        "# medians over the runs; worker/bare compares each worker run with the bare runs just"
        " before and after it (wall clock: sensitive to other load). bare/worker CPU compares"
        " process CPU time per slice (robust to other load). Target worker/bare >= 90 %."
    )
    if args.shadow:
        shadow_cost(root, model, scorer, batches[0], args, encoded)
    print(f"# load average at the end: {os.getloadavg()[0]:.2f} (other processes share the CPU)")
    return 0


def shadow_cost(root: Path, model: Path, scorer, batch: int, args, encoded) -> None:
    """What a shadow candidate costs: the worker with and without one, alternating."""
    from mriqa_node.ml.artifact import untrained_convnet_artifact
    from mriqa_node.ml.scorer import Scorer

    candidate = root / "shadow"
    widths = tuple(int(w) for w in args.widths.split(","))
    if args.model is None:
        untrained_convnet_artifact(candidate, seed=1, widths=widths)
    else:
        candidate = args.model  # the same artifact as its own candidate: the same cost
    shadow = Scorer(candidate)
    shadow.warm_up()
    rates: dict[str, list[float]] = {"alone": [], "with shadow": []}
    model_s: list[float] = []
    for rep in range(max(args.repeat, 2)):
        for name in rates:
            node = fill(root / f"shadow-{name}-{rep}", model, batch, encoded)
            try:
                rate, spent, _, _ = worker_rate(
                    node, scorer, args.slices, shadow if name == "with shadow" else None
                )
            finally:
                node.engine.dispose()
            rates[name].append(rate)
            if name == "with shadow":
                model_s.append(spent["shadow_predict"])
    alone, shadowed = median(rates["alone"]), median(rates["with shadow"])
    print(f"# shadow candidate, max_batch {batch}: worker alone {alone:.1f} slices/s, with a"
          f" shadow {shadowed:.1f} slices/s ({100 * shadowed / alone:.0f} %); the candidate's"
          f" model time {median(model_s):.1f} s for {args.slices} slices"
          f" (runs: {rates})")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
