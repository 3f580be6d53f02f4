"""Files written whole: a reader (or a process that resumes after an interruption) never sees half of one; and
never through a link: a file that is a symbolic link is replaced by the new file, its target left as it is."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, content: str | bytes) -> None:
    """Write ``path`` whole or not at all: a temporary file in the same folder, then renamed over it (over a link
    too, whose target is left as it is)."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb" if isinstance(content, bytes) else "w") as file:
            file.write(content)
        os.chmod(temporary, 0o666 & ~current_umask())  # mkstemp's file is private (0600); results are not
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_figure(figure, path: Path, dpi: int = 120) -> Path:
    """A matplotlib figure as a PNG at ``path``, written whole (:func:`write_atomic`)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    write_atomic(path, buffer.getvalue())
    return path


def check_inside(path: Path, root: Path) -> Path:
    """``path``, where it lies inside ``root`` once links are followed; an OSError naming both otherwise (a
    linked folder leading elsewhere): nothing is written outside an output folder."""
    resolved = Path(path).resolve()
    if not resolved.is_relative_to(Path(root).resolve()):
        raise OSError(f"{path} leads to {resolved}, outside {root} (a link on the way): refused, nothing written there")
    return Path(path)
