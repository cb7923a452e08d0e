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
    gids = np.flatnonzero(group_label == c)
    gids = gids[rng.permutation(len(gids))]
    cum = np.cumsum(group_size[gids])
    mid = cum - 0.5 * group_size[gids]  # where each group sits in this class's order
    total = cum[-1]
    edges = np.cumsum([fractions[n] * total for n in names[1:]])
    # names[1:] take [0, e1), [e1, e2), ...; names[0] (train) takes what is left.
    which = np.searchsorted(edges, mid, side="right") + 1
    which[which == len(names)] = 0
    group_split[gids] = which
  record_split = group_split[inverse]
  return {n: np.flatnonzero(record_split == i) for i, n in enumerate(names)}


def carve_validation(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Train/val from a dataset that already has its own test set (Fashion-MNIST)."""
  s = stratified_split(labels, {"train": 1 - val_fraction, "val": val_fraction}, seed)
  return s["train"], s["val"]
