"""The `cbir` command: parse, call the library, print. Heavy libraries load inside the commands."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="Content-based image retrieval: train and evaluate text-to-image models, search photos by sentence.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True, soft_wrap=True)

DatasetOpt = Annotated[Path, typer.Option("--dataset", "-d", help="Dataset folder (any supported format).")]
ModelOpt = Annotated[Path, typer.Option("--model", "-m", help="Model directory written by `cbir train`.")]
REPORT_LINES = 5


def fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def user_errors():
    """Errors caused by input (files, folders, options) become one clear line, not a traceback."""
    from cbir.datasets import DatasetError
    from cbir.models import ModelError

    return (DatasetError, ModelError, FileNotFoundError, NotADirectoryError, PermissionError, ValueError)


def open_dataset(path: Path):
    from cbir.datasets import load_dataset

    data = load_dataset(path)
    if len(data.report):
        err.print(
            f"[yellow]note:[/] {len(data.report)} item(s) skipped while reading {path}:", highlight=False
        )
        for line in data.report.skipped[:REPORT_LINES]:
            err.print(f"  {line}", highlight=False, markup=False)
        if len(data.report) > REPORT_LINES:
            err.print(f"  … and {len(data.report) - REPORT_LINES} more", highlight=False)
    return data


def parse_params(pairs: list[str]) -> dict[str, object]:
    params: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--param expects KEY=VALUE, got '{pair}'")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


METRIC_ROWS = [
    ("text → image", "t2i"),
    ("image → text", "i2t"),
]


def metrics_table(metrics: dict[str, float], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("direction", "R@1", "R@5", "R@10", "R@20"):
        table.add_column(col, justify="right" if col != "direction" else "left")
    for label, key in METRIC_ROWS:
        table.add_row(label, *(f"{metrics[f'{key}_r{k}']:.2f}" for k in (1, 5, 10, 20)))
    table.caption = (
        f"mR {metrics['mR']:.2f} · MAP@20 {metrics['map20']:.4f} · median rank {metrics['medr']:g} · "
        f"{metrics['n_queries']} queries, {metrics['n_images']} images"
    )
    return table


@app.command()
def train(
    dataset: DatasetOpt,
    method: Annotated[str, typer.Option(help="Retrieval method (see `cbir methods`).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Model directory to write.")],
    param: Annotated[
        list[str], typer.Option("--param", "-p", help="Method parameter KEY=VALUE (repeatable).")
    ] = [],  # noqa: B006
    seed: Annotated[int | None, typer.Option(help="Random seed, for methods that use one.")] = None,
    epochs: Annotated[
        int | None, typer.Option(help="Training epochs, for methods that train by epochs.")
    ] = None,
) -> None:
    """Fit a retrieval method on the dataset's train split (val split for model selection) and save it."""
    from cbir.models import create_model

    try:
        params = parse_params(param)
        for key, value in (("seed", seed), ("epochs", epochs)):
            if value is not None:
                params[key] = value
        model = create_model(method, **params)
        data = open_dataset(dataset)
        val = data.split("val") if "val" in data.splits else None
        start = time.perf_counter()
        model.fit(data.split("train"), val)
        model.save(out_dir)
    except user_errors() as e:
        fail(str(e))
    out.print(f"trained [bold]{method}[/] in {time.perf_counter() - start:.1f}s → {out_dir}", highlight=False)


@app.command()
def evaluate(
    model: ModelOpt,
    dataset: DatasetOpt,
    split: Annotated[str, typer.Option(help="Split to score: train, val, test or all.")] = "test",
    as_json: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON.")] = False,
) -> None:
    """Score a model: every caption of the split queries its images (R@K both ways, mR, MAP@20, medr)."""
    from cbir.evaluation import evaluate as run_evaluation
    from cbir.models import load_model

    try:
        loaded = load_model(model)
        metrics = run_evaluation(loaded, open_dataset(dataset), split)
    except user_errors() as e:
        fail(str(e))
    if as_json:
        print(json.dumps(metrics, indent=2))
    else:
        out.print(metrics_table(metrics, f"{loaded.method} on {dataset} ({split})"))


@app.command()
def submit(
    model: ModelOpt,
    dataset: Annotated[Path, typer.Option("--dataset", "-d", help="Kaggle cs5785 layout folder.")],
    out_file: Annotated[Path, typer.Option("--out", "-o", help="Submission CSV to write.")] = Path(
        "submission.csv"
    ),
) -> None:
    """Write a Kaggle cs5785 submission: the 20 best test images for every test description."""
    from cbir.datasets.kaggle import ANSWERS_FILE
    from cbir.models import load_model
    from cbir.submission import score_submission, write_submission

    try:
        data = open_dataset(dataset)
        path = write_submission(load_model(model), data, out_file)
        answers = dataset / ANSWERS_FILE
        score = score_submission(path, answers) if answers.is_file() else None
    except user_errors() as e:
        fail(str(e))
    n = len(data.split("test").captions)
    out.print(f"wrote {n} rankings of 20 test images → {path}", highlight=False)
    if score is not None:
        out.print(f"MAP@20 against {answers}: {score:.4f}", highlight=False)


@app.command()
def methods() -> None:
    """List the retrieval methods `cbir train --method` accepts."""
    from cbir.models import METHODS, method_class

    for name in sorted(METHODS):
        doc = (method_class(name).__doc__ or "").strip().splitlines()
        out.print(f"[bold]{name:14}[/] {doc[0] if doc else ''}", highlight=False)


def default_demo_dataset() -> Path | None:
    if os.environ.get("CBIR_DATASET"):
        return Path(os.environ["CBIR_DATASET"])
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        candidate = base.parent / "shared" / "datasets" / "rsicd"
        if candidate.is_dir():
            return candidate
    return None


@app.command()
def demo(
    dataset: Annotated[
        Path | None,
        typer.Option("--dataset", "-d", help="Dataset (default: $CBIR_DATASET or ../shared/datasets/rsicd)."),
    ] = None,
    method: Annotated[str, typer.Option(help="Method to train.")] = "ridge",
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Where the trained model goes.")] = Path(
        "runs/demo"
    ),
) -> None:
    """The main job end to end: train on the train split, evaluate on test, print the metrics."""
    from cbir.evaluation import evaluate as run_evaluation
    from cbir.models import create_model

    dataset = dataset or default_demo_dataset()
    if dataset is None:
        fail(
            "no dataset found. Set CBIR_DATASET to a captioned dataset folder (Karpathy JSON such as "
            "dataset_flickr8k.json + images, the Kaggle cs5785 layout, COCO captions, or captions.txt), "
            "or pass --dataset."
        )
    try:
        data = open_dataset(dataset)
        out.print(f"[bold]1/3[/] {data!r}", highlight=False)
        model = create_model(method)
        start = time.perf_counter()
        out.print(f"[bold]2/3[/] training {method} on the train split (features are cached for next time)")
        model.fit(data.split("train"), data.split("val") if "val" in data.splits else None)
        model.save(out_dir)
        out.print(f"    trained in {time.perf_counter() - start:.1f}s → {out_dir}")
        out.print("[bold]3/3[/] evaluating on the test split")
        metrics = run_evaluation(model, data, "test")
    except user_errors() as e:
        fail(str(e))
    out.print(metrics_table(metrics, f"{method} on {data.name} (test)"))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
