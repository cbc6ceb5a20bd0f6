"""Text of the reports: number formats, markdown tables and links, names of models and runs,
and the Jinja2 environment the report templates are rendered in."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2

from training import figures

MODEL_LABEL = {"convnet": "ConvNet", "resnet10": "ResNet-10"}


TASK_LABEL = {"binary": "binary", "3class": "3-class"}


MODEL_ORDER = ("convnet", "resnet10")


TASK_ORDER = ("binary", "3class")


def pct(x: Any, digits: int = 1) -> str:
    return "—" if x is None else f"{100 * float(x):.{digits}f}%"


def num(x: Any, digits: int = 3) -> str:
    return "—" if x is None else f"{float(x):.{digits}f}"


def pp(x: Any) -> str:
    """A difference of fractions in percentage points, signed."""
    return "—" if x is None else f"{100 * float(x):+.1f} pp"


def signed(x: Any, digits: int = 3) -> str:
    return "—" if x is None else f"{float(x):+.{digits}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


def rel(target: Path, base_dir: Path) -> str:
    return Path(os.path.relpath(Path(target).resolve(), Path(base_dir).resolve())).as_posix()


def pretty_class(name: str) -> str:
    return figures.PRETTY_CLASS.get(name, name.replace("_", " "))


def model_label(model: str) -> str:
    return MODEL_LABEL.get(model, model)


def run_label(result: Mapping[str, Any]) -> str:
    return f"{model_label(result['model'])} {TASK_LABEL.get(result['task'], result['task'])}"


def slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in text).strip("_") or "run"


def image(path: Path | None, alt: str, base_dir: Path) -> str:
    """A markdown image link, or nothing when the figure was not drawn."""
    if path is not None and Path(path).is_file():
        return f"![{alt}]({rel(path, base_dir)})\n"
    return ""


_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("training.report", "templates"),
    autoescape=False,  # markdown, not HTML
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
    undefined=jinja2.StrictUndefined,
)
_ENV.filters.update(pct=pct, num=num, pretty_class=pretty_class, model_label=model_label)
_ENV.filters["md"] = "\n".join  # a section's lines (each ends in a blank line) as markdown


def render(template: str, **context: Any) -> str:
    """A report template rendered with ``context``; its filters are this module's formats."""
    return _ENV.get_template(template).render(**context)
