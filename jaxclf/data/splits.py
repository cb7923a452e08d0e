"""Deterministic stratified splits that never leak: records that share a content hash (exact
duplicates) always land in the same split, so a picture cannot be both trained on and tested."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def stratified_split(labels: np.ndarray, fractions: dict[str, float], seed: int,
                     groups: Sequence[str] | None = None) -> dict[str, np.ndarray]:
  """Returns split name -> sorted record indices.

  `fractions` are the shares of each split; the split named first takes the rounding remainder.
  Within each class, groups (e.g. the sha256 of each file) are shuffled with `seed` and dealt
  out by cumulative record count, so each class keeps the same proportions in every split and a
  group is never divided. A group's class is that of its first record.
  """
  labels = np.asarray(labels)
  names = list(fractions)
  if any(f < 0 for f in fractions.values()) or sum(fractions.values()) > 1 + 1e-9:
    raise ValueError(f"split fractions must be >= 0 and sum to <= 1: {fractions}")
  if groups is None:
    inverse = np.arange(len(labels))
    first = inverse
  else:
    _, first, inverse = np.unique(np.asarray(groups), return_index=True, return_inverse=True)
  n_groups = len(first)
  group_label = labels[first]
  group_size = np.bincount(inverse, minlength=n_groups)
  group_split = np.zeros(n_groups, np.int64)  # index into names
  rng = np.random.default_rng(seed)
  for c in np.unique(group_label):
    gids = np.flatnonzero(group_label == c)  # this class's groups, in sorted-group-key order
    group_split[gids] = deal_class(rng, group_size[gids], fractions)
  record_split = group_split[inverse]
  return {n: np.flatnonzero(record_split == i) for i, n in enumerate(names)}


def deal_class(rng: np.random.Generator, sizes: np.ndarray, fractions: dict[str, float]) -> np.ndarray:
  """One class's groups (record counts `sizes`, in sorted-group-key order) -> the index into
  list(fractions) of each group's split. Draws exactly one permutation from `rng`."""
  names = list(fractions)
  sizes = np.asarray(sizes, np.int64)
  perm = rng.permutation(len(sizes))
  dealt = sizes[perm]
  cum = np.cumsum(dealt)
  mid = cum - 0.5 * dealt  # where each group sits in this class's order
  edges = np.cumsum([fractions[n] * cum[-1] for n in names[1:]])
  # names[1:] take [0, e1), [e1, e2), ...; names[0] (train) takes what is left.
  which = np.searchsorted(edges, mid, side="right") + 1
  which[which == len(names)] = 0
  out = np.empty(len(sizes), np.int64)
  out[perm] = which
  return out


def deal_one_class(seed: int, label: int, groups_per_class: dict[int, int], sizes: np.ndarray,
                   fractions: dict[str, float]) -> np.ndarray:
  """`stratified_split`'s draw for one class alone, for a distributed split (the Beam ingest
  groups records by class and deals each class on its own worker): the generator is advanced
  past the permutations of every smaller label (only their group counts are needed), so the
  result is identical to dealing all classes in one process."""
  rng = np.random.default_rng(seed)
  for other in sorted(groups_per_class):
    if other >= label:
      break
    rng.permutation(int(groups_per_class[other]))
  return deal_class(rng, sizes, fractions)


def carve_validation(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Train/val from a dataset that already has its own test set (Fashion-MNIST)."""
  s = stratified_split(labels, {"train": 1 - val_fraction, "val": val_fraction}, seed)
  return s["train"], s["val"]
