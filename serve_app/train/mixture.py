"""The training corpus of default model v3: the stdlib plus permissive packages, deduplicated, split.

Order matters (``dedupe`` keeps the first of near-duplicates): held-out stdlib files first, so no
training file that copies one survives (the evaluation's files are never trained on, not even as
a vendored copy); then the stdlib's training files; then packages in name order. Exact copies
across the two sources drop the same way (text hash). Package files whose name hashes into the
held-out range (``corpus.is_heldout``, the stdlib's rule) are held out too; they are kept apart in
``heldout_packages`` so the stdlib evaluation stays the one earlier releases were measured on.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from serve_app.train.corpus import CorpusConfig, SourceFile, drop_exact_copies, is_heldout, load_split
from serve_app.train.dedupe import DedupeConfig, near_duplicates
from serve_app.train.packages import Package, PackageConfig, load_packages


@dataclass(frozen=True)
class MixtureConfig:
    """Where training text comes from; None for packages means the stdlib alone (releases 1–2)."""

    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    packages: PackageConfig | None = field(default_factory=PackageConfig)
    dedupe: DedupeConfig = field(default_factory=DedupeConfig)


@dataclass(frozen=True)
class Mixture:
    """The split corpus and what went into it (for the model card)."""

    train: list[SourceFile]            # stdlib then packages, deduplicated
    heldout: list[SourceFile]          # the stdlib's held-out files: the evaluation's
    heldout_packages: list[SourceFile]  # package files held out by the same hash rule (never trained on)
    packages: list[Package]            # the manifest: name, version, licence, files, chars
    dropped_exact: int                 # files dropped as exact copies of an earlier file
    dropped_near: int                  # files dropped as near-duplicates of an earlier file


def load_mixture(config: MixtureConfig | None = None) -> Mixture:
    config = config or MixtureConfig()
    stdlib = load_split(config.corpus)
    pkg_files, manifest = load_packages(config.packages) if config.packages else ([], [])
    ordered = [*stdlib.heldout, *stdlib.train, *pkg_files]
    unique = drop_exact_copies(ordered)
    twins = near_duplicates([f.text for f in unique], config.dedupe)
    kept = [f for f, twin in zip(unique, twins) if twin is None]
    held = {f.rel_name for f in stdlib.heldout}
    train, heldout, heldout_packages = [], [], []
    for f in kept:
        if f.rel_name in held:
            heldout.append(f)
        elif f.rel_name.startswith("pkg/") and is_heldout(f.rel_name, config.corpus.heldout_per_mille):
            heldout_packages.append(f)
        else:
            train.append(f)
    return Mixture(train=train, heldout=heldout, heldout_packages=heldout_packages, packages=manifest,
                   dropped_exact=len(ordered) - len(unique), dropped_near=len(unique) - len(kept))
