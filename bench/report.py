"""Figures, sections and how they are shown: a console table, a Markdown report, a JSON record."""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.stats import ratio

_OPS = {"<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b,
        "==": lambda a, b: a == b}


@dataclass
class Figure:
    """One measured number, next to the baseline it is compared with (measured in the same run).

    ``target``: an optional stretch target on ``value`` as (operator, number), reported, never asserted.
    """

    name: str
    value: float | None
    unit: str
    baseline_name: str = ""
    baseline: float | None = None
    target: tuple[str, float] | None = None
    target_on_ratio: bool = False  # the target bounds ``ratio`` instead of ``value``
    note: str = ""

    def __post_init__(self) -> None:
        if self.target is not None and self.target[0] not in _OPS:
            raise ValueError(f"figure {self.name!r}: target operator must be one of {sorted(_OPS)}, "
                             f"found {self.target[0]!r}")

    @property
    def ratio(self) -> float | None:
        return ratio(self.value, self.baseline)

    @property
    def met(self) -> bool | None:
        measured = self.ratio if self.target_on_ratio else self.value
        if self.target is None or measured is None or math.isnan(measured):
            return None
        op, bound = self.target
        return bool(_OPS[op](measured, bound))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ratio"] = self.ratio
        data["met"] = self.met
        return data


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[Any]]


@dataclass
class Section:
    """What one suite measured; ``error`` is set (and figures may be partial) when it failed."""

    name: str
    title: str
    figures: list[Figure] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    plots: dict[str, str] = field(default_factory=dict)  # file name -> SVG text
    blocks: dict[str, str] = field(default_factory=dict)  # title -> preformatted text (profiles, logs)
    data: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    seconds: float = 0.0
    load_before: tuple[float, float, float] | None = None
    load_after: tuple[float, float, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "title": self.title, "figures": [f.to_dict() for f in self.figures],
                "tables": [asdict(t) for t in self.tables], "notes": self.notes, "plots": sorted(self.plots),
                "blocks": self.blocks,
                "data": self.data, "error": self.error, "seconds": self.seconds,
                "load_before": self.load_before, "load_after": self.load_after}


# ---- formatting ---------------------------------------------------------------------------------------------

def fmt_number(value: float | None, digits: int = 3) -> str:
    """``digits`` significant digits, without exponent notation for everyday magnitudes."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if value == 0:
        return "0"
    if isinstance(value, int) or (abs(value) >= 10 ** (digits - 1) and float(value).is_integer()):
        return f"{int(value):,}"
    magnitude = math.floor(math.log10(abs(value)))
    decimals = max(0, digits - 1 - magnitude)
    text = f"{value:,.{decimals}f}"
    return text


def fmt_value(value: float | None, unit: str) -> str:
    text = fmt_number(value)
    if text == "n/a" or not unit:
        return text
    return f"{text}×" if unit == "x" else f"{text} {unit}"


def fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{fmt_number(value)}×"


def fmt_target(figure: Figure) -> str:
    if figure.target is None:
        return ""
    op, bound = figure.target
    mark = {True: "met", False: "missed", None: "n/a"}[figure.met]
    shown = f"ratio {op} {fmt_number(bound)}" if figure.target_on_ratio else f"{op} {fmt_value(bound, figure.unit)}"
    return f"{shown} ({mark})"


def _load(load: tuple[float, float, float] | None) -> str:
    return "n/a" if load is None else " ".join(f"{x:.2f}" for x in load)


FIGURE_HEADERS = ["suite", "figure", "value", "baseline", "baseline value", "ratio", "target"]


def figure_rows(sections: list[Section]) -> list[list[str]]:
    rows = []
    for s in sections:
        for f in s.figures:
            rows.append([s.name, f.name, fmt_value(f.value, f.unit), f.baseline_name,
                         fmt_value(f.baseline, f.unit) if f.baseline_name else "", fmt_ratio(f.ratio)
                         if f.baseline_name else "", fmt_target(f)])
        if s.error:
            rows.append([s.name, "ERROR", s.error.splitlines()[0][:100], "", "", "", ""])
    return rows


def console_table(headers: list[str], rows: list[list[str]], max_width: int = 60) -> str:
    """A plain aligned text table (cells clipped to ``max_width``)."""
    clipped = [[str(c)[:max_width] for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in clipped]) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in clipped]
    return "\n".join(out)


def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown_report(sections: list[Section], machine: dict[str, Any], options: dict[str, Any]) -> str:
    mem = machine.get("memory_total_bytes")
    lines = [
        "# ctloop benchmarks",
        "",
        f"Run `{options.get('command', 'python -m bench')}` on {machine['date']} at commit {machine['git']}. "
        "Every ratio is value / baseline, both measured in this run. Targets are reported, never asserted.",
        "",
        "## Machine",
        "",
        markdown_table(["what", "value"], [
            ["nproc", machine["nproc"]],
            ["CPU", machine["cpu_model"]],
            ["memory", f"{mem / 2**30:.1f} GiB" if mem else "n/a"],
            ["kernel", machine["kernel"]],
            ["python", machine["python"]],
            ["java", machine["java"]],
            ["packages", ", ".join(f"{k} {v}" for k, v in machine["packages"].items())],
            ["load (1/5/15 min) before", _load(options.get("load_before"))],
            ["load (1/5/15 min) after", _load(options.get("load_after"))],
        ]),
        "",
        "The machine is shared: other test runs may have competed for the CPUs during this run; the load",
        "average before and after each suite is listed with it.",
        "",
        "## Summary",
        "",
        markdown_table(FIGURE_HEADERS, figure_rows(sections)),
    ]
    for s in sections:
        lines += ["", f"## {s.title}", "",
                  f"Suite time {s.seconds:.0f} s; load before {_load(s.load_before)}, after {_load(s.load_after)}."]
        if s.error:
            lines += ["", f"**Failed:** `{s.error.splitlines()[0]}`", "", "```", s.error[-3000:], "```"]
        for t in s.tables:
            lines += ["", f"### {t.title}", "", markdown_table(t.headers, t.rows)]
        for name in sorted(s.plots):
            lines += ["", f"![{name}]({name})"]
        for title, text in s.blocks.items():
            lines += ["", f"### {title}", "", "```", text.rstrip(), "```"]
        if s.notes:
            lines += [""] + [f"- {n}" for n in s.notes]
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file in the same folder and a rename: never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_results(out_dir: Path, sections: list[Section], machine: dict[str, Any],
                  options: dict[str, Any]) -> list[Path]:
    """``results.md``, ``results.json`` and each section's SVG plots into ``out_dir``; returns the paths."""
    written = []
    for s in sections:
        for name, svg in s.plots.items():
            write_atomic(out_dir / name, svg)
            written.append(out_dir / name)
    record = {"machine": machine, "options": options, "sections": [s.to_dict() for s in sections]}
    write_atomic(out_dir / "results.json", json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    write_atomic(out_dir / "results.md", markdown_report(sections, machine, options))
    return [*written, out_dir / "results.json", out_dir / "results.md"]
