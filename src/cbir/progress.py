"""One progress bar for all long work (rich, on stderr), silenced with CBIR_NO_PROGRESS=1."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager


def progress_enabled() -> bool:
    return os.environ.get("CBIR_NO_PROGRESS", "") in ("", "0")


@contextmanager
def progress_bar(description: str, total: int | None, enabled: bool = True) -> Iterator[Callable[..., None]]:
    """Yield `advance(n=1, **fields)`; `fields` show as text after the bar (loss, metric)."""
    if not (enabled and progress_enabled()):
        yield lambda n=1, **fields: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
    ]
    with Progress(*columns, transient=False, console=Console(stderr=True)) as bar:  # stdout stays for --json
        task = bar.add_task(description, total=total, info="")

        def advance(n: int = 1, **fields: object) -> None:
            info = "  ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items()
            )
            bar.update(task, advance=n, **({"info": info} if fields else {}))

        yield advance
