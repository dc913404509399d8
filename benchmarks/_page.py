"""Shared output of the benchmarks: one ``## `` section of a Markdown page, and PNG figures."""

from __future__ import annotations

from pathlib import Path


def replace_section(page: Path, heading: str, text: str) -> None:
    """Replace the section of ``page`` that starts with ``heading`` by ``text``, atomically.

    The section runs from the line starting with ``heading`` to the next ``## `` heading or the
    end of the page. When the page has no such section, ``text`` is appended.
    """
    from ppm_core.io import atomic_path

    old = page.read_text() if page.is_file() else ""
    lines = old.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.startswith(heading)), None)
    if start is None:
        new = (old.rstrip() + "\n\n" if old.strip() else "") + text
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        after = "".join(lines[end:])
        new = "".join(lines[:start]) + text.rstrip() + "\n" + ("\n" + after if after else "")
    with atomic_path(page) as tmp:
        tmp.write_text(new)


def save_png(fig, path: Path) -> None:
    """Lay out ``fig``, write it to ``path`` as a PNG atomically, and close it."""
    import matplotlib.pyplot as plt

    from ppm_core.io import atomic_path

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=130, format="png")
    plt.close(fig)
