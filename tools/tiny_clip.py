"""Write a tiny, randomly initialised CLIP checkpoint in the transformers format, to try the CLIP
backend (`-p checkpoint=...`, `-p image_features=clip:...`) without real CLIP weights.

    python tools/tiny_clip.py runs/tiny-clip

Two-layer, 32-wide towers over 32x32 images, 16-d embeddings, seeded weights, a character-level CLIP
tokenizer (every byte, with and without CLIP's end-of-word mark; no merges) and a preprocessor config.
Its weights are random, so its rankings mean nothing: it is for tests and for trying the commands.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PROJECTION = 16
IMAGE_SIDE = 32


def byte_alphabet() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE (GPT-2 / CLIP's `bytes_to_unicode`)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    rest = [b for b in range(256) if b not in printable]
    return [chr(c) for c in printable] + [chr(256 + i) for i in range(len(rest))]


def write_tiny_clip(out: Path, seed: int = 0) -> Path:
    """The checkpoint directory: config.json, model.safetensors, tokenizer files, preprocessor config."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    chars = byte_alphabet()
    vocab = {token: i for i, token in enumerate(chars + [c + "</w>" for c in chars])}
    bos, eos = len(vocab), len(vocab) + 1
    vocab.update({"<|startoftext|>": bos, "<|endoftext|>": eos})
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(
            tower, vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos,
            pad_token_id=eos,
        ),
        vision_config=dict(tower, image_size=IMAGE_SIDE, patch_size=8),
        projection_dim=PROJECTION,
    )  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        CLIPModel(config).save_pretrained(out)
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(out)
    side = {"height": IMAGE_SIDE, "width": IMAGE_SIDE}
    preprocessor = {"size": {"shortest_edge": IMAGE_SIDE}, "crop_size": side}
    (Path(out) / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    return Path(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="checkpoint directory to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"wrote a tiny random CLIP checkpoint to {write_tiny_clip(args.out, args.seed)}")


if __name__ == "__main__":
    main()
