"""The `cbir` command: parse, call the library, print. Heavy libraries load inside the commands."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

if TYPE_CHECKING:
    from cbir.indexing import IndexReport

app = typer.Typer(
    help="Content-based image retrieval: train and evaluate text-to-image models, search photos by sentence.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

DatasetOpt = Annotated[Path, typer.Option("--dataset", "-d", help="Dataset folder (any supported format).")]
ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="Model directory from `cbir train`, or `default` or `zero-shot`.")
]
RayOpt = Annotated[
    bool,
    typer.Option(
        "--ray",
        help="Compute the photos' network features on Ray: a private local Ray, or a running cluster with "
        "`--ray ADDRESS` (the same as --ray-address). Every node must see the photos at the same path; "
        "needs cbir's ray extra.",
    ),
]
RayAddressOpt = Annotated[
    str | None,
    typer.Option(help="A running Ray cluster to compute on (implies --ray), e.g. 10.0.0.5:6379 or `auto`."),
]
RayWorkersOpt = Annotated[
    int, typer.Option(min=1, help="With --ray: actors that hold the network (one CPU each).")
]
REPORT_LINES = 5


def fail(message: str, code: int = 2) -> None:
    from rich.markup import escape

    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)  # `cbir[ray]` is no markup
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


def training_splits(data):
    """(train split, val split or None): what `fit_on_splits` fits on."""
    return data.split("train"), data.split("val") if "val" in data.splits else None


def fit_on_splits(model, data) -> None:
    """Fit on the train split, the val split (when there is one) for model selection. The method
    refuses training data it cannot learn from; a diverged model is refused when it is saved. A val
    split with captions also calibrates the model's scores (cbir.calibration)."""
    from cbir.calibration import calibrate_if_possible

    train, val = training_splits(data)
    model.fit(train, val)
    calibrate_if_possible(model, val)


def features_on_ray(model, data, address: str | None, workers: int) -> None:
    """Before fitting: the photo features it will read that the feature cache lacks, computed on Ray."""
    from cbir.distributed import fill_feature_cache

    start = time.perf_counter()
    needs = model.fit_image_views(*training_splits(data))
    fill = fill_feature_cache(needs, address, backbone=model.image_backbone(), workers=workers)
    out.print(
        f"image features: {fill.computed} computed on Ray, {fill.cached} found cached "
        f"in {time.perf_counter() - start:.1f}s",
        highlight=False,
    )


METRIC_ROWS = [
    ("text → image", "t2i"),
    ("image → text", "i2t"),
]


def print_metrics(metrics: dict[str, float], title: str) -> None:
    """A title line, the recall table (both directions), then the summary numbers."""
    from rich.table import Table

    table = Table()
    for col in ("direction", "R@1", "R@5", "R@10", "R@20"):
        table.add_column(col, justify="right" if col != "direction" else "left")
    for label, key in METRIC_ROWS:
        table.add_row(label, *(f"{metrics[f'{key}_r{k}']:.2f}" for k in (1, 5, 10, 20)))
    out.print(title, highlight=False)
    out.print(table)
    out.print(
        f"mR {metrics['mR']:.2f} · MAP@20 {metrics['map20']:.4f} · median rank {metrics['medr']:g} · "
        f"{metrics['n_queries']} queries, {metrics['n_images']} images",
        highlight=False,
    )


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
    ray: RayOpt = False,
    ray_address: RayAddressOpt = None,
    ray_workers: RayWorkersOpt = 2,
) -> None:
    """Fit a retrieval method on the dataset's train split (val split for model selection) and save it.
    With --ray, the photo features it reads are computed on Ray first (those not cached yet)."""
    from cbir.distributed import RayUnavailableError
    from cbir.models import create_model

    try:
        params = parse_params(param)
        for key, value in (("seed", seed), ("epochs", epochs)):
            if value is not None:
                params[key] = value
        model = create_model(method, **params)
        data = open_dataset(dataset)
        start = time.perf_counter()
        if ray or ray_address:
            features_on_ray(model, data, ray_address, ray_workers)
        fit_on_splits(model, data)
        model.save(out_dir)
    except (*user_errors(), RayUnavailableError) as e:
        fail(str(e))
    out.print(f"trained [bold]{method}[/] in {time.perf_counter() - start:.1f}s → {out_dir}", highlight=False)
    print_calibration(model.calibration)


