"""`mriqa-train`: synthetic data, training, reports, export, and the two documented recipes
(`bundle` for the node's bundled model on a CPU, `reproduce` for the paper's four
configurations on a GPU host)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import click

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

BUNDLED = Path(__file__).resolve().parents[1] / "mriqa_node" / "models" / "bundled"
PAPER_CONFIGS = [(m, t) for m in ("convnet", "resnet10") for t in ("binary", "3class")]


def _levels(value: str) -> tuple[str, ...]:
    from training.realmotion.corrupt import LEVELS

    levels = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = sorted(set(levels) - set(LEVELS))
    if unknown or not levels:
        raise click.BadParameter(f"unknown level(s) {unknown}; known: {', '.join(LEVELS)}")
    return levels


def _ints(value: str) -> tuple[int, ...]:
    return tuple(int(v) for v in value.split(","))


def _names(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


@click.group()
@click.option("-v", "--verbose", is_flag=True)
def main(verbose: bool) -> None:
    """Training package of mriqa-node: reproduce the paper, retrain on site data, export."""
    logging.basicConfig(level="DEBUG" if verbose else "INFO",
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")  # fmt: skip


@main.command()
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--subjects", default=69, show_default=True)
@click.option("--slices", nargs=2, type=int, default=None, metavar="MIN MAX",
              help="Slices per subject (default: SynthConfig's).")  # fmt: skip
@click.option("--size", default=512, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--workers", default=0, show_default=True, help="0: one per CPU")
@click.option("--motion-fraction", type=click.FloatRange(0, 1), default=None,
              help="Share of series with motion (default: SynthConfig's).")  # fmt: skip
@click.option(
    "--randomise",
    default=1.0,
    show_default=True,
    help="Domain randomisation strength: 0 the reference T2 look, 1 fully random.",
)
@click.option("--montage", type=click.Path(path_type=Path), default=None,
              help="Also save a PNG montage of examples per class.")  # fmt: skip
@click.option("--quiet", is_flag=True, help="No progress bar.")
def synth(out: Path, subjects: int, slices: tuple[int, int] | None, size: int, seed: int,
          workers: int, motion_fraction: float | None, randomise: float, montage: Path | None,
          quiet: bool) -> None:  # fmt: skip
    """Generate the synthetic MR motion data set (DICOM + manifest.csv + summary.json)."""
    from training.synth import SynthConfig, generate

    given = {"slices_per_subject": tuple(slices) if slices else None,
             "motion_fraction": motion_fraction}  # fmt: skip
    config = SynthConfig(subjects=subjects, size=size, seed=seed, workers=workers,
                         randomise=randomise,
                         **{k: v for k, v in given.items() if v is not None})  # fmt: skip
    manifest = generate(config, out, progress=not quiet)
    summary = json.loads((manifest.parent / "summary.json").read_text())
    click.echo(
        f"manifest: {manifest} ({summary['slices']} slices of {summary['subjects']} subjects in"
        f" {summary['seconds']:.0f} s; truth classes 0/1/2 {summary['class_counts']['truth']},"
        f" kappa(rater1, rater2) {summary['kappa_rater1_rater2']:.2f})"
    )
    if montage:
        from training.synth.montage import montage as draw_montage

        click.echo(f"montage: {draw_montage(manifest, montage)}")


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--copies", default=6, show_default=True, help="Output series per clean series.")
@click.option("--max-slices", default=32, show_default=True, help="Per clean series.")
@click.option("--nuisance", default=1.0, show_default=True, help="Nuisance strength, 0..1.")
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--reslice/--no-reslice", default=True, show_default=True,
    help="Also corrupt the other two planes of 3-D volumes (near-isotropic voxels).",
)  # fmt: skip
@click.option(
    "--paired/--unpaired", default=False, show_default=True,
    help="Copies 2k and 2k+1 share one nuisance draw (the look) at different motion levels.",
)  # fmt: skip
@click.option(
    "--levels",
    help="Motion levels cycled over the copies, comma-separated, of clean, mild, moderate and"
    " heavy [default: clean,heavy,mild,clean,moderate,heavy].",
)  # fmt: skip
def corrupt(inputs: tuple[Path, ...], out: Path, copies: int, max_slices: int, nuisance: float,
            seed: int, reslice: bool, paired: bool, levels: str) -> None:  # fmt: skip
    """Motion-corrupted copies (DICOM + manifest.csv) of the clean series under INPUTS
    (DICOM folders or NIfTI files: real anatomy, a site's own clean series)."""
    from training.realmotion import CorruptConfig, write_corrupted

    config = CorruptConfig(copies=copies, max_slices=max_slices, nuisance=nuisance, seed=seed,
                           reslice=reslice, paired=paired,
                           **({"levels": _levels(levels)} if levels else {}))  # fmt: skip
    click.echo(f"manifest: {write_corrupted(inputs, out, config)}")


@main.command()
@click.argument("artifact", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("data", nargs=-1, required=True,
                type=click.Path(exists=True, file_okay=False, path_type=Path))  # fmt: skip
@click.option("--source", "sources", multiple=True,
              help="Only this subject (patient id); repeat for several. Default: all.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="The per-source figures as JSON.")
def evaluate(artifact: Path, data: tuple[Path, ...], sources: tuple[str, ...],
             as_json: bool) -> None:  # fmt: skip
    """An exported model on corrupted real series (DATA: folders `corrupt` wrote), per source:
    slice AUCs, clean series alerted, non-diagnostic series caught, ECE. Name subjects the
    model never saw (--source) for a figure that means something."""
    from training.realeval import evaluate_artifact, table

    per_source = evaluate_artifact(artifact, data, sources)
    if not per_source:
        raise click.ClickException("no corrupted slices of those sources in DATA")
    click.echo(json.dumps(per_source, indent=2) if as_json else "\n".join(table(per_source)))


@main.command()
@click.argument("artifact", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--seeds", default=20, show_default=True, help="Phantom subjects per level.")
@click.option("--first-seed", default=1000, show_default=True, help="The demo's own: 1000.")
@click.option("--slices", default=12, show_default=True)
@click.option("--motions", default="0,0.2,0.8,1.0", show_default=True,
              help="Motion levels, 0 (still) .. 1 (deep free breathing).")  # fmt: skip
def phantoms(artifact: Path, seeds: int, first_seed: int, slices: int, motions: str) -> None:
    """An exported model on the demo scanner's phantoms: series verdicts per motion level
    (what `mriqa demo` will show with this model)."""
    from training.phantomeval import phantom_verdicts

    levels = [float(m) for m in motions.split(",")]
    counts = phantom_verdicts(artifact, range(first_seed, first_seed + seeds), levels, slices)
    labels = sorted({label for c in counts.values() for label in c})
    click.echo(f"{'motion':>6}  " + "  ".join(f"{label:>15}" for label in labels))
    for m, c in counts.items():
        click.echo(f"{m:>6.1f}  " + "  ".join(f"{c[label]:>15}" for label in labels))


@main.command()
@click.argument("manifests", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))  # fmt: skip
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
def mix(manifests: tuple[Path, ...], out: Path) -> None:
    """One training manifest from several (real anatomy and phantoms, a site's own); prints
    the share of each. Patient ids must not collide across them."""
    click.echo(f"manifest: {_mix(list(manifests), out)}")


def _mix(manifests: list[Path], out: Path) -> Path:
    from training.manifest import read_manifest, write_manifest

    records, owner = [], {}
    for m in manifests:
        part = read_manifest(m)
        for r in part:
            if owner.setdefault(r.patient_id, m) != m:
                raise click.ClickException(f"patient {r.patient_id!r} is in {owner[r.patient_id]}"
                                           f" and {m}")  # fmt: skip
        records += part
        click.echo(f"{m}: {len(part)} slices")
    return write_manifest(records, out)


# The real sources of ../shared/data (patient ids written by `corrupt`), for the bundle recipe's
# held-out splits and the leave-one-source-out table.
REAL_SOURCES = {
    "siemens-prismafit-brain": ("SIEMENS_crlab",),
    "uih-brain": ("uih_umr770*",),
    "philips-mprage-brain": ("Philips_d2n*",),
    "siemens-xa30-brain": ("Siemens_Healthineers*",),
    "ge-heart": ("GE_MEDICAL_SYSTEMS_SCD*",),
    "nifti-brain": ("unknown_unknown_brain*",),
    "nifti-cspine": ("unknown_unknown_cspine*",),
}
BUNDLE_VERSION = "2.5.0"  # of the artifact `bundle` makes; bump it with the recipe
BUNDLE_VAL = ("GE_MEDICAL_SYSTEMS_SCD0000101", "Siemens_Healthineers*", "SYN000[1-3]")
BUNDLE_SOFT_LABELS = 0.1  # the bundle recipe trains on soft labels of this width
BUNDLE_SEEDS = 2  # ... in this many runs, merged into one model
BUNDLE_TEST = ("Philips_d2n*", "SIEMENS_021234567", "unknown_unknown_cspine*", "SYN000[4-8]")


@main.command()
@click.option("--manifest", type=click.Path(exists=True, path_type=Path), required=True)
@click.option(
    "--corruption",
    type=click.Path(exists=True, path_type=Path),
    multiple=True,
    required=True,
    help="corruption.csv of `mriqa-train corrupt` (repeatable).",
)
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--steps", default=600, show_default=True)
@click.option("--batch", default=24, show_default=True)
@click.option("--widths", default="16,32,64,128", show_default=True)
@click.option("--downsample", default=2, show_default=True)
@click.option("--source", "only", multiple=True, help="Only these sources (default: all).")
@click.option("--task", type=click.Choice(["binary", "3class"]), default="binary",
              show_default=True, help="3class: the score is still P(non-diagnostic).")  # fmt: skip
@click.option("--eval-data", type=click.Path(exists=True, file_okay=False, path_type=Path),
              multiple=True, help="Also score each fold's held-out subjects in these"
              " `corrupt` folders (another seed, paired looks); finished folds are not"
              " retrained.")  # fmt: skip
@click.option("--soft-labels", type=float, default=None,
              help="As `bundle --soft-labels` (default: 0.1 as the bundle recipe for binary;"
              " 0, the class, for 3class).")  # fmt: skip
@click.option("--seeds", type=click.IntRange(1), default=BUNDLE_SEEDS, show_default=True,
              help="Runs per fold, merged into one model as `bundle` merges them.")  # fmt: skip
def loso(manifest: Path, corruption: tuple[Path, ...], out: Path, steps: int, batch: int,
         widths: str, downsample: int, only: tuple[str, ...], task: str,
         eval_data: tuple[Path, ...], soft_labels: float | None, seeds: int) -> None:  # fmt: skip
    """Leave-one-source-out table of the bundle recipe (reduced size and steps on a CPU)."""
    from training.loso import run_loso

    if soft_labels is None:
        soft_labels = BUNDLE_SOFT_LABELS if task == "binary" else 0.0
    base = _train_config(manifest=manifest, out_dir=out, model="convnet", task=task,
                         label="truth", steps=steps, batch=batch, widths=_ints(widths),
                         downsample=downsample, head="gap", augment=True, eval_every=steps,
                         checkpoint_every=steps, bn_recalibration=8,
                         soft_labels=soft_labels)  # fmt: skip
    sources = {k: v for k, v in REAL_SOURCES.items() if not only or k in only}
    summary = run_loso(base, corruption, sources, BUNDLE_VAL, out, eval_data=eval_data,
                       seeds=seeds)  # fmt: skip
    click.echo(f"loso: {out / 'loso.md'} ({len(summary['per_source'])} sources)")


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
@click.option("--downsample", default=1, show_default=True, help="ConvNet: pool the input first")
@click.option(
    "--head",
    type=click.Choice(["flatten", "gap"]),
    default="flatten",
    show_default=True,
    help="ConvNet: the paper's flatten or global average pooling",
)
@click.option(
    "--val-patients",
    default="",
    help="Patients (patterns, comma-separated) held out as the validation split.",
)
@click.option("--test-patients", default="", help="... as the test split.")
@click.option("--augment", is_flag=True, help="Flips, gamma, gain on the fly.")
@click.option(
    "--fractions",
    default="0.7,0.1,0.2",
    show_default=True,
    help="Train/val/test shares of the other patients.",
)
@click.option("--class-weights", is_flag=True, help="Inverse-frequency class weights.")
@click.option(
    "--soft-labels", type=float, default=0.0, show_default=True,
    help="Binary: train on P(non-diagnostic) from the measured severity, a sigmoid of this"
    " width around the boundary (0: hard labels).",
)  # fmt: skip
@click.option("--seed", default=0, show_default=True)
@click.option("--eval-every", default=200, show_default=True)
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None)
@click.option(
    "--init-from", type=click.Path(exists=True, path_type=Path), default=None,
    help="Fine-tune: start from this artifact's (or run's) weights, e.g. the node's model.",
)  # fmt: skip
def train(manifest: Path, out: Path, model: str, task: str, label: str, steps: int, batch: int,
          lr: float, widths: str, width: int, downsample: int, head: str, val_patients: str,
          test_patients: str, augment: bool, fractions: str, class_weights: bool,
          soft_labels: float, seed: int, eval_every: int, cache_dir: Path | None,
          init_from: Path | None) -> None:  # fmt: skip
    """Train one model (the paper's recipe by default); resumable."""
    from training.train import train as run_training

    config = _train_config(
        manifest=manifest, out_dir=out, model=model, task=task, label=label, steps=steps,
        batch=batch, lr=lr, widths=_ints(widths), width=width, downsample=downsample, head=head,
        val_patients=_names(val_patients), test_patients=_names(test_patients),
        fractions=tuple(float(f) for f in fractions.split(",")), augment=augment,
        class_weights=class_weights, soft_labels=soft_labels, seed=seed, eval_every=eval_every,
        cache_dir=cache_dir, init_from=init_from,
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
@click.option(
    "--max-false-alerts",
    type=click.FloatRange(0, 1),
    default=0.05,
    show_default=True,
    help="Most diagnostic series that may be flagged (fraction); wins over --sensitivity.",
)
def export(run: Path, out: Path, name: str | None, version: str, sensitivity: float,
           max_false_alerts: float) -> None:  # fmt: skip
    """Export a run as the node's model artifact (then: mriqa model install OUT)."""
    meta = _export(run, out, name, version, sensitivity, max_false_alerts)
    click.echo(f"artifact: {out} ({meta.name} {meta.version}, sha256 {meta.sha256[:12]})")
    op = meta.extra["operating_point"]
    click.echo(f"temperature {meta.temperature:.3g}; series policy {json.dumps(meta.policy)}")
    for warning in op["warnings"]:
        click.echo(f"WARNING: {warning}", err=True)


def _export(run: Path, out: Path, name: str | None, version: str, sensitivity: float,
            max_false_alerts: float = 0.05):  # fmt: skip
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
                           sensitivity, test_metrics=against,
                           max_false_alerts=max_false_alerts)  # fmt: skip


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
# The clean real series of ../shared/data the bundled model was trained on: the anatomy set,
# the structural magnitude series of the intake set, and the two real MR images that the
# pydicom-data package ships (its Siemens abdominal slice and Philips shoulder).
BUNDLE_REAL = (
    "anatomy", "intake/philips_elition_classic_mprage", "intake/siemens_xa30_enh_t1",
    "intake/pydicom_siemens_overlay", "intake/pydicom_mr2_philips_shoulder",
)  # fmt: skip


def _default_real() -> list[Path]:
    found = [SHARED / p for p in BUNDLE_REAL if (SHARED / p).exists()]
    if found:
        return found
    from pydicom.data import get_testdata_file  # without shared/: the images packages ship

    return [Path(get_testdata_file(n)) for n in ("MR-SIEMENS-DICOM-WithOverlays.dcm",
                                                  "MR2_UNCR.dcm")]  # fmt: skip


@main.command()
@click.argument("runs", nargs=-1, required=True,
                type=click.Path(exists=True, file_okay=False, path_type=Path))  # fmt: skip
@click.option("--out", type=click.Path(path_type=Path), required=True)
def ensemble(runs: tuple[Path, ...], out: Path) -> None:
    """Merge finished runs of one recipe and split (other seeds) into one run whose model scores
    the mean of their logits; `export` it as any run. GAP-head ConvNets only."""
    from training.ensemble import merge_runs

    click.echo(f"ensemble: {merge_runs(runs, out)} ({len(runs)} members)")


@main.command()
@click.option(
    "--real",
    type=click.Path(exists=True, path_type=Path),
    multiple=True,
    help="Clean real series (default: ../shared/data, see docs/training.md).",
)
@click.option(
    "--out", type=click.Path(path_type=Path), default=Path("var/bundle"), show_default=True
)
@click.option("--subjects", default=24, show_default=True, help="Synthetic phantoms.")
@click.option("--steps", default=4800, show_default=True)
@click.option("--widths", default="16,32,64,128", show_default=True)
@click.option(
    "--install/--no-install",
    default=True,
    show_default=True,
    help="Write the artifact to mriqa_node/models/bundled.",
)
@click.option(
    "--soft-labels", type=float, default=BUNDLE_SOFT_LABELS, show_default=True,
    help="Train on the measured severity (see `train --soft-labels`); 0: on the class.",
)  # fmt: skip
@click.option(
    "--seeds", type=click.IntRange(1), default=BUNDLE_SEEDS, show_default=True,
    help="Runs of the recipe, seeds 0 to N-1; several are merged into one model that scores"
    " the mean of their logits (see `ensemble`).",
)  # fmt: skip
def bundle(real: tuple[Path, ...], out: Path, subjects: int, steps: int, widths: str,
           install: bool, soft_labels: float, seeds: int) -> None:  # fmt: skip
    """Train the node's bundled model on real anatomy with k-space motion plus phantoms
    (about half an hour per seed on 2 CPU cores); resumable."""
    from training.ensemble import train_seeds
    from training.report import write_run_report

    real_manifest = _ensure_real(out / "real", real)
    mixed = _mix([real_manifest, _ensure_synth(out / "synth", subjects)], out / "mixed.csv")
    runs, run = train_seeds(_train_config(
        manifest=mixed, out_dir=out / "convnet-binary", model="convnet", task="binary",
        label="truth", steps=steps, batch=24, widths=_ints(widths), downsample=2, head="gap",
        augment=True, val_patients=BUNDLE_VAL, test_patients=BUNDLE_TEST,
        fractions=(1.0, 0.0, 0.0), soft_labels=soft_labels,
    ), seeds)  # fmt: skip
    for member in runs:
        write_run_report(member, mixed)
    target = BUNDLED if install else out / "artifact"
    meta = _export(run, target, "convnet-binary-realmotion", BUNDLE_VERSION, 0.90)
    _model_card(target, meta, run, [out / "real" / "corruption.csv"])
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
@click.option(
    "--real", type=click.Path(exists=True, path_type=Path), multiple=True,
    help="Clean real series to corrupt for the real-anatomy evaluation (default: as bundle).",
)  # fmt: skip
@click.option(
    "--real-eval/--no-real-eval", default=True, show_default=True,
    help="Score every run on corrupted real anatomy (none of it in the runs' data).",
)  # fmt: skip
def reproduce(data: Path, out: Path, steps: int, subjects: int, real: tuple[Path, ...],
              real_eval: bool) -> None:  # fmt: skip
    """The paper's four configurations at full size (ConvNet, ResNet-10 x binary, 3-class),
    each scored on real anatomy it never saw, and the summary report. Meant for a GPU host;
    resumable."""
    from training.realeval import REAL_PREDICTIONS_FILE, predict_real
    from training.report import write_summary
    from training.train import train as run_training

    manifest = _ensure_synth(data, subjects)
    real_manifest = _ensure_real(out / "real", real) if real_eval else None
    runs = []
    for model, task in PAPER_CONFIGS:
        run = out / f"{model}-{task}"
        run_training(_train_config(manifest=manifest, out_dir=run, model=model, task=task,
                                   steps=steps))  # fmt: skip
        if real_manifest is not None and not (run / REAL_PREDICTIONS_FILE).is_file():
            predict_real(run, real_manifest)
        runs.append(run)
    click.echo(f"summary: {write_summary(runs, out / 'summary', manifest)}")


def _ensure_real(out: Path, real: Sequence[Path] = ()) -> Path:
    """The corrupted copies of the clean real series (``corrupt``), made once."""
    manifest = out / "manifest.csv"
    if not manifest.is_file():
        from training.realmotion import write_corrupted

        write_corrupted(list(real) or _default_real(), out)
    return manifest


def _ensure_synth(data: Path, subjects: int = 69) -> Path:
    manifest = data / "manifest.csv"
    if not manifest.is_file():
        from training.synth import SynthConfig, generate

        generate(SynthConfig(subjects=subjects), data)
    return manifest


def _model_card(target: Path, meta, run: Path, corruption: list[Path]) -> None:
    """A short, honest card next to the artifact: what it was trained on, and how it does on
    real anatomy it never saw, per source."""
    from training.realeval import real_eval_of_run, table

    splits = json.loads((run / "splits.json").read_text())
    held_out = real_eval_of_run(run, corruption, meta.policy, meta.temperature)
    op = meta.extra.get("operating_point", {})
    lines = [
        f"# {meta.name} {meta.version}",
        "",
        "Scores slices of structural magnitude MR for motion artefacts. Trained on real clean",
        "series of several vendors and body regions (head, heart, neck, shoulder, one abdominal",
        "slice) with motion simulated in k-space in each acquisition's line order, plus",
        "domain-randomised synthetic phantoms (training.synth). Labels are classes of the",
        "image error measured against the motion-free slice (or the simulated raters reading",
        "it), not a radiologist's: validate on your site's rated series (`mriqa ratings",
        "export`, `mriqa-train`) before relying on it.",
        "",
        f"- task: {meta.task}, classes: {', '.join(meta.class_names)}",
        f"- input: {meta.input_size} px square, preprocessing v{meta.preprocessing_version}",
        f"- calibrated: temperature {meta.temperature:.4g} (fitted on the validation subjects)",
        f"- series policy: {json.dumps(meta.policy)}",
        *(f"- WARNING: {w}" for w in op.get("warnings", [])),
        f"- sha256 of model.keras: {meta.sha256}",
        *_members_lines(run),
        "",
        "## Scope (the node leaves everything else not assessed)",
        "",
        f"- {json.dumps(meta.scope)}",
        *_ood_lines(meta.ood),
        "",
        "## Data (split by subject, never by slice)",
        "",
        *[f"- {name}: {', '.join(splits['patients'][name])}" for name in ("train", "val", "test")],
        "",
        "## Real anatomy never seen in training (test subjects)",
        "",
        *table(held_out),
        "",
        "The leave-one-source-out table of this recipe (the generalisation figure) is in",
        "docs/bundled-model/loso.md.",
        "",
        f"Training run config: `{json.dumps(json.loads((run / 'config.json').read_text()))}`",
    ]
    (target / "MODEL_CARD.md").write_text("\n".join(lines) + "\n")


def _members_lines(run: Path) -> list[str]:
    from training.ensemble import ENSEMBLE_FILE

    if not (run / ENSEMBLE_FILE).is_file():
        return []
    seeds = ", ".join(map(str, json.loads((run / ENSEMBLE_FILE).read_text())["seeds"]))
    return [f"- an ensemble: the mean of the logits of the recipe's runs with seeds {seeds};"
            " the config below is the first one's"]  # fmt: skip


def _ood_lines(ood: dict) -> list[str]:
    if not ood:
        return ["- no OOD guard"]
    stopped = ", ".join(f"{k} {'stopped' if v else 'PASSES'}" for k, v in
                        ood.get("probes_stopped", {}).items())  # fmt: skip
    test = "n/a" if ood.get("test_pass") is None else f"{ood['test_pass']:.1%}"
    return [
        f"- OOD guard: distance threshold {ood['threshold']:.3g} (the {ood['quantile']:.0%}"
        f" quantile of {ood['val_slices']} validation slices); held-out test slices passing:"
        f" {test} of {ood['test_slices']}; probes: {stopped} (a blank image is stopped before,"
        " by the node's no-anatomy check)",
    ]


if __name__ == "__main__":
    main()
