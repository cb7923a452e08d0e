"""`jaxclf data ingest SRC --out DIR`: any image source -> versioned ArrayRecord shards.

SRC is a class-per-folder directory, an archive (.tar/.tar.gz/.zip, local, s3:// or https://),
a CSV/JSONL label manifest (uri,label[,split]; uris local, s3:// or https://), an
s3://bucket/prefix/ class-per-folder tree, `tfds:NAME` (a TFDS dataset already prepared in a
data_dir) or `fashion_mnist`.

Output (DIR): `{split}-NNNNN-of-MMMMM.array_record` shards holding the original encoded bytes
(laid out by jaxclf/data/layout.py), `manifest.json` (classes, per-split counts, skips,
duplicates, licence and provenance, `version` = content hash of (sha256, label, split)), the
per-record index (uri/sha256/size/format/shape/label) in `index/<shard>.parquet` (or inline in
manifest.json with --index json), and a dataset card README.md. `--runner=...` runs the same
stages as an Apache Beam pipeline instead (jaxclf/data/beam_ingest.py), with the same output.

Crash safety: work state lives in DIR/.partial/ (a journal of checked files, fetched remote
bytes by sha256, extracted archives, a journal of finished shards). Shards are written to a temp
name and renamed when complete; manifest.json is written last (temp + rename), so its presence
means the dataset is complete. Re-running after `kill -9` reuses the journals and produces a
byte-identical result: nothing in the output depends on time, order of completion or paths of
temporary files. A full disk stops the run with one line (the folder, the bytes still needed);
the half-written shard is removed and the finished ones are kept for the rerun.

The stages, one module each: ingest_sources.py (the source listed as candidates),
ingest_checks.py (resumable decode checks), ingest_shards.py (the shard layout and files),
ingest_manifest.py (index, card, manifest.json); this module runs them, or confirms that the
output is already this dataset.
"""
from __future__ import annotations

import json
import os

from jaxclf import diskspace
from jaxclf.data.ingest_checks import check_resumable
from jaxclf.data.ingest_manifest import build_manifest, write_atomic, write_manifest
# IngestOptions belongs to this module's API too: `ingest.ingest(src, ingest.IngestOptions(...))`.
from jaxclf.data.ingest_options import IngestOptions, log
from jaxclf.data.ingest_shards import (disk_full_is_data_error, remove_foreign_shards, shard_layout,
                                       unwritten_bytes, write_shards)
from jaxclf.data.ingest_sources import Resolved, resolve
from jaxclf.data.sources import archive, ingested, remote, tabular
from jaxclf.data.sources import plan as plan_lib
from jaxclf.data.types import DataError

PARTIAL = ".partial"


def local_out(src: str, opts: IngestOptions) -> str:
  """The output folder, refused when it is remote or inside the source folder."""
  out = os.path.abspath(os.path.expanduser(opts.out))
  if remote.is_remote(opts.out):
    raise DataError("--out must be a local folder; copy it to S3 afterwards (e.g. `aws s3 sync`)")
  if not remote.is_remote(src) and os.path.isdir(remote.local_path(src)):
    root = os.path.realpath(remote.local_path(src))
    if os.path.realpath(out) == root or os.path.realpath(out).startswith(root + os.sep):
      raise DataError(f"--out {opts.out!r} is inside the source folder {src!r}; its shards would "
                      "become a class on the next run. Choose a folder outside it.")
  return out


def create_opener(opts: IngestOptions) -> remote.Opener:
  return remote.Opener(remote.HttpFetcher(timeout=opts.http_timeout, retries=opts.http_retries,
                                          concurrency=opts.http_concurrency))


def existing_dataset(src: str, out: str, work: str, opts: IngestOptions,
                     opener: remote.Opener) -> dict | None:
  """The manifest already in `out` when it is this very dataset (same source, options and
  files: nothing to do); None when `out` holds none or --force; DataError when it differs."""
  if opts.force:
    return None
  if remote.is_remote(out):  # an object-store --out (the Beam ingest)
    if opener.read(out.rstrip("/") + "/" + ingested.MANIFEST)[0] is None:
      return None
  elif not os.path.exists(os.path.join(out, ingested.MANIFEST)):
    return None
  existing = ingested.read_manifest(out, opener)
  if (existing["provenance"]["source"] == src and
      existing["provenance"]["options"] == opts.provenance_options()):
    res = resolve(src, work, opts, opener)
    if _candidate_uris_match(existing, res, out):
      log(f"{out} is up to date (version {existing['version']})")
      archive.remove(work)
      return existing
  raise DataError(f"{out} already holds a different dataset (version {existing['version']}, "
                  f"from {existing['provenance']['source']}); pass --force to replace it or "
                  "choose another --out")


