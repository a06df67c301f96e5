"""Opening a photo in the system's image viewer (`cbir search --open`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

OPENERS = ("xdg-open", "gio", "open")  # freedesktop, GNOME, macOS


def open_in_viewer(path: Path) -> None:
    """Hand `path` to the system viewer, without waiting for it; a clear error when there is none."""
    if sys.platform == "win32":
        os.startfile(path)  # type: ignore[attr-defined]
        return
    for name in OPENERS:
        opener = shutil.which(name)
        if opener:
            args = [opener, "open", str(path)] if name == "gio" else [opener, str(path)]
            subprocess.Popen(
                args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
            )
            return
    raise FileNotFoundError(
        f"no system image viewer found (looked for {', '.join(OPENERS)}); the top result is {path}"
    )