def print_calibration(calibration) -> None:
    if calibration is None:
        err.print(
            "[yellow]note:[/] no val split with captions: scores stay raw similarities (add a calibration "
            "with `cbir calibrate`)",
            highlight=False,
        )
        return
    c = calibration
    out.print(
        f"calibrated scores on {c.dataset} {c.split} ({c.positives} matching, {c.negatives} non-matching "
        f"pairs): P(match) = 0.5 at similarity {-c.intercept / c.slope:.3f}",
        highlight=False,
    )
    if c.photo_slope is not None:
        out.print(
            f"photo queries ({c.photo_pairs} photo pairs): P(match) = 0.5 at similarity "
            f"{-c.photo_intercept / c.photo_slope:.3f}",
            highlight=False,
        )


@app.command()
def calibrate(
    model: ModelOpt,
    dataset: DatasetOpt,
    split: Annotated[str, typer.Option(help="Held-out captioned split to fit on.")] = "val",
) -> None:
    """Add score calibration to an existing model directory (for `zero-shot`, to the file the package
    keeps): scores become P(match), so --min-score 0.5 means even odds on every model. Only the
    calibration changes; indexes re-embed on their next run."""
    from cbir.calibration import calibrate as fit_calibration
    from cbir.models import load_model, model_dir, write_zero_shot_calibration
    from cbir.models.base import write_calibration

    try:
        target = model_dir(model)  # None: the zero-shot model, whose calibration the package keeps
        loaded = load_model(model)  # a model that does not load fails before the dataset is read
        data = open_dataset(dataset)
        if split not in data.splits:
            raise ValueError(f"{dataset} has no {split} split (it has: {', '.join(data.splits)})")
        calibration = fit_calibration(loaded, data.split(split), split)
        if target is None:
            target = write_zero_shot_calibration(calibration)
        else:
            write_calibration(target, calibration)
    except user_errors() as e:
        fail(str(e))
    print_calibration(calibration)
    out.print(f"→ {target}", highlight=False)


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
        print_metrics(metrics, f"{loaded.method} on {dataset} ({split})")


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
    """List the retrieval methods `cbir train --method` accepts, each with its parameters (for
    `-p KEY=VALUE`): default, meaning and accepted values."""
    from cbir.models import METHODS, method_class, method_params

    for name in sorted(METHODS):
        doc = (method_class(name).__doc__ or "").strip().splitlines()
        out.print(f"[bold]{name:14}[/] {doc[0] if doc else ''}", highlight=False)
        for param, default, spec in method_params(name):
            out.print(
                f"    {param} = {json.dumps(default)}: {spec.meaning} ({spec.allowed()})",
                highlight=False,
                markup=False,
            )


def default_demo_dataset() -> Path | None:
    if os.environ.get("CBIR_DATASET"):
        return Path(os.environ["CBIR_DATASET"])
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        candidate = base.parent / "shared" / "datasets" / "flickr8k"
        if candidate.is_dir():
            return candidate
    return None


