"""Markdown reports: one per training run, and the cross-run summary beside the paper's numbers.

``write_run_report(run_dir)`` writes ``run_dir/report.md`` with ``run_dir/figures/*.png``;
``write_summary(run_dirs, out_dir)`` writes ``out_dir/report.md``, ``out_dir/figures/*.png`` and
``out_dir/metrics.json`` (every run's metrics, the table, the rater agreement and the label-noise
numbers). Figures that cannot be drawn (no model file, no manifest to take a slice from, no motion
generator) are left out with the reason written in the report; the report only links to files
that exist.

The documents are Jinja2 templates (templates/run.md.j2, summary.md.j2); ``sections`` makes the
tables from metrics, ``text`` the number formats, ``inputs`` reads the manifest and slices.
"""

from training.report.run import write_run_report
from training.report.summary import write_summary

__all__ = ["write_run_report", "write_summary"]
