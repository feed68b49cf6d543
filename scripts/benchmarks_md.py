"""BENCHMARKS.md sections: every benchmark script writes its own section between two HTML-comment markers.

``scripts/write_benchmarks.py`` (``make bench``) rewrites the head of the file and keeps the other
scripts' sections as they are; each longer script (learning_check.py, merge_check.py, bench_data_ranks.py,
bench_loss_memory.py, bench_eval_e2e.py, bench_gpu.py) replaces only its own section.
"""

from __future__ import annotations

from pathlib import Path


def markers(name: str) -> tuple[str, str]:
    """The begin and end markers of the section ``name`` (for example ``learning_check``)."""
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def write_section(path: Path, section: str, begin: str, end: str) -> None:
    """Replace the section between ``begin`` and ``end`` of ``path`` (or append it), leaving the rest alone."""
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmarks\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section.rstrip("\n") + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text, encoding="utf-8")


def read_section(path: Path, begin: str, end: str) -> str | None:
    """The section between ``begin`` and ``end`` of ``path``, markers included, or None when it is absent."""
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    if begin not in text or end not in text:
        return None
    return begin + text.split(begin, 1)[1].split(end, 1)[0] + end