@app.command()
def demo(
    dataset: Annotated[
        Path | None,
        typer.Option(
            "--dataset",
            "-d",
            help="Captioned dataset (default: $CBIR_DATASET or ../shared/datasets/flickr8k).",
        ),
    ] = None,
    model: ModelOpt = "default",
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Where the photos, index and grid go.")] = Path(
        "runs/demo"
    ),
) -> None:
    """The main job end to end: index the test photos, search them, draw a grid, score the model."""
    from cbir.demo import DEMO_QUERIES, photo_folder, reference_captions
    from cbir.evaluation import evaluate as run_evaluation
    from cbir.index import update_index
    from cbir.viz import query_figure

    dataset = dataset or default_demo_dataset()
    if dataset is None:
        fail(
            "no dataset found. Set CBIR_DATASET to a captioned dataset folder (Karpathy JSON such as "
            "dataset_flickr8k.json + images, the Kaggle cs5785 layout, COCO captions, or captions.txt), "
            "or pass --dataset."
        )
    start = time.perf_counter()
    try:
        data = open_dataset(dataset)
        test = data.split("test")
        folder = photo_folder(test, out_dir / "photos")
        out.print(f"[bold]1/4[/] {len(test)} test photos of {data.name} → {folder}", highlight=False)
        ix, _ = update_index(folder, out_dir / "index", model)
        out.print(f"[bold]2/4[/] indexed {len(ix)} photos → {ix.path} (model: {ix.model_source})")
        captions = reference_captions(test)
        out.print("[bold]3/4[/] searching (top 5, each with its reference caption)")
        for query in DEMO_QUERIES:
            out.print(f'  [bold]"{query}"[/]', highlight=False)
            for r in ix.search_text(query, k=5):
                out.print(f"   {r.rank}  {r.score:.3f}  {r.id:28} {captions.get(r.id, '')}", highlight=False)
        grid, _, _ = query_figure(ix, DEMO_QUERIES[0], out_dir / "grid.png", k=10)
        out.print(f"  result grid → {grid}", highlight=False)
        out.print(f"[bold]4/4[/] scoring {ix.model_source} on the {len(test.captions)} test captions")
        metrics = run_evaluation(ix.model, data, "test")
    except search_errors() as e:
        fail(str(e))
    print_metrics(metrics, f"{ix.model_source} on {data.name} (test)")
    out.print(f"demo done in {time.perf_counter() - start:.0f} s", highlight=False)


# ---- Search your own photos (issue 5): index, search, show -------------------------------------------
IndexOpt = Annotated[Path, typer.Option("--index", "-i", help="Index directory written by `cbir index`.")]


def search_errors():
    from cbir.index import IndexFormatError
    from cbir.lockfile import LockBusyError

    return (*user_errors(), IndexFormatError, LockBusyError, KeyError)


def shown(path: Path | str) -> str:
    """A path as text that any terminal can take (cbir.index.printable: the one place that says how)."""
    from cbir.index import printable

    return printable(path)


def print_results(results, as_json: bool, calibrated: bool = True, explanations=None) -> None:
    """Rank, score and path per result (and its explanation, a line below, when given)."""
    if not calibrated:
        err.print(
            "[yellow]note:[/] this index's model has no score calibration: scores are raw similarities, not "
            "P(match) (add one with `cbir calibrate`, then rerun `cbir index`)",
            highlight=False,
        )
    if as_json:
        rows = [r.to_dict() for r in results]
        for row, why in zip(rows, explanations or [], strict=False):
            row["explanation"] = why.to_dict()
        print(json.dumps(rows, indent=2))
        return
    if not results:
        err.print("no results", highlight=False)
    for i, r in enumerate(results):
        out.print(f"{r.rank:>3}  {r.score:7.4f}  {shown(r.path)}", highlight=False, markup=False)
        if explanations:
            out.print(f"     {explanations[i].line()}", highlight=False, markup=False)


