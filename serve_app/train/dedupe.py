"""Near-duplicate files: MinHash over each file's set of lines, banded LSH, first file kept.

Why: installed packages copy code from each other and from the stdlib (vendored modules,
backports such as ``typing_extensions``, transformers' "Copied from" model files). A model trained
on many copies over-weights them, and a copy of a held-out file in training would leak the
evaluation (issue 15: "no file the evaluation uses is trained on"). Exact copies are already
dropped by text hash (``corpus.load_corpus``); this catches files that differ by a few lines.

Similarity is the Jaccard index of the two files' sets of stripped, non-blank lines (code
near-duplicates share lines, not just words). MinHash (Broder 1997) estimates it from
``num_perm`` minima of seeded 64-bit mixes of the line hashes (splitmix64's finalizer; an affine
``a*h + b mod p`` that never wraps is monotonic in h and biased the estimate to half the truth); LSH with ``bands`` bands of ``num_perm / bands`` rows
proposes candidate pairs (files equal in a whole band), and a candidate is a duplicate when its
estimated Jaccard is ≥ ``threshold``. Files are visited in the caller's order and a duplicate of
an earlier kept file is dropped, so callers put what must survive first (held-out files before
training files, the stdlib before packages). Deterministic: crc32 line hashes, seeded permutations.
"""
from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)   # splitmix64


@dataclass(frozen=True)
class DedupeConfig:
    """When two files count as near-duplicates."""

    threshold: float = 0.8     # estimated Jaccard of the line sets
    num_perm: int = 64         # MinHash size: the estimate's standard error is ~0.05 at J = 0.8
    bands: int = 16            # LSH: 16 bands × 4 rows propose pairs from J ≈ 0.5 on
    min_lines: int = 8         # fewer distinct lines: too little to judge; only exact copies drop
    seed: int = 0


def line_hashes(text: str) -> np.ndarray:
    """crc32 of each distinct stripped non-blank line, as uint64."""
    lines = {line.strip() for line in text.split("\n")}
    lines.discard("")
    return np.fromiter((zlib.crc32(line.encode()) for line in lines), dtype=np.uint64, count=len(lines))


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijection of uint64 whose outputs look independent (wraps mod 2**64)."""
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


class MinHasher:
    def __init__(self, config: DedupeConfig):
        rng = np.random.default_rng(config.seed)
        self.seeds = rng.integers(0, 1 << 63, size=(config.num_perm, 1), dtype=np.uint64)   # [P, 1]

    def signature(self, hashes: np.ndarray) -> np.ndarray:
        """[num_perm] minima over the lines of mix(h ^ seed), one seed per permutation."""
        return _mix(hashes[None, :] ^ self.seeds).min(axis=1)


def near_duplicates(texts: Sequence[str], config: DedupeConfig | None = None) -> list[int | None]:
    """For each text, the index of the earlier kept text it near-duplicates, or None (kept)."""
    config = config or DedupeConfig()
    if config.num_perm % config.bands:
        raise ValueError(f"num_perm {config.num_perm} is not a multiple of bands {config.bands}")
    hasher = MinHasher(config)
    rows = config.num_perm // config.bands
    buckets: list[dict[bytes, list[int]]] = [{} for _ in range(config.bands)]
    signatures: dict[int, np.ndarray] = {}
    out: list[int | None] = []
    for i, text in enumerate(texts):
        hashes = line_hashes(text)
        if len(hashes) < config.min_lines:
            out.append(None)
            continue
        sig = hasher.signature(hashes)
        keys = [sig[b * rows:(b + 1) * rows].tobytes() for b in range(config.bands)]
        candidates = dict.fromkeys(j for b, key in enumerate(keys) for j in buckets[b].get(key, ()))
        twin = next((j for j in candidates if float((signatures[j] == sig).mean()) >= config.threshold), None)
        out.append(twin)
        if twin is None:
            signatures[i] = sig
            for b, key in enumerate(keys):
                buckets[b].setdefault(key, []).append(i)
    return out
