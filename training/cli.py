"""`mriqa-train`: synthetic data, training, reports, export, and the two documented recipes
(`bundle` for the node's bundled model on a CPU, `reproduce` for the paper's four
configurations on a GPU host)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import click

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

BUNDLED = Path(__file__).resolve().parents[1] / "mriqa_node" / "models" / "bundled"
PAPER_CONFIGS = [(m, t) for m in ("convnet", "resnet10") for t in ("binary", "3class")]


def _ints(value: str) -> tuple[int, ...]:
    return tuple(int(v) for v in value.split(","))


@click.group()
@click.option("-v", "--verbose", is_flag=True)
def main(verbose: bool) -> None:
    """Training package of mriqa-node: reproduce the paper, retrain on site data, export."""
    logging.basicConfig(level="DEBUG" if verbose else "INFO",
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")  # fmt: skip


@main.command()
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--subjects", default=69, show_default=True)
@click.option("--size", default=512, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--workers", default=0, show_default=True, help="0: one per CPU")
def synth(out: Path, subjects: int, size: int, seed: int, workers: int) -> None:
    """Generate the synthetic MR motion data set (DICOM + manifest.csv + summary.json)."""
    from training.synth import SynthConfig, generate

    config = SynthConfig(subjects=subjects, size=size, seed=seed, workers=workers)
    click.echo(f"manifest: {generate(config, out)}")


def _train_config(**kw):
    from training.train import TrainConfig

    return TrainConfig(**{k: v for k, v in kw.items() if v is not None})


@main.command()
@click.option("--manifest", type=click.Path(exists=True, path_type=Path), required=True)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Run directory; an existing one is resumed.",
)
@click.option("--model", type=click.Choice(["convnet", "resnet10"]), default="convnet")
@click.option("--task", type=click.Choice(["binary", "3class"]), default="binary")
@click.option(
    "--label", default="mean", show_default=True, help="rater1, rater2, ..., mean, worst or truth"
)
@click.option("--steps", default=10_000, show_default=True)
@click.option("--batch", default=32, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--widths", default="32,64,128,256", show_default=True, help="ConvNet widths")
@click.option("--width", default=64, show_default=True, help="ResNet-10 first-stage width")
@click.option("--class-weights", is_flag=True, help="Inverse-frequency class weights.")
@click.option("--seed", default=0, show_default=True)
@click.option("--eval-every", default=200, show_default=True)
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None)
def train(manifest: Path, out: Path, model: str, task: str, label: str, steps: int, batch: int,
          lr: float, widths: str, width: int, class_weights: bool, seed: int, eval_every: int,
          cache_dir: Path | None) -> None:  # fmt: skip
    """Train one model (the paper's recipe by default); resumable."""
    from training.train import train as run_training

    config = _train_config(
        manifest=manifest, out_dir=out, model=model, task=task, label=label, steps=steps,
        batch=batch, lr=lr, widths=_ints(widths), width=width, class_weights=class_weights,
        seed=seed, eval_every=eval_every, cache_dir=cache_dir,
    )  # fmt: skip
    click.echo(f"run: {run_training(config)}")


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Summary directory (several runs); default: the run itself.",
)
@click.option("--manifest", type=click.Path(exists=True, path_type=Path), default=None)
def report(runs: tuple[Path, ...], out: Path | None, manifest: Path | None) -> None:
    """Write the evaluation report of one run, or the summary across several runs."""
    from training.report import write_run_report, write_summary

    if len(runs) == 1 and out is None:
        click.echo(f"report: {write_run_report(runs[0], manifest)}")
    else:
        click.echo(f"summary: {write_summary(list(runs), out or Path('report'), manifest)}")


@main.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--name", default=None, help="Default: <model>-<task>.")
@click.option("--version", default="1.0.0", show_default=True)
@click.option(
    "--sensitivity",
    default=0.90,
    show_default=True,
    help="Sensitivity to non-diagnostic series the thresholds are chosen for.",
)
def export(run: Path, out: Path, name: str | None, version: str, sensitivity: float) -> None:
    """Export a run as the node's model artifact (then: mriqa model install OUT)."""
    meta = _export(run, out, name, version, sensitivity)
    click.echo(f"artifact: {out} ({meta.name} {meta.version}, sha256 {meta.sha256[:12]})")