@app.command()
def index(
    folder: Annotated[Path, typer.Argument(help="Folder of photos (searched recursively).")],
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Index directory to create or update (default: FOLDER/.cbir, or a per-folder directory "
            "under ~/.local/share/cbir when FOLDER is not writable).",
        ),
    ] = None,
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            help="Model directory from `cbir train`, or a name: `default` (shipped, trained on Flickr8k "
            "everyday photos) or `zero-shot` (ImageNet classes, no training).",
        ),
    ] = "default",
    wait: Annotated[
        float, typer.Option(help="Seconds to wait for another `cbir index` run on the same --out.")
    ] = 0.0,
    ray: RayOpt = False,
    ray_address: RayAddressOpt = None,
    ray_workers: RayWorkersOpt = 2,
    add: Annotated[
        list[str] | None,
        typer.Option(
            "--add",
            help="Only this photo or folder below FOLDER (repeatable; `-` reads paths from standard input, "
            "one a line): new and changed ones are embedded, gone ones dropped, and the rest of the index is "
            "not read, so the run costs what the photos named cost, whatever the size of the index.",
        ),
    ] = None,
) -> None:
    """Embed every photo below FOLDER into an index; reruns embed only new or changed files."""
    from cbir.distributed import RayUnavailableError, ray_encode_chunks
    from cbir.index import update_index
    from cbir.indexing import add_paths
    from cbir.library import default_index_dir, remember
    from cbir.manifest import is_index
    from cbir.models import model_source

    start = time.perf_counter()
    target = out_dir or default_index_dir(folder)
    if model == "zero-shot" and not is_index(target):
        err.print(
            "[dim]first zero-shot index here: preparing its vocabulary (the 1,000 ImageNet class names, "
            "embedded once and cached, so later indexes skip this)[/]",
            highlight=False,
        )
    try:
        encode = ray_encode_chunks(ray_address, workers=ray_workers) if ray or ray_address else None
        if add is None:
            ix, report = update_index(folder, target, model, wait=wait, encode=encode)
            root, index_dir, source = ix.root, ix.path, ix.model_source
        else:
            named = [p for a in add for p in (sys.stdin.read().splitlines() if a == "-" else [a]) if p]
            report = add_paths(folder, target, named, model, wait=wait, encode=encode)
            root, index_dir = folder.expanduser().resolve(), target.expanduser().resolve()
            source = model_source(model)
        remember(index_dir)
    except (*search_errors(), RayUnavailableError) as e:
        fail(str(e))
    print_index_report(report, root, index_dir, source, time.perf_counter() - start)


def print_index_report(report: IndexReport, root: Path, index_dir: Path, source: str, seconds: float) -> None:
    """What an index run did: one line on stdout, then notes on stderr (nothing found, repairs, skips)."""
    out.print(
        f"indexed {report.size} images of {shown(root)} in {seconds:.1f}s "
        f"→ {shown(index_dir)} "
        f"(added {len(report.added)}, changed {len(report.changed)}, removed {len(report.removed)}, "
        f"unchanged {report.unchanged}; model: {source})",
        highlight=False,
        soft_wrap=True,
    )
    if not report.size and not report.failed:
        err.print(f"[yellow]note:[/] found no photos below {shown(root)}", highlight=False)
    for problem in report.damaged.values():
        err.print(f"[yellow]note:[/] {problem}: rebuilt", highlight=False, markup=False)
    if report.repaired:
        err.print(f"[yellow]note:[/] re-embedded {len(report.repaired)} image(s) of damaged shards")
    if report.failed:
        err.print(
            f"[yellow]note:[/] {len(report.failed)} file(s) skipped (not readable images):", highlight=False
        )
        for image_id, reason in sorted(report.failed.items())[:REPORT_LINES]:
            err.print(f"  {shown(root / image_id)}: {reason}", highlight=False, markup=False)
        if len(report.failed) > REPORT_LINES:
            err.print(f"  … and {len(report.failed) - REPORT_LINES} more", highlight=False)


QueryArg = Annotated[
    list[str] | None,
    typer.Argument(
        help='What to look for: words, or arithmetic of terms: "a dog" + "on the beach" - people, '
        "weights as snow:0.5, example photos as img:FILE, indexed photos as id:IMAGE_ID.",
        show_default=False,
    ),
]
OptionalIndexOpt = Annotated[
    Path | None,
    typer.Option(
        "--index",
        "-i",
        help="Index directory (default: the index of this folder or one above it, else the last built).",
    ),
]


def resolve_index(index_dir: Path | None) -> Path:
    """--index, else the default index found from the current folder (said on stderr)."""
    if index_dir is not None:
        return index_dir
    from cbir.library import find_index  # imports the write path (cbir.indexing): only when needed

    found = find_index()
    err.print(f"[dim]index: {shown(found)}[/]", highlight=False)
    return found


def open_search_index(index_dir: Path | None, update: bool):
    """The index to search; with `update`, brought up to date with its folder first."""
    from cbir.index import SearchIndex

    path = resolve_index(index_dir)
    if not update:
        return SearchIndex.open(path)
    from cbir.library import refresh

    ix, report = refresh(path)
    changes = len(report.added) + len(report.changed) + len(report.removed)
    err.print(f"[dim]updated: {changes} change(s) in {shown(ix.root)}[/]", highlight=False)
    return ix