def _candidate_uris_match(manifest: dict, res: Resolved, out: str) -> bool:
  known = {r["uri"] for recs in ingested.read_records(out, manifest).values() for r in recs}
  known |= {s["path"] for s in manifest["report"]["skipped"]}
  return known == {c.uri for c in res.candidates} | {s["path"] for s in res.skipped}


def ingest(src: str, opts: IngestOptions) -> dict:
  """Runs (or resumes, or confirms) an ingest; returns the manifest."""
  out = local_out(src, opts)
  os.makedirs(out, exist_ok=True)
  work = os.path.join(out, PARTIAL)
  manifest_path = os.path.join(out, ingested.MANIFEST)
  opener = create_opener(opts)
  state_path = os.path.join(work, "state.json")
  state = {"source": src, "options": opts.provenance_options()}

  existing = existing_dataset(src, out, work, opts, opener)
  if existing is not None:
    return existing
  if opts.force or _stale_state(state_path, state):
    _clean(out)
  os.makedirs(work, exist_ok=True)
  write_atomic(state_path, json.dumps(state, sort_keys=True))

  res = resolve(src, work, opts, opener)
  if not res.candidates:
    raise DataError(f"{src}: no files to ingest")
  log(f"{len(res.candidates)} files from {src} ({res.kind})")
  keep_blobs = any(remote.is_remote(c.uri) for c in res.candidates)
  checked = check_resumable(res.candidates, work, opts, keep_blobs)
  plan = plan_lib.make_plan(res.candidates, source=src, channels=opts.channels,
                            max_pixels=opts.max_pixels, val_fraction=opts.val_fraction,
                            test_fraction=opts.test_fraction, seed=opts.seed,
                            class_names=res.class_names, checked=checked,
                            near_duplicates=opts.near_duplicates)
  layout = shard_layout(plan, opts.seed, opts.shard_mb)
  remove_foreign_shards(out, layout)
  needed = unwritten_bytes(layout, out)
  with disk_full_is_data_error(out, needed):
    diskspace.require(out, needed, "the dataset's shards, index and manifest",
                      "free space and rerun the same command (finished shards are kept)")
    shards = write_shards(layout, out, work, keep_blobs)
    manifest = write_manifest(out, build_manifest(src, res, plan, layout, shards, opts),
                              opts.index)
  archive.remove(work)
  log(f"done: {manifest['num_records']} records, version {manifest['version']}, "
       f"{manifest['report']['num_skipped']} skipped -> {out}")
  return manifest


def _stale_state(state_path: str, state: dict) -> bool:
  """A .partial/ from a run with another source or options must not be resumed."""
  if not os.path.exists(state_path):
    return os.path.exists(os.path.dirname(state_path))
  try:
    with open(state_path) as f:
      return json.load(f) != json.loads(json.dumps(state, sort_keys=True))
  except (OSError, json.JSONDecodeError):
    return True


def _clean(out: str) -> None:
  archive.remove(os.path.join(out, PARTIAL))
  archive.remove(os.path.join(out, ingested.INDEX_DIR))
  for name in os.listdir(out):
    if name.endswith((".array_record", ".array_record.tmp")) or name in (
        ingested.MANIFEST, "README.md"):
      os.unlink(os.path.join(out, name))


def describe(src: str, opts: IngestOptions | None = None, with_records: bool = False) -> dict:
  """A manifest-shaped description of a source without writing anything (for `data info` and
  `data diff` on raw folders, archives, CSVs): same checks, splits and version as an ingest.
  `with_records`: an ingested dataset's per-record index is read too (from either layout)."""
  import tempfile  # noqa: PLC0415

  def dataset(uri):
    m = ingested.read_manifest(uri)
    return {**m, "records": ingested.read_records(uri, m)} if with_records else m

  if not remote.is_remote(src) and os.path.isfile(os.path.join(remote.local_path(src),
                                                               ingested.MANIFEST)):
    return dataset(remote.local_path(src))
  if remote.scheme(src) in ("s3", "gs", "http", "https") and not (archive.is_archive(src) or
                                                                  tabular.is_manifest(src)):
    try:
      return dataset(src)
    except DataError:
      if remote.scheme(src) not in ("s3", "gs"):  # an object-store prefix may be a source tree
        raise
  opts = opts or IngestOptions(out="")
  opener = create_opener(opts)
  with tempfile.TemporaryDirectory(prefix="jaxclf-describe-") as work:
    res = resolve(src, work, opts, opener)
    plan = plan_lib.make_plan(res.candidates, source=src, channels=opts.channels,
                              max_pixels=opts.max_pixels, val_fraction=opts.val_fraction,
                              test_fraction=opts.test_fraction, seed=opts.seed,
                              class_names=res.class_names, workers=opts.workers or None)
    layout = shard_layout(plan, opts.seed, opts.shard_mb)
    return build_manifest(src, res, plan, layout, {s: [] for s in layout}, opts)
