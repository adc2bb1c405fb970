"""The HTML pieces every ctloop report shares: one stylesheet, escaping, tables."""

from __future__ import annotations

import html
from typing import Any

CSS = """
body{font-family:system-ui,sans-serif;margin:2rem;max-width:1100px;color:#1f2328}
h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.25rem .6rem;text-align:left}
th{background:#f6f8fa}.ok{color:#1a7f37;font-weight:600}.bad{color:#cf222e;font-weight:600}
pre{background:#f6f8fa;padding:.75rem;overflow:auto;font-size:.85rem}.plots{display:flex;gap:2rem;flex-wrap:wrap}
"""


def escape(value: Any) -> str:
    return html.escape(str(value))


def table(rows: list[list[Any]], header: list[str]) -> str:
    """A table of already-escaped cells under an escaped header."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"