def print_steered(results, as_json: bool, paths: bool, calibrated: bool = True, explanations=None) -> None:
    if paths:
        for r in results:
            print(shown(r.path))
        return
    print_results(results, as_json, calibrated, explanations)


@app.command()
def search(
    text: QueryArg = None,
    index_dir: OptionalIndexOpt = None,
    image: Annotated[Path | None, typer.Option("--image", help="Query by example: an image file.")] = None,
    k: Annotated[int, typer.Option("-k", help="How many results.")] = 20,
    min_score: Annotated[
        float | None,
        typer.Option("--min-score", help="Drop results scoring below (0.5: even odds of a match)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print results as JSON.")] = False,
    more_like: Annotated[
        list[str], typer.Option("--more-like", help="Id of a good result: rank more like it (repeatable).")
    ] = [],  # noqa: B006
    less_like: Annotated[
        list[str], typer.Option("--less-like", help="Id of a bad result: rank less like it (repeatable).")
    ] = [],  # noqa: B006
    folder: Annotated[
        str | None,
        typer.Option(help="Only photos in this folder (relative to the indexed one, or absolute)."),
    ] = None,
    after: Annotated[
        str | None, typer.Option(help="Only photos taken (EXIF) or else modified on or after this date.")
    ] = None,
    before: Annotated[
        str | None, typer.Option(help="Only photos taken or modified before this date.")
    ] = None,
    camera: Annotated[
        str | None, typer.Option(help="Only photos whose EXIF camera make/model contains this text.")
    ] = None,
    offset: Annotated[int, typer.Option(help="Skip this many results (paging: --offset 20 -k 20).")] = 0,
    paths: Annotated[bool, typer.Option("--paths", help="Print bare paths, one a line (for pipes).")] = False,
    open_top: Annotated[
        bool, typer.Option("--open", help="Open the top result in the system image viewer.")
    ] = False,
    update: Annotated[
        bool, typer.Option("--update", help="Index new and changed photos of the folder before searching.")
    ] = False,
    explain: Annotated[
        bool,
        typer.Option(
            "--explain", help="Say why each photo matched: query words that carried it, what the photo shows."
        ),
    ] = False,
) -> None:
    """Search an index by sentence, by example image (--image), or both: rank, score, path."""
    from cbir.explain import explain as explain_results
    from cbir.filters import Filters
    from cbir.query import query_words
    from cbir.viewer import open_in_viewer

    if not text and image is None and not more_like:
        fail('give a text query, --image FILE, or both (e.g. cbir search "a dog on a couch" --index IX)')
    if k < 0 or offset < 0:
        fail("-k and --offset must not be negative")
    try:
        filters = Filters.parse(folder, after, before, camera)
        ix = open_search_index(index_dir, update)
        results = ix.find(
            text,
            image=image,
            more_like=more_like,
            less_like=less_like,
            filters=filters,
            k=k,
            offset=offset,
            min_score=min_score,
        )
        explanations = explain_results(ix, results, query_words(text)) if explain else None
        print_steered(results, as_json, paths, ix.calibrated, explanations)
        if open_top and results:
            open_in_viewer(results[0].path)
    except search_errors() as e:
        fail(str(e))


@app.command()
def show(
    text: Annotated[str, typer.Argument(help="What to look for, in words.")],
    index_dir: IndexOpt,
    out_file: Annotated[
        Path, typer.Option("--out", "-o", help="PNG to write: the query and its top images.")
    ],
    k: Annotated[int, typer.Option("-k", help="How many images in the grid.")] = 10,
    truth: Annotated[
        str | None,
        typer.Option(
            help="Id of the image the query describes (default: looked up in the dataset's captions)."
        ),
    ] = None,
    embedding_map: Annotated[
        Path | None, typer.Option("--map", help="Also write a 2-D map of the indexed images and the query.")
    ] = None,
) -> None:
    """Picture of a text query's top-k images with their scores (ground truth marked when known)."""
    from cbir.index import SearchIndex
    from cbir.viz import embedding_map_figure, query_figure

    try:
        ix = SearchIndex.open(index_dir)
        _, results, truth = query_figure(ix, text, out_file, k=k, truth=truth)
        if embedding_map is not None:
            embedding_map_figure(ix, text, embedding_map, highlight=[r.id for r in results])
    except search_errors() as e:
        fail(str(e))
    note = f" (ground truth: {truth})" if truth else ""
    out.print(
        f"wrote {out_file}{note}" + (f" and {embedding_map}" if embedding_map else ""),
        highlight=False,
        soft_wrap=True,
    )


