"""The figures' two shared steps: matplotlib on the Agg backend (or None where it is not installed: plots are a
convenience, the numbers are always in the JSON beside them), and saving a finished figure."""
from __future__ import annotations

from pathlib import Path


def pyplot():
    """`matplotlib.pyplot` on the non-interactive Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Lay out, write `fig` to `path` (format from its suffix) and close it, even when the write fails. Callers
    that publish the file atomically pass the temporary path of `common.atomic_dir.write_file`."""
    import matplotlib.pyplot as plt

    try:
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)
    return Path(path)
