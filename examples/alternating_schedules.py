"""English→French and English→German with one shared encoder, trained by alternating.

The toy translator of ``docs/alternating.md``: English sentences of 4 words from a 12-word
vocabulary, translated word for word by a random dictionary per language (German also
reverses the word order). French and German have their own corpora (1,200 and 300
sentences, not the same ones), one shared encoder and one decoder per language. Each
schedule of :func:`taskbalance.train_alternating` trains a fresh model for the same number
of steps, for several seeds; the word accuracy on 500 new sentences per language is printed
as mean ± standard deviation over the seeds (the table of the docs page).

Run it (a few seconds on a CPU)::

    python examples/alternating_schedules.py                     # 5 seeds, 100 steps
    python examples/alternating_schedules.py --seeds 10 --steps 300
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import taskbalance as tb

VOCAB, LENGTH = 12, 4
LANGUAGES = ("fr", "de")
SCHEDULES = ("round_robin", "random", "proportional")


def corpus(dictionary: torch.Tensor, sentences: int, reverse: bool) -> TensorDataset:
    """English sentences and their word-for-word translation by ``dictionary``."""
    english = torch.randint(0, VOCAB, (sentences, LENGTH))
    target = dictionary[english]
    return TensorDataset(english, target.flip(1) if reverse else target)


def translator() -> nn.ModuleDict:
    """``{language: shared encoder -> the language's decoder}``."""
    encoder = nn.Sequential(
        nn.Embedding(VOCAB, 16),
        nn.Flatten(),
        nn.Linear(LENGTH * 16, LENGTH * 32),
        nn.ReLU(),
        nn.Unflatten(1, (LENGTH, 32)),
    )
    return nn.ModuleDict({lang: nn.Sequential(encoder, nn.Linear(32, VOCAB)) for lang in LANGUAGES})


def token_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per word: logits ``(batch, LENGTH, VOCAB)``, target ``(batch, LENGTH)``."""
    return nn.functional.cross_entropy(logits.transpose(1, 2), target)


def run(seed: int, steps: int) -> dict[str, tuple[dict[str, float], dict[str, int]]]:
    """``{schedule: (word accuracy per language, steps per language)}`` for one seed."""
    torch.manual_seed(seed)
    dictionary = {lang: torch.randperm(VOCAB) for lang in LANGUAGES}
    train = {"fr": corpus(dictionary["fr"], 1200, False), "de": corpus(dictionary["de"], 300, True)}
    test = {
        "fr": corpus(dictionary["fr"], 500, False).tensors,
        "de": corpus(dictionary["de"], 500, True).tensors,
    }
    results = {}
    for schedule in SCHEDULES:
        model = translator()
        data = {lang: DataLoader(ds, batch_size=32, shuffle=True) for lang, ds in train.items()}
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        result = tb.train_alternating(
            model, data, token_loss, opt, steps=steps, schedule=schedule, seed=seed, progress=False
        )
        with torch.no_grad():
            accuracy = {
                lang: (model[lang](x).argmax(-1) == y).float().mean().item()
                for lang, (x, y) in test.items()
            }
        results[schedule] = (accuracy, result.step_counts)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    runs = [run(seed, args.steps) for seed in range(args.seeds)]
    print(f"{args.steps} steps, seeds 0..{args.seeds - 1}: word accuracy, mean ± std")
    print("| schedule | French steps | French accuracy | German accuracy |")
    print("|---|---|---|---|")
    for schedule in SCHEDULES:
        counts = [r[schedule][1]["fr"] for r in runs]
        cells = []
        for lang in LANGUAGES:
            values = [r[schedule][0][lang] for r in runs]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.3f} ± {spread:.3f}")
        shown = str(counts[0]) if min(counts) == max(counts) else f"{min(counts)}–{max(counts)}"
        print(f"| {schedule} | {shown} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