# ---- Web page and HTTP API (issue 6): serve ---------------------------------------------------------
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def host_names(host: str) -> list[str]:
    """Host header values a server listening on `host` answers by default: the loopback names for a
    loopback address, any name for all interfaces, else the address itself."""
    if host in LOOPBACK:
        return ["127.0.0.1", "localhost", "[::1]"]
    return ["*"] if host in ("0.0.0.0", "::") else [host]


@app.command()
def serve(
    index_dir: OptionalIndexOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on; the default is this machine only.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    allow_host: Annotated[
        list[str],
        typer.Option(
            "--allow-host",
            help="Also answer requests for this Host name (repeatable; '*' for any). By default only "
            "the names of the address listened on are answered.",
        ),
    ] = [],  # noqa: B006
    watch: Annotated[
        bool, typer.Option("--watch", help="Follow the folder: index new and changed photos as they appear.")
    ] = False,
) -> None:
    """Serve the search page and its HTTP API (OpenAPI docs at /docs) until Ctrl-C."""
    import uvicorn

    from cbir.index import read_manifest
    from cbir.library import WATCH_INTERVAL
    from cbir.server import create_app

    url = f"http://{host}:{port}/"
    try:
        index_dir = resolve_index(index_dir)
        read_manifest(index_dir.expanduser().resolve())  # a wrong --index fails now, not on a thread
        err.print(f"loading {shown(index_dir)} and its model; {url} answers meanwhile", highlight=False)
        web = create_app(
            index_dir,
            allowed_hosts=[*host_names(host), *allow_host],
            watch=WATCH_INTERVAL if watch else None,
            load_in_background=True,
            on_ready=lambda ix: out.print(
                f"serving {len(ix)} images from {shown(index_dir)} at {url} (API docs: /docs)"
                + (f"; watching {shown(ix.root)} for new photos" if watch else ""),
                highlight=False,
                soft_wrap=True,
            ),
        )
    except search_errors() as e:
        fail(str(e))
    if host not in LOOPBACK:
        err.print(
            f"[yellow]note:[/] listening on {host}: anyone who can reach it can search and view the images"
        )
    uvicorn.run(web, host=host, port=port, log_level="warning")


RAY_ADDRESS = re.compile(r"auto|ray://\S+|[\w.-]+:\d+|\[[0-9A-Fa-f:.]+\]:\d+")  # IPv6 in brackets


def ray_address_spelling(argv: list[str]) -> list[str]:
    """`--ray ADDRESS` and `--ray=ADDRESS` (issue 16's spelling) as `--ray-address ADDRESS`: a
    flag cannot take an optional value in Typer. The word after `--ray` counts as an address only when
    it looks like one (`auto`, `ray://…`, `host:port`, `[v6 address]:port`) and is not an existing path, so
    `--ray FOLDER` keeps meaning a local Ray."""
    spelled: list[str] = []
    rest = iter(argv)
    for arg in rest:
        if arg.startswith("--ray="):
            spelled += ["--ray-address", arg.partition("=")[2]]
            continue
        spelled.append(arg)
        if arg == "--ray":
            following = next(rest, None)
            if following is None:
                break
            if RAY_ADDRESS.fullmatch(following) and not Path(following).exists():
                spelled[-1:] = ["--ray-address"]
            spelled.append(following)
    return spelled


def main() -> None:
    app(args=ray_address_spelling(sys.argv[1:]))


if __name__ == "__main__":
    main()
