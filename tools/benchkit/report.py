"""The Markdown report of ``tools/bench.py``: one ``Section`` per heading, number formatting and progress lines."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Section:
    """One heading of the report: a paragraph, a table (``header`` and ``rows``) and bullet ``notes``."""

    title: str
    text: str = ""
    header: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        out = [f"## {self.title}", ""]
        if self.text:
            out += [self.text, ""]
        if self.header:
            out.append("| " + " | ".join(self.header) + " |")
            out.append("|" + "|".join("---" for _ in self.header) + "|")
            out += ["| " + " | ".join(row) + " |" for row in self.rows]
            out.append("")
        out += [f"- {n}" for n in self.notes]
        if self.notes:
            out.append("")
        return "\n".join(out)


def fmt_s(seconds: float) -> str:
    return f"{seconds:.3f} s" if seconds < 10 else f"{seconds:.1f} s"


def fmt_x(ratio: float) -> str:
    return f"{ratio:.2f}x"


def fmt_mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.2f} MiB"


def fmt_tflop(flops: float) -> str:
    return f"{flops / 1e12:,.1f}"


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)
