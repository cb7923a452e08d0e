"""`jaxclf data ingest | info | diff`: argparse wiring for jaxclf/cli.py (`add_data_commands`).

  jaxclf data ingest SRC --out DIR   # folder | archive | CSV/JSONL | s3://prefix/ | tfds:NAME | fashion_mnist
  jaxclf data info DIR_OR_SRC        # counts per class and split, imbalance, sizes, formats, skips
  jaxclf data diff A B               # what changed between two datasets (ingested or raw)
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys

from jaxclf.data.types import DataError
from jaxclf.data.sources.plan import SPLITS


def _add_plan_options(p: argparse.ArgumentParser) -> None:
  """How a raw source is checked and split (ingest; info/diff on a raw source)."""
  p.add_argument("--val-fraction", type=float, default=0.1)
  p.add_argument("--test-fraction", type=float, default=0.1)
  p.add_argument("--seed", type=int, default=0, help="split and shard-order seed")
  p.add_argument("--channels", type=int, default=3, choices=(1, 3),
                 help="decode-check channels (the shards keep the original bytes)")
  p.add_argument("--max-pixels", type=int, default=64_000_000, help="decompression-bomb limit")


def add_data_commands(subparsers) -> argparse.ArgumentParser:
  data = subparsers.add_parser("data", help="ingest, inspect and compare datasets")
  sub = data.add_subparsers(dest="data_command", required=True)

  ing = sub.add_parser("ingest", help="any image source -> versioned ArrayRecord shards + manifest",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ing.add_argument("source", help="folder | .tar/.tar.gz/.zip (path, s3://, https://) | .csv/.jsonl "
                                  "manifest | s3://bucket/prefix/ | tfds:NAME | fashion_mnist")
  ing.add_argument("--out", required=True,
                   help="output folder (local; with --runner also s3:// or gs://)")
  ing.add_argument("--name", default="", help="dataset name (default: from the source)")
  ing.add_argument("--license", default="unknown", help="licence of the images, for the card")
  ing.add_argument("--description", default="")
  _add_plan_options(ing)
  ing.add_argument("--shard-mb", type=float, default=64.0)
  ing.add_argument("--workers", type=int, default=0, help="decode-check threads (0 = auto)")
  ing.add_argument("--http-timeout", type=float, default=30.0)
  ing.add_argument("--http-retries", type=int, default=3)
  ing.add_argument("--http-concurrency", type=int, default=8)
  ing.add_argument("--tfds-data-dir", default="")
  ing.add_argument("--force", action="store_true", help="replace a different dataset in --out")
  ing.add_argument("--index", default="parquet", choices=("parquet", "json"),
                   help="per-record index: Parquet files next to the shards (format_version 2), "
                        "or inline in manifest.json (format_version 1, for older readers)")
  ing.add_argument("--no-near-duplicates", dest="near_duplicates", action="store_false",
                   help="skip the dHash near-duplicate report (minutes at millions of images)")
  ing.add_argument("--runner", default="", choices=BEAM_RUNNERS, metavar="RUNNER",
                   help=f"{'|'.join(BEAM_RUNNERS)}: run as an Apache Beam pipeline on this "
                        "runner (in .venv-beam; set it up "
                        "with `bash scripts/setup_beam_env.sh`). Other --options go to Beam, e.g. "
                        "--direct_num_workers=2 --direct_running_mode=multi_processing, or "
                        "--project/--region/--temp_location for dataflow. Default: the local path")
  ing.set_defaults(func=run_ingest, accepts_pipeline_args=True)

  info = sub.add_parser("info", help="counts per class/split, imbalance, sizes, formats, skips")
  info.add_argument("dataset", help="an ingested dataset (folder or URL) or any ingest source")
  info.add_argument("--json", action="store_true", help="print the full report as JSON")
  info.add_argument("--show-skipped", type=int, default=20, help="how many skipped files to list")
  _add_plan_options(info)
  info.set_defaults(func=run_info)

  diff = sub.add_parser("diff", help="compare two datasets: classes, counts, records, labels")
  diff.add_argument("a")
  diff.add_argument("b")
  diff.add_argument("--json", action="store_true")
  diff.add_argument("--show", type=int, default=10, help="examples to list per kind of change")
  _add_plan_options(diff)
  diff.set_defaults(func=run_diff)
  return data


def _options(args):
  from jaxclf.data.ingest_options import IngestOptions  # noqa: PLC0415
  return IngestOptions(
      out=getattr(args, "out", ""), name=getattr(args, "name", ""),
      license=getattr(args, "license", "unknown"), description=getattr(args, "description", ""),
      channels=getattr(args, "channels", 3), max_pixels=getattr(args, "max_pixels", 64_000_000),
      val_fraction=getattr(args, "val_fraction", 0.1), test_fraction=getattr(args, "test_fraction", 0.1),
      seed=getattr(args, "seed", 0), shard_mb=getattr(args, "shard_mb", 64.0),
      workers=getattr(args, "workers", 0), http_timeout=getattr(args, "http_timeout", 30.0),
      http_retries=getattr(args, "http_retries", 3),
      http_concurrency=getattr(args, "http_concurrency", 8),
      tfds_data_dir=getattr(args, "tfds_data_dir", ""), force=getattr(args, "force", False),
      index=getattr(args, "index", "parquet"),
      near_duplicates=getattr(args, "near_duplicates", True))


BEAM_RUNNERS = ("direct", "dataflow", "flink", "spark", "portable")
BEAM_SETUP = "bash scripts/setup_beam_env.sh"


def beam_python() -> str | None:
  """The interpreter of .venv-beam (or $JAXCLF_BEAM_PYTHON), if it exists."""
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  py = os.environ.get("JAXCLF_BEAM_PYTHON") or os.path.join(repo, ".venv-beam", "bin", "python")
  return py if os.access(py, os.X_OK) else None


def _ingest_argv(args) -> list[str]:
  """This ingest as `jaxclf.data.data_cli` arguments, to re-run it in .venv-beam."""
  argv = ["data", "ingest", args.source, "--out", args.out, "--runner", args.runner]
  # Every ingest option (tests/test_options.py re-parses this list against the parser).
  for flag in ("name", "license", "description", "val_fraction", "test_fraction", "seed",
               "channels", "max_pixels", "shard_mb", "workers", "http_timeout", "http_retries",
               "http_concurrency", "tfds_data_dir", "index"):
    argv += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
  return (argv + (["--force"] if args.force else []) +
          ([] if args.near_duplicates else ["--no-near-duplicates"]) +
          list(getattr(args, "pipeline_args", [])))


def _run_beam(args) -> int:
  import importlib.util  # noqa: PLC0415
  if importlib.util.find_spec("apache_beam") is None:  # Beam lives in .venv-beam only
    py = beam_python()
    if py is None:
      raise DataError(f"--runner={args.runner} needs Apache Beam, which lives in its own "
                      f"environment: run `{BEAM_SETUP}` (creates .venv-beam), then this command "
                      "again")
    return subprocess.call([py, "-m", "jaxclf.data.data_cli", *_ingest_argv(args)])
  from jaxclf.data import beam_ingest  # noqa: PLC0415
  return _print_ingest(args, beam_ingest.ingest(args.source, _options(args), args.runner,
                                                list(getattr(args, "pipeline_args", []))))


def run_ingest(args) -> int:
  if args.runner:
    return _run_beam(args)
  if getattr(args, "pipeline_args", None):
    raise DataError(f"unrecognized arguments: {' '.join(args.pipeline_args)} (pipeline options "
                    "need --runner)")
  from jaxclf.data import ingest  # noqa: PLC0415
  return _print_ingest(args, ingest.ingest(args.source, _options(args)))


def _print_ingest(args, m: dict) -> int:
  """The summary as one JSON line on stdout (for scripts); every skip, on stderr, for the person."""
  print(json.dumps({"out": args.out, "version": m["version"], "records": m["num_records"],
                    "splits": {s: m["splits"][s]["count"] for s in SPLITS},
                    "skipped": m["report"]["num_skipped"]}))
  skipped = m["report"]["skipped"]
  if skipped:
    where = os.path.join(args.out, "manifest.json")
    print(f"[ingest] skipped {len(skipped)} file(s):", file=sys.stderr)
    lines = format_skipped(skipped, SKIPPED_SHOWN, f"all are in {where} under report.skipped, "
                                                   f"and `jaxclf data info {args.out}` lists them")
    print("\n".join(lines), file=sys.stderr, flush=True)
  from jaxclf.data.dataset import small_split_warnings  # noqa: PLC0415
  fix = ("The source's own val/ and test/ folders set them: add images there."
         if m["provenance"].get("given_splits") else
         "Ingest again with a larger --val-fraction / --test-fraction (and --force), or add "
         "images.")
  for warning in small_split_warnings({s: m["splits"][s]["count"] for s in SPLITS}, fix):
    print(f"[ingest] warning: {warning}", file=sys.stderr, flush=True)
  return 0


SKIPPED_SHOWN = 20  # a screenful; the manifest keeps every one


def format_skipped(skipped: list[dict], limit: int, rest: str) -> list[str]:
  """One line per skipped file (path, [stage], reason), the first `limit`; then how many more
  there are and `rest`, where to find them."""
  lines = [f"  {x['path']}  [{x['stage']}] {x['reason']}" for x in skipped[:limit]]
  if len(skipped) > limit:
    lines.append(f"  ... {len(skipped) - limit} more: {rest}")
  return lines


def summarize(m: dict) -> dict:
  r = m["report"]
  return {"name": m["name"], "version": m["version"], "source": m["provenance"]["source"],
          "classes": m["classes"], "records": m["num_records"],
          "splits": {s: {"count": m["splits"][s]["count"], "per_class": m["splits"][s]["per_class"],
                         "shards": len(m["splits"][s]["shards"])} for s in SPLITS},
          "imbalance_ratio": r["imbalance_ratio"], "formats": r["formats"], "modes": r["modes"],
          "bytes": r["bytes"], "image_size": r["image_size"], "skipped": r["skipped"],
          "exact_duplicates": r["exact_duplicates"], "near_duplicates": r["near_duplicates"],
          "license": m.get("license")}


def format_info(s: dict, show_skipped: int = 20) -> str:
  width = max([len(c) for c in s["classes"]] + [5])
  lines = [f"{s['name']}  version {s['version']}  {s['records']} images, {len(s['classes'])} classes",
           f"source: {s['source']}   licence: {s['license']}", "",
           f"{'class':<{width}}  {'train':>7} {'val':>7} {'test':>7} {'total':>7}"]
  for c in s["classes"]:
    n = [s["splits"][sp]["per_class"][c] for sp in SPLITS]
    lines.append(f"{c:<{width}}  {n[0]:>7} {n[1]:>7} {n[2]:>7} {sum(n):>7}")
  tot = [s["splits"][sp]["count"] for sp in SPLITS]
  lines += [f"{'all':<{width}}  {tot[0]:>7} {tot[1]:>7} {tot[2]:>7} {sum(tot):>7}", "",
            f"imbalance ratio (largest/smallest class): {s['imbalance_ratio']:.2f}",
            f"formats: {', '.join(f'{k} {v}' for k, v in s['formats'].items())}   "
            f"modes: {', '.join(f'{k} {v}' for k, v in s['modes'].items())}",
            f"image size h x w: min {s['image_size']['min_hw']}  median {s['image_size']['median_hw']}  "
            f"max {s['image_size']['max_hw']}",
            f"bytes: total {s['bytes']['total']:,}  median {s['bytes']['median']:,}  max {s['bytes']['max']:,}",
            f"exact duplicates: {s['exact_duplicates']['extra_copies']} extra copies in "
            f"{s['exact_duplicates']['groups']} groups; label conflicts "
            f"{len(s['exact_duplicates']['label_conflicts'])}",
            f"near-duplicates (dHash <= {s['near_duplicates']['max_bits']} bits): "
            + (f"{s['near_duplicates']['count']} pairs, {s['near_duplicates']['cross_split']} "
               "across splits" if s["near_duplicates"].get("checked", True) else "not checked"),
            f"skipped: {len(s['skipped'])}"]
  by_stage = collections.Counter(x["stage"] for x in s["skipped"])
  if by_stage:
    lines[-1] += "  (" + ", ".join(f"{k} {v}" for k, v in sorted(by_stage.items())) + ")"
  lines += format_skipped(s["skipped"], show_skipped, "--json for all")
  return "\n".join(lines)


def run_info(args) -> int:
  from jaxclf.data import ingest  # noqa: PLC0415
  s = summarize(ingest.describe(args.dataset, _options(args)))
  print(json.dumps(s, indent=1) if args.json else format_info(s, args.show_skipped))
  return 0


def diff_manifests(a: dict, b: dict, show: int = 10) -> dict:
  """Classes, per-split counts and records (by sha256) that differ between two datasets."""
  def index(m):
    out = {}
    for split, recs in m["records"].items():
      for r in recs:
        out.setdefault(r["sha256"], (m["classes"][r["label"]], split, r["uri"]))
    return out
  ia, ib = index(a), index(b)
  added = [ib[k][2] for k in ib.keys() - ia.keys()]
  removed = [ia[k][2] for k in ia.keys() - ib.keys()]
  common = ia.keys() & ib.keys()
  relabelled = sorted(f"{ib[k][2]}: {ia[k][0]} -> {ib[k][0]}" for k in common if ia[k][0] != ib[k][0])
  moved = sorted(f"{ib[k][2]}: {ia[k][1]} -> {ib[k][1]}" for k in common if ia[k][1] != ib[k][1])
  counts = {s: {"a": a["splits"][s]["count"], "b": b["splits"][s]["count"]} for s in SPLITS}
  return {
      "a": {"version": a["version"], "source": a["provenance"]["source"]},
      "b": {"version": b["version"], "source": b["provenance"]["source"]},
      "same_version": a["version"] == b["version"],
      "classes_added": [c for c in b["classes"] if c not in a["classes"]],
      "classes_removed": [c for c in a["classes"] if c not in b["classes"]],
      "split_counts": counts,
      "records_added": len(added), "records_removed": len(removed),
      "relabelled": len(relabelled), "moved_split": len(moved),
      "examples": {"added": sorted(added)[:show], "removed": sorted(removed)[:show],
                   "relabelled": relabelled[:show], "moved_split": moved[:show]},
  }


def format_diff(d: dict) -> str:
  lines = [f"A {d['a']['version']}  {d['a']['source']}", f"B {d['b']['version']}  {d['b']['source']}"]
  if d["same_version"]:
    lines.append("identical: same records, labels and splits")
    return "\n".join(lines)
  if d["classes_added"] or d["classes_removed"]:
    lines.append(f"classes: +{d['classes_added']} -{d['classes_removed']}")
  lines.append("counts: " + ", ".join(f"{s} {c['a']} -> {c['b']}" for s, c in d["split_counts"].items()))
  lines.append(f"records: +{d['records_added']} added, -{d['records_removed']} removed, "
               f"{d['relabelled']} relabelled, {d['moved_split']} moved between splits")
  for kind, ex in d["examples"].items():
    for e in ex:
      lines.append(f"  {kind}: {e}")
  return "\n".join(lines)


def run_diff(args) -> int:
  from jaxclf.data import ingest  # noqa: PLC0415
  opts = _options(args)
  d = diff_manifests(ingest.describe(args.a, opts, with_records=True),
                     ingest.describe(args.b, opts, with_records=True), args.show)
  print(json.dumps(d, indent=1) if args.json else format_diff(d))
  return 0


def parse(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
  """parse_args, except that `data ingest` passes options it does not know to Beam."""
  args, extra = parser.parse_known_args(argv)
  if extra and not getattr(args, "accepts_pipeline_args", False):
    parser.error(f"unrecognized arguments: {' '.join(extra)}")
  args.pipeline_args = extra
  return args


def main(argv=None) -> int:
  """Standalone entry (`python -m jaxclf.data.data_cli ...`) until jaxclf/cli.py wires it in."""
  parser = argparse.ArgumentParser(prog="jaxclf")
  add_data_commands(parser.add_subparsers(dest="command", required=True))
  args = parse(parser, argv)
  try:
    return args.func(args)
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
