"""What an ingest writes last: the per-record index (index/<shard>.parquet, or inline), the dataset
card README.md, and manifest.json (classes, per-split counts, skips, duplicates, licence and
provenance; `version` = content hash of (sha256, label, split)). Each is written to a temp name and
renamed, manifest.json after the rest: its presence means the dataset is complete.
"""
from __future__ import annotations

import json
import os

import numpy as np

from jaxclf.data.ingest_sources import Resolved
from jaxclf.data.sources import archive, ingested
from jaxclf.data.sources import plan as plan_lib
from jaxclf.data.types import DataError


def build_manifest(src: str, res: Resolved, plan: plan_lib.Plan, layout, shards, opts) -> dict:
  splits, records = {}, {}
  for split in plan_lib.SPLITS:
    entries = [e for shard in layout[split] for e in shard]
    per_class = np.bincount([e.label for e in entries], minlength=len(plan.class_names))
    splits[split] = {"count": len(entries),
                     "per_class": dict(zip(plan.class_names, per_class.tolist())),
                     "shards": shards[split]}
    records[split] = [{"uri": e.candidate.uri, "sha256": e.checked.sha256, "size": e.checked.size,
                       "format": e.checked.format, "height": e.checked.height,
                       "width": e.checked.width, "label": e.label, "dhash": e.checked.dhash}
                      for e in entries]
  report = dict(plan.report)
  report["skipped"] = res.skipped + report["skipped"]
  report["num_skipped"] = len(report["skipped"])
  report["num_input"] = report["num_input"] + len(res.skipped)
  return {
      "format": ingested.FORMAT_NAME,
      "format_version": ingested.FORMAT_VERSION,
      "name": opts.name or _default_name(src),
      "version": plan.version,
      "classes": plan.class_names,
      "num_records": sum(s["count"] for s in splits.values()),
      "splits": splits,
      "license": res.license or opts.license,
      "description": opts.description,
      "provenance": {"source": src, "kind": res.kind, "options": opts.provenance_options(),
                     "given_splits": res.info.get("given_splits", []),
                     "software": _versions(), **({"source_sha256": res.info["sha256_idx"]}
                                                  if "sha256_idx" in res.info else {})},
      "record_format": ingested.RECORD_FORMAT,
      "report": report,
      "records": records,
  }


def _versions() -> dict:
  from importlib import metadata  # noqa: PLC0415
  out = {}
  for pkg in ("jaxclf", "pillow", "array-record"):
    try:
      out[pkg] = metadata.version(pkg)
    except metadata.PackageNotFoundError:
      out[pkg] = None
  return out


def _default_name(src: str) -> str:
  base = src.rstrip("/").split("/")[-1].split("#")[0]
  for suffix in sorted(archive.ARCHIVE_SUFFIXES + (".csv", ".tsv", ".jsonl", ".ndjson"),
                       key=len, reverse=True):
    if base.lower().endswith(suffix):
      return base[: -len(suffix)]
  return base.replace("tfds:", "")


def dataset_card(m: dict) -> str:
  r = m["report"]
  lines = [f"# {m['name']}", "",
           f"Dataset version `{m['version']}` ({m['num_records']} images, {len(m['classes'])} classes), "
           f"written by `jaxclf data ingest` from `{m['provenance']['source']}` "
           f"({m['provenance']['kind']}).", "",
           f"- **Licence:** {m['license']}",
           *( [f"- **Description:** {m['description']}"] if m.get("description") else []),
           f"- **Splits:** " + ", ".join(f"{s} {m['splits'][s]['count']}" for s in plan_lib.SPLITS)
           + (f" (given by the source: {', '.join(m['provenance']['given_splits'])})"
              if m["provenance"]["given_splits"] else
              f" (stratified, seed {m['provenance']['options']['seed']})"),
           f"- **Imbalance ratio** (largest / smallest class): {r['imbalance_ratio']:.2f}",
           f"- **Formats:** " + ", ".join(f"{k} {v}" for k, v in r["formats"].items()),
           f"- **Image size (h x w):** min {r['image_size']['min_hw']}, median "
           f"{r['image_size']['median_hw']}, max {r['image_size']['max_hw']}",
           f"- **Bytes:** {r['bytes']['total']:,} total, median {r['bytes']['median']:,} per image",
           f"- **Skipped:** {r['num_skipped']} of {r['num_input']} input files",
           f"- **Exact duplicates:** {r['exact_duplicates']['extra_copies']} extra copies in "
           f"{r['exact_duplicates']['groups']} groups (always in one split); label conflicts: "
           f"{len(r['exact_duplicates']['label_conflicts'])}",
           f"- **Near-duplicates** (dHash, <= {r['near_duplicates']['max_bits']} bits): "
           + (f"{r['near_duplicates']['count']} pairs, {r['near_duplicates']['cross_split']} across "
              "splits" if r["near_duplicates"].get("checked", True) else "not checked"),
           "", "## Classes", "", "| # | class | train | val | test |", "|---|---|---|---|---|"]
  for i, c in enumerate(m["classes"]):
    lines.append(f"| {i} | {c} | " + " | ".join(str(m["splits"][s]["per_class"][c])
                                                 for s in plan_lib.SPLITS) + " |")
  if r["skipped"]:
    lines += ["", "## Skipped files", "", "| file | stage | reason |", "|---|---|---|"]
    for s in r["skipped"][:50]:
      lines.append(f"| `{s['path']}` | {s['stage']} | {s['reason']} |")
    if len(r["skipped"]) > 50:
      lines.append(f"| ... | | {len(r['skipped']) - 50} more in manifest.json |")
  lines += ["", "## Use", "", "```python", f"config.data.source = \"<this folder or its s3:// URL>\"",
            "```", "", f"Records: {m['record_format']}.", ""]
  return "\n".join(lines)


def write_manifest(out: str, manifest: dict, index: str = "parquet") -> dict:
  """The record index (Parquet files, or inline with index='json': format_version 1), the card,
  then manifest.json last: its presence means the dataset is complete. -> what was written."""
  if index == "parquet":
    manifest = ingested.write_index(out, manifest)
  elif index != "json":
    raise DataError(f"--index {index!r}: choose parquet or json")
  else:
    manifest = {**manifest, "format_version": 1}
  write_atomic(os.path.join(out, "README.md"), dataset_card(manifest))
  write_atomic(os.path.join(out, ingested.MANIFEST),
                json.dumps(manifest, indent=1, sort_keys=True) + "\n")
  return manifest


def write_atomic(path: str, text: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
