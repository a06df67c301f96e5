"""Queries a person would type, over the 1,000 Flickr8k test photos: precision@5 per model (issue 11).

    python -m benchmarks.everyday_queries [--model default --model zero-shot ...]

Each query is hand-written, with a hand-written rule for judging a photo against its five reference
captions: every group of words must occur somewhere in them (whole words, any of the group's
spellings). A top-5 result is relevant when its captions pass the rule. The rules were written
before any model was run on them (two whose rule fewer than five test photos pass were swapped
for others); `relevant` is how many test photos pass each one.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

from cbir.datasets import Dataset, load_dataset
from cbir.models import load_model

FLICKR8K = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "flickr8k"
K = 5
PEOPLE = "man|men|woman|women|person|people|boy|boys|girl|girls|child|children|kid|kids|guy|lady"
CHILD = "child|children|kid|kids|boy|boys|girl|girls|toddler"
DOG = "dog|dogs|puppy"
# query -> groups of alternatives, all of which the photo's captions must mention.
QUERIES: dict[str, list[str]] = {
    "a dog running on the beach": [DOG, "beach|sand|sandy|ocean|shore|surf"],
    "children playing in the snow": [CHILD, "snow|snowy"],
    "a black dog playing with a ball": ["black", DOG, "ball"],
    "a man riding a bike": [PEOPLE, "bike|bicycle|bicycles|biking|bicyclist|cyclist|bmx"],
    "a surfer riding a wave": ["surf|surfer|surfers|surfing|surfboard", "wave|waves"],
    "a person climbing a rock wall": ["climb|climbs|climbing|climber", "rock|rocks|wall|cliff"],
    "a little girl in a pink dress": ["girl", "pink"],
    "two dogs playing in the grass": [DOG, "grass|grassy|field|lawn"],
    "a skateboarder doing a trick": ["skateboard|skateboarder|skateboarding|skater"],
    "a crowd of people on a city street": ["crowd|people|group", "street|city|sidewalk"],
    "a child swimming in a pool": [CHILD, "pool"],
    "a boat on the water": ["boat|boats|kayak|canoe|raft|sailboat"],
    "a dog jumping over an obstacle": [DOG, "jump|jumps|jumping|leaps|leaping|hurdle"],
    "a brown dog swimming": ["brown", DOG, "swim|swims|swimming|water"],
    "people sitting on a bench": ["bench|benches"],
    "a motorcycle racing on a dirt track": ["motorcycle|motorcycles|motorbike|motocross|dirt bike"],
    "a baby": ["baby|babies|infant|toddler"],
    "a horse": ["horse|horses|pony"],
    "a man playing the guitar": ["guitar|guitars|guitarist"],
    "a little girl on a swing": ["swing|swings|swinging"],
    "a basketball game": ["basketball"],
    "a dog catching a frisbee": [DOG, "frisbee"],
    "a person skiing down a slope": ["ski|skis|skiing|skier|skiers"],
    "a dog carrying a stick in its mouth": [DOG, "stick|sticks"],
    "a snowboarder in the air": ["snowboard|snowboarder|snowboarding|snowboards"],
    "kids playing soccer": ["soccer"],
    "children playing in a fountain": ["fountain|fountains"],
}


def judge(groups: list[str], captions: str) -> bool:
    return all(re.search(rf"\b({g})\b", captions) for g in groups)


def relevance(test: Dataset) -> np.ndarray:
    """(n_queries, n_images) booleans: which photos each query's rule accepts."""
    text = [" ".join(test.captions_of(i)).lower() for i in range(len(test))]
    return np.array([[judge(groups, t) for t in text] for groups in QUERIES.values()])


def precision_at_k(model_name: str, test: Dataset, relevant: np.ndarray) -> np.ndarray:
    model = load_model(model_name)
    scores = model.score(model.embed_texts(list(QUERIES)), model.embed_images(test))
    top = np.argsort(-scores, axis=1, kind="stable")[:, :K]
    return np.take_along_axis(relevant, top, axis=1).mean(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=FLICKR8K)
    parser.add_argument("--model", action="append", help="model name or directory (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-everyday-queries.json"))
    args = parser.parse_args()
    models = args.model or ["default", "zero-shot"]
    test = load_dataset(args.dataset).split("test")
    relevant = relevance(test)
    table = {m: precision_at_k(m, test, relevant) for m in models}
    print("| query | relevant photos | " + " | ".join(f"P@{K} {m}" for m in models) + " |")
    print("|---|---|" + "---|" * len(models))
    for q, (query, rel) in enumerate(zip(QUERIES, relevant, strict=True)):
        print(f"| {query} | {int(rel.sum())} | " + " | ".join(f"{table[m][q]:.1f}" for m in models) + " |")
    print(
        f"| **mean over {len(QUERIES)} queries** | | "
        + " | ".join(f"**{table[m].mean():.2f}**" for m in models)
        + " |"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({m: table[m].tolist() for m in models} | {"queries": list(QUERIES)}))


if __name__ == "__main__":
    main()