def _export(run: Path, out: Path, name: str | None, version: str, sensitivity: float):
    from training.evaluate import evaluate_run
    from training.export import export_artifact

    cfg = json.loads((run / "config.json").read_text())
    test = evaluate_run(run)["splits"].get("test", {})
    headline = ("accuracy", "balanced_accuracy", "auc", "kappa", "n")
    against = {  # the report's view: against the training labels and, when known, the truth
        f"vs_{ref}": {k: test[f"vs_{ref}"].get(k) for k in headline}
        for ref in ("labels", "truth")
        if test.get(f"vs_{ref}")
    }
    return export_artifact(run, out, name or f"{cfg['model']}-{cfg['task']}", version,
                           sensitivity, test_metrics=against)  # fmt: skip


@main.command()
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    default=Path("var/synth"),
    show_default=True,
    help="Synthetic data set (generated when missing).",
)
@click.option(
    "--out", type=click.Path(path_type=Path), default=Path("var/bundle"), show_default=True
)
@click.option("--steps", default=500, show_default=True)
@click.option("--widths", default="16,32,64,128", show_default=True)
@click.option(
    "--install/--no-install",
    default=True,
    show_default=True,
    help="Write the artifact to mriqa_node/models/bundled.",
)
def bundle(data: Path, out: Path, steps: int, widths: str, install: bool) -> None:
    """Train the node's bundled model on the synthetic set (about 30 min on 2 CPU cores)."""
    manifest = _ensure_synth(data)
    run = out / "convnet-binary"
    from training.report import write_run_report
    from training.train import train as run_training

    run_training(_train_config(manifest=manifest, out_dir=run, model="convnet", task="binary",
                               label="mean", steps=steps, widths=_ints(widths)))  # fmt: skip
    write_run_report(run, manifest)
    target = BUNDLED if install else out / "artifact"
    meta = _export(run, target, "convnet-binary-synthetic", "1.0.0", 0.90)
    _model_card(target, meta, run)
    click.echo(f"bundled model: {target} (sha256 {meta.sha256[:12]}); report: {run}/report.md")


@main.command()
@click.option(
    "--data", type=click.Path(path_type=Path), default=Path("var/synth"), show_default=True
)
@click.option(
    "--out", type=click.Path(path_type=Path), default=Path("var/reproduce"), show_default=True
)
@click.option("--steps", default=10_000, show_default=True)
@click.option("--subjects", default=69, show_default=True)
def reproduce(data: Path, out: Path, steps: int, subjects: int) -> None:
    """The paper's four configurations at full size (ConvNet, ResNet-10 x binary, 3-class)
    and the summary report. Meant for a GPU host; resumable."""
    from training.report import write_summary
    from training.train import train as run_training

    manifest = _ensure_synth(data, subjects)
    runs = []
    for model, task in PAPER_CONFIGS:
        run = out / f"{model}-{task}"
        run_training(_train_config(manifest=manifest, out_dir=run, model=model, task=task,
                                   steps=steps))  # fmt: skip
        runs.append(run)
    click.echo(f"summary: {write_summary(runs, out / 'summary', manifest)}")


def _ensure_synth(data: Path, subjects: int = 69) -> Path:
    manifest = data / "manifest.csv"
    if not manifest.is_file():
        from training.synth import SynthConfig, generate

        generate(SynthConfig(subjects=subjects), data)
    return manifest


def _model_card(target: Path, meta, run: Path) -> None:
    """A short, honest card next to the artifact."""
    test = meta.test_metrics or {}
    lines = [
        f"# {meta.name} {meta.version}",
        "",
        "Trained on SYNTHETIC data only (training.synth: simulated T2 FSE abdomen with k-space",
        "motion, two simulated raters). It demonstrates the pipeline; validate and retrain on",
        "your site's labelled data before clinical use.",
        "",
        f"- task: {meta.task}, classes: {', '.join(meta.class_names)}",
        f"- input: {meta.input_size} px square, preprocessing v{meta.preprocessing_version}",
        f"- series policy: {json.dumps(meta.policy)}",
        f"- sha256 of model.keras: {meta.sha256}",
        f"- training run: config {json.dumps(json.loads((run / 'config.json').read_text()))}",
        "",
        "## Test metrics",
        "",
        "```json",
        json.dumps(test, indent=2, default=str)[:6000],
        "```",
    ]
    (target / "MODEL_CARD.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
