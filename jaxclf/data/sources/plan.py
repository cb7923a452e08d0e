"""From a list of labelled candidate files to a checked, split, versioned plan.

Every source (class-per-folder, archive, CSV/JSONL manifest, S3, HTTP) lists `Candidate`s; this
module decode-checks them, turns failures into skips, assigns splits without leakage and
reports what it found. `image_folder.load` and `ingest` both build on it, so a folder loaded
directly and the same folder ingested get the same records, splits and version.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Sequence

import numpy as np

from jaxclf.data import decode
from jaxclf.data.types import DataError
from jaxclf.data.sources import scan
from jaxclf.data.splits import stratified_split

SPLITS = ("train", "val", "test")
# When given splits share a file, the copy in the later split is kept: the test set must stay
# unseen, and validation must not score pictures the model trained on.
KEEP_ORDER = {"test": 2, "val": 1, "train": 0}
MAX_NEAR_DUPLICATES_REPORTED = 1000


@dataclasses.dataclass
class Candidate:
  uri: str
  label_name: str
  read: Callable[[], tuple[bytes | None, str | None]]  # -> (bytes, None) | (None, why not)
  split: str | None = None  # a split the source gives (train/ val/ test/ folders, a CSV column)
  location: str | None = None  # where the bytes are, when not at `uri` (extracted archive members)


@dataclasses.dataclass
class Entry:
  candidate: Candidate
  label: int
  split: str
  checked: scan.Checked


@dataclasses.dataclass
class Plan:
  class_names: list[str]
  entries: list[Entry]  # loaded records, in candidate order
  skipped: list[dict]
  version: str
  report: dict

  def split_entries(self, split: str) -> list[Entry]:
    return [e for e in self.entries if e.split == split]


def split_fractions(val_fraction: float, test_fraction: float) -> dict[str, float]:
  if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
    raise DataError(f"data.val_fraction ({val_fraction}) and data.test_fraction ({test_fraction}) "
                    "must be in [0, 1) and sum to less than 1")
  return {"train": 1.0 - val_fraction - test_fraction, "val": val_fraction, "test": test_fraction}


def carve_fractions(fractions: dict[str, float], missing: Sequence[str]) -> dict[str, float]:
  """Shares for carving the splits a source lacks (val and/or test) out of its train split."""
  return {"train": 1.0 - sum(fractions[s] for s in missing), **{s: fractions[s] for s in missing}}


def dedupe_skip(uri: str, sha256: str, owner_uri: str, owner_split: str) -> dict:
  return {"path": uri, "stage": "dedupe",
          "reason": f"identical content (sha256 {sha256[:12]}) to {owner_uri} in the "
                    f"{owner_split} split; kept there so that split stays unseen"}


def _assign_given_splits(ok: list[tuple[Candidate, scan.Checked]], labels: np.ndarray,
                         fractions: dict[str, float], seed: int,
                         skipped: list[dict]) -> tuple[list[int], list[str]]:
  """Keeps the source's splits; drops training copies of files that also sit in val/test (as
  skips with stage 'dedupe'); carves a missing val (or test) split out of train."""
  owner: dict[str, tuple[int, Candidate]] = {}
  for i, (cand, chk) in enumerate(ok):
    prev = owner.get(chk.sha256)
    if prev is None or KEEP_ORDER[cand.split] > KEEP_ORDER[prev[1].split]:
      owner[chk.sha256] = (i, cand)
  keep, splits = [], []
  for i, (cand, chk) in enumerate(ok):
    oi, ocand = owner[chk.sha256]
    if ocand.split != cand.split:
      skipped.append(dedupe_skip(cand.uri, chk.sha256, ocand.uri, ocand.split))
      continue
    keep.append(i)
    splits.append(cand.split)
  given = set(splits)
  missing = [s for s in ("val", "test") if s not in given]
  if missing:
    train_pos = [k for k, s in enumerate(splits) if s == "train"]
    idx = np.asarray([keep[k] for k in train_pos], np.int64)
    carve = carve_fractions(fractions, missing)
    parts = stratified_split(labels[idx], carve, seed, groups=[ok[i][1].sha256 for i in idx])
    for name, rel in parts.items():
      for r in rel:
        splits[train_pos[r]] = name
  return keep, splits


def class_index(source: str, label_names: Sequence[str], given_splits: Sequence[str | None],
                class_names: Sequence[str] | None = None) -> tuple[list[str], dict[str, int]]:
  """Class order and the label checks every ingest runs before reading a byte."""
  names = list(class_names) if class_names is not None else sorted(set(label_names))
  index = {n: i for i, n in enumerate(names)}
  unknown = sorted(set(label_names) - set(index))
  if unknown:
    raise DataError(f"{source}: labels not among the classes {names}: {unknown[:10]}")
  if any(given_splits) and not all(given_splits):
    raise DataError(f"{source}: some records name a split and some do not; give a split for all "
                    "or none")
  bad = sorted({s for s in given_splits if s and s not in SPLITS})
  if bad:
    raise DataError(f"{source}: unknown split names {bad}; use {list(SPLITS)}")
  return names, index


def check_usable(source: str, names: Sequence[str], per_class_in, per_class_ok,
                 first_skip: dict[str, dict]) -> None:
  """Raises DataError (before any shard is written) when a class lost every file or fewer than
  2 classes have images. `first_skip`: class name -> its first skip record, for the message."""
  dead = [n for n in names if per_class_in[n] and not per_class_ok[n]]
  if dead:
    raise DataError(f"{source}: every file of class(es) {dead} was skipped as unreadable, e.g. "
                    + "; ".join(f"{n}: {first_skip[n]['path']}: {first_skip[n]['reason']}"
                                for n in dead if n in first_skip))
  present = [n for n in names if per_class_ok[n]]
  if len(present) < 2:
    raise DataError(f"{source}: need at least 2 classes with images, found {len(present)}: {present}")


def make_plan(candidates: Sequence[Candidate], *, source: str, channels: int = 3,
              max_pixels: int = decode.DEFAULT_MAX_PIXELS, val_fraction: float = 0.1,
              test_fraction: float = 0.1, seed: int = 0, class_names: Sequence[str] | None = None,
              workers: int | None = None, progress=None,
              checked: Sequence[scan.Checked] | None = None, near_duplicates: bool = True) -> Plan:
  """Check, split and version. Raises DataError (before any training compute) when a class ends
  up with no usable file or fewer than 2 classes remain."""
  fractions = split_fractions(float(val_fraction), float(test_fraction))
  names, index = class_index(source, [c.label_name for c in candidates],
                             [c.split for c in candidates], class_names)
  given = [c.split for c in candidates]

  if checked is None:  # ingest passes its own (journaled, resumable) checks
    checked = scan.check_files([(c.uri, c.read) for c in candidates], channels=channels,
                               max_pixels=max_pixels, workers=workers, progress=progress)
  if len(checked) != len(candidates):
    raise ValueError(f"{len(checked)} checks for {len(candidates)} candidates")
  skipped = [chk.skip for chk in checked if not chk.ok]
  ok = [(c, chk) for c, chk in zip(candidates, checked) if chk.ok]

  examples: dict[str, dict] = {}
  for c, chk in zip(candidates, checked):
    if not chk.ok and c.label_name not in examples:
      examples[c.label_name] = chk.skip
  check_usable(source, names, collections.Counter(c.label_name for c in candidates),
               collections.Counter(c.label_name for c, _ in ok), examples)

  labels = np.asarray([index[c.label_name] for c, _ in ok], np.int64)
  if any(given):
    keep, split_of = _assign_given_splits(ok, labels, fractions, seed, skipped)
    no_train = sorted({ok[i][0].label_name for i in keep} -
                      {ok[i][0].label_name for i, s in zip(keep, split_of) if s == "train"})
    if no_train:
      raise DataError(f"{source}: class(es) {no_train} have images in val/test but none in train")
  else:
    parts = stratified_split(labels, fractions, seed, groups=[chk.sha256 for _, chk in ok])
    split_of_all = np.empty(len(ok), object)
    for name, idx in parts.items():
      split_of_all[idx] = name
    keep, split_of = list(range(len(ok))), list(split_of_all)

  entries = [Entry(ok[i][0], int(labels[i]), s, ok[i][1]) for i, s in zip(keep, split_of)]
  version = scan.content_version(names, [(e.checked.sha256, e.label, e.split) for e in entries])
  report = build_report(source, names, entries, skipped, len(candidates), near_duplicates)
  return Plan(names, entries, skipped, version, report)


def build_report(source: str, names: Sequence[str], entries: Sequence[Entry], skipped: list[dict],
                 num_input: int, near_duplicates: bool = True,
                 near_summary: dict | None = None) -> dict:
  """Counts, formats, sizes, exact and near duplicates: what `data info` and run reports show.
  `near_duplicates=False` skips the dHash comparison (banded, but it compares every pair within
  a band bucket: minutes at millions of images); the report then says it was not checked.
  `near_summary`: {count, cross_split, pairs: the first (i, j, distance) over `entries`},
  already found (the Beam ingest's buckets), so millions of pairs never reach this process."""
  per_split = {s: collections.Counter(names[e.label] for e in entries if e.split == s) for s in SPLITS}
  per_class = collections.Counter(names[e.label] for e in entries)
  counts = [per_class[n] for n in names]
  by_sha: dict[str, list[Entry]] = collections.defaultdict(list)
  for e in entries:
    by_sha[e.checked.sha256].append(e)
  dup_groups = [g for g in by_sha.values() if len(g) > 1]
  conflicts = [{"sha256": g[0].checked.sha256, "paths": [e.candidate.uri for e in g],
                "labels": sorted({names[e.label] for e in g})}
               for g in dup_groups if len({e.label for e in g}) > 1]
  if near_summary is None:
    found = scan.find_near_duplicates([e.checked.dhash for e in entries]) if near_duplicates else []
    found = [(i, j, d) for i, j, d in found  # exact duplicates are reported above
             if entries[i].checked.sha256 != entries[j].checked.sha256]
    near_summary = {"count": len(found),
                    "cross_split": sum(entries[i].split != entries[j].split for i, j, _ in found),
                    "pairs": found[:MAX_NEAR_DUPLICATES_REPORTED]}
  near = [{"a": entries[i].candidate.uri, "b": entries[j].candidate.uri, "distance": d,
           "cross_split": entries[i].split != entries[j].split}
          for i, j, d in near_summary["pairs"]]
  sizes = np.asarray([e.checked.size for e in entries] or [0])
  widths = np.asarray([e.checked.width for e in entries] or [0])
  heights = np.asarray([e.checked.height for e in entries] or [0])
  return {
      "source": source,
      "num_input": num_input,
      "num_loaded": len(entries),
      "num_skipped": len(skipped),
      "skipped": skipped,
      "per_class": {n: per_class[n] for n in names},
      "per_split": {s: {n: per_split[s][n] for n in names} for s in SPLITS},
      "imbalance_ratio": (max(counts) / max(1, min(counts))) if counts else 0.0,
      "formats": dict(sorted(collections.Counter(e.checked.format for e in entries).items())),
      "modes": dict(sorted(collections.Counter(e.checked.mode for e in entries).items())),
      "bytes": {"total": int(sizes.sum()), "min": int(sizes.min()), "median": int(np.median(sizes)),
                "max": int(sizes.max())},
      "image_size": {"min_hw": [int(heights.min()), int(widths.min())],
                     "max_hw": [int(heights.max()), int(widths.max())],
                     "median_hw": [int(np.median(heights)), int(np.median(widths))]},
      "exact_duplicates": {"groups": len(dup_groups), "extra_copies": sum(len(g) - 1 for g in dup_groups),
                           "label_conflicts": conflicts},
      "near_duplicates": {"count": int(near_summary["count"]),
                          "cross_split": int(near_summary["cross_split"]),
                          "max_bits": scan.NEAR_DUPLICATE_BITS, "checked": bool(near_duplicates),
                          "pairs": near},
  }
