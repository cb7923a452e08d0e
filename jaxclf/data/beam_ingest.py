"""`jaxclf data ingest SRC --out DIR --runner=direct|dataflow|flink|spark|portable`: the ingest
as an Apache Beam pipeline, writing the same shards and the same manifest as the local path.

Runs in its own environment (.venv-beam, `bash scripts/setup_beam_env.sh`: apache-beam pins
protobuf<7 and pyarrow<26, which the training lock cannot take) and imports only the jax-free
`jaxclf.data` modules. The stages, each the local path's own code:

  driver   list the source (ingest_sources.resolve: folder, archive, CSV/JSONL manifest,
           s3:// prefix) into candidate files, with the same label and split checks
           (plan.class_index)
  Beam     read + decode-check every file (scan.check_bytes, i.e. decode.py): failures are skip
           records {path, stage, reason}, never exceptions
           sha256 groups: CombinePerKey on the hash (exact duplicates: one group, one split)
           the stratified split: GroupByKey on each group's class, then splits.deal_one_class,
           the same seeded draw as splits.stratified_split; given splits keep their owner copy
           usable-classes check (plan.check_usable) as a side input of the shard writer, so a
           source with no valid image fails before any shard is written
           ArrayRecord shards by layout.py (hash of seed, split, sha256, uri), to temp names
  driver   manifest + card from the records' metadata (ingest_manifest.build_manifest,
           plan.build_report), then commit: shards moved into place, the Parquet index,
           manifest.json last

Temp files live in OUT/.partial-beam/ (store.Store: a local folder, s3:// or gs://), where the
workers of a cluster reach them when OUT is an object store. A rerun after a kill starts the
pipeline again from scratch and gives the same files (nothing depends on time or on the order in
which workers finish).
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import re
import typing
import uuid
import zlib

# Beam's GCP module logs "apitools not found..." on import when the GCP extras are absent (they
# are not needed here); keep that line out of every ingest's output.
logging.getLogger().addFilter(lambda record: "apitools not found" not in record.getMessage())

import apache_beam as beam  # noqa: E402
import numpy as np  # noqa: E402
from apache_beam.options.pipeline_options import PipelineOptions  # noqa: E402

from jaxclf.data import ingest as ingest_lib  # noqa: E402
from jaxclf.data import ingest_manifest, ingest_shards, ingest_sources  # noqa: E402
from jaxclf.data.ingest_options import IngestOptions, log  # noqa: E402
from jaxclf.data import layout, splits  # noqa: E402
from jaxclf.data.types import DataError  # noqa: E402
from jaxclf.data.sources import archive, ingested, remote, scan  # noqa: E402
from jaxclf.data.sources import plan as plan_lib  # noqa: E402
from jaxclf.data.store import Store  # noqa: E402

WORK = ".partial-beam"
RUNNERS = {"direct": "DirectRunner", "dataflow": "DataflowRunner", "flink": "FlinkRunner",
           "spark": "SparkRunner", "portable": "PortableRunner"}
# A DataError raised inside a worker reaches the driver as text inside the runner's own
# exception; these markers let the driver re-raise it as the one clear line it was.
_MARK = "<<jaxclf-data-error>>"
_CHECK_FIELDS = [f.name for f in dataclasses.fields(scan.Checked) if f.name not in ("uri", "skip")]


@dataclasses.dataclass(frozen=True)
class Settings:
  """What the workers need (picklable)."""
  source: str
  seed: int
  fractions: tuple  # ((split, share), ...) in split_fractions order
  given: bool
  channels: int
  max_pixels: int
  shard_mb: float
  http: tuple  # (timeout, retries, concurrency)
  class_names: tuple
  per_class_in: tuple  # candidates per class index
  near_duplicates: bool = True


def _create_opener(s: Settings) -> remote.Opener:
  timeout, retries, concurrency = s.http
  return remote.Opener(remote.HttpFetcher(timeout=timeout, retries=retries, concurrency=concurrency))


def _fail(message: str):
  raise DataError(f"{_MARK}{message}{_MARK}")


# --------------------------------------------------------------------------- the stages

class _FetchCheck(beam.DoFn):
  """candidate row -> (sha256, metadata) or a tagged skip row; never raises for bad data.

  The bytes are not carried on: the shard writer reads each file again (and checks its sha256),
  as the local path does for local files. Shuffles then move metadata only (a few hundred bytes a
  record) instead of the images, and the DirectRunner's in-memory buffers stay small."""

  def __init__(self, s: Settings):
    self.s = s

  def setup(self):
    self.opener = _create_opener(self.s)

  def process(self, row):
    data, err = self.opener.read(row["loc"])
    chk = scan.check_bytes(data, row["uri"], channels=self.s.channels, max_pixels=self.s.max_pixels,
                           read_error=err)
    if not chk.ok:
      yield beam.pvalue.TaggedOutput("skip", {"t": "skip", "order": 0, "i": row["i"],
                                              "label": row["label"], "skip": chk.skip})
      return
    meta = {"i": row["i"], "uri": row["uri"], "loc": row["loc"], "label": row["label"],
            "given": row["split"], **{k: getattr(chk, k) for k in _CHECK_FIELDS}}
    yield chk.sha256, meta


class _GroupInfo(beam.CombineFn):
  """Per sha256 and given split: [copies, smallest candidate index, its label, its uri]."""

  def create_accumulator(self):
    return {}

  def add_input(self, acc, m):
    return self.merge_accumulators([acc, {m["given"] or "": [1, m["i"], m["label"], m["uri"]]}])

  def merge_accumulators(self, accs):
    out: dict = {}
    for acc in accs:
      for split, (n, i, label, uri) in acc.items():
        cur = out.get(split)
        if cur is None:
          out[split] = [n, i, label, uri]
        else:
          cur[0] += n
          if i < cur[1]:
            cur[1:] = [i, label, uri]
    return out

  def extract_output(self, acc):
    return acc


def _owner(kv):
  """(sha, group info) -> (sha, owner): the copy that keeps the group's split. With given
  splits: the first copy in the latest split (test > val > train), as plan._assign_given_splits."""
  sha, info = kv
  split = max(info, key=lambda s: plan_lib.KEEP_ORDER.get(s, -1))
  n, _, label, uri = info[split]
  return sha, {"split": split or None, "uri": uri, "label": label, "copies": n}


def _to_deal(kv):
  """Groups whose split is drawn: all of them without given splits, else those owned by train
  (val/test are carved out of train when the source lacks them)."""
  sha, owner = kv
  if owner["split"] in (None, "train"):
    yield owner["label"], (sha, owner["copies"])


def _fractions(s: Settings, owner_splits) -> dict[str, float]:
  fractions = dict(s.fractions)
  if not s.given:
    return fractions
  missing = [x for x in ("val", "test") if x not in set(owner_splits)]
  return plan_lib.carve_fractions(fractions, missing) if missing else {"train": 1.0}


def _deal(kv, s: Settings, groups_per_class, owner_splits):
  """One class's groups -> (sha, split): splits.stratified_split's draw, class by class."""
  label, groups = kv
  groups = sorted(groups)  # the group order np.unique gives: by sha256
  fractions = _fractions(s, owner_splits)
  names = list(fractions)
  which = splits.deal_one_class(s.seed, label, groups_per_class,
                                np.asarray([n for _, n in groups], np.int64), fractions)
  for (sha, _), w in zip(groups, which):
    yield sha, names[int(w)]


def _apply_split(kv):
  """(sha, {rec: [(meta, bytes)], owner: [..], dealt: [split]}) -> kept records, or dedupe
  skips for copies in another given split than the group's owner."""
  sha, g = kv
  owner = g["owner"][0]
  dealt = g["dealt"][0] if g["dealt"] else owner["split"]
  for meta in g["rec"]:
    if owner["split"] is not None and meta["given"] != owner["split"]:
      yield beam.pvalue.TaggedOutput("skip", {
          "t": "skip", "order": 1, "i": meta["i"], "label": meta["label"],
          "skip": plan_lib.dedupe_skip(meta["uri"], sha, owner["uri"], owner["split"])})
      continue
    yield {**meta, "split": dealt}


def _check_usable(_, s: Settings, ok_per_class, first_skip):
  names = list(s.class_names)
  try:
    plan_lib.check_usable(s.source, names, dict(zip(names, s.per_class_in)),
                          collections.Counter({names[k]: v for k, v in ok_per_class.items()}),
                          {names[k]: v["skip"] for k, v in first_skip.items()})
  except DataError as e:
    _fail(str(e))
  return True


def _slot(meta, s: Settings, totals):
  count, size = totals[meta["split"]]
  key = layout.record_key(s.seed, meta["split"], meta["sha256"], meta["uri"])
  n = layout.num_shards(count, size, s.shard_mb)
  return (meta["split"], layout.slot_of(key, n)), (key, meta)


class _WriteShard(beam.DoFn):
  """(split, slot) -> one ArrayRecord shard in the store's temp folder, records sorted by key."""

  def __init__(self, store: Store, s: Settings):
    self.store, self.s = store, s

  def setup(self):
    self.opener = _create_opener(self.s)

  def _read(self, meta: dict) -> bytes:
    """The file's bytes again, as checked (ingest_shards._entry_bytes does the same)."""
    data, err = self.opener.read(meta["loc"])
    if data is None:
      _fail(f"{meta['uri']}: readable when checked, now fails ({err}); re-run ingest")
    if hashlib.sha256(data).hexdigest() != meta["sha256"]:
      _fail(f"{meta['uri']}: changed while ingesting (sha256 differs from the check); re-run "
            "ingest once the source is stable")
    return data

  def process(self, kv, used_slots, usable):
    del usable  # a side input only so that plan.check_usable has passed before any shard
    import tempfile  # noqa: PLC0415
    (split, slot), items = kv
    items = sorted(items, key=lambda t: t[0])
    name = layout.shard_names(split, [sl for sp, sl in used_slots if sp == split])[slot]
    records = (ingested.encode_record(self._read(meta), meta["label"], meta["sha256"],
                                      meta["uri"], meta["format"]) for _, meta in items)
    rel = f"{WORK}/shards/{name}"
    direct = self.store.local_path(rel)
    # A unique temp suffix: a retried or speculative copy of this bundle never shares a file.
    suffix = f".tmp-{uuid.uuid4().hex}"
    if direct is not None:
      row = ingest_shards.write_shard_file(direct, records, tmp_suffix=suffix)
    else:  # ArrayRecord writes local files: write one, then upload it
      with tempfile.TemporaryDirectory(prefix="jaxclf-shard-") as tmp:
        row = ingest_shards.write_shard_file(os.path.join(tmp, name), records, tmp_suffix=suffix)
        self.store.put(os.path.join(tmp, name), rel)
    yield {"t": "shard", "split": split, **row}
    for key, meta in items:
      yield {"t": "rec", "file": name, "key": key, **meta}


class _WriteRows(beam.DoFn):
  """One bucket of output rows -> WORK/rows/part-NNNNN.jsonl (sorted: reruns write the same)."""

  def __init__(self, store: Store):
    self.store = store

  def process(self, kv):
    bucket, lines = kv
    self.store.write_text(f"{WORK}/rows/part-{bucket:05d}.jsonl",
                          "".join(line + "\n" for line in sorted(lines)))
    yield bucket


def _row_bucket(row: dict, buckets: int) -> tuple[int, str]:
  ident = f"{row['t']}:{row.get('i', '')}:{row.get('j', '')}:{row.get('file', '')}"
  return zlib.crc32(ident.encode()) % buckets, json.dumps(row, sort_keys=True)


def _read_part(rel: str, store: Store):
  for line in store.read_text(rel).splitlines():
    if line.strip():
      yield json.loads(line)


def _band_keys(meta):
  """A record's (band, band value) buckets for the near-duplicate search (scan.band_masks)."""
  if meta["dhash"]:  # hex, not int: Beam's int coder is signed 64-bit
    v = int(meta["dhash"], 16)
    for b, mask in enumerate(scan.band_masks()):
      yield (b, f"{v & mask:x}"), (meta["i"], meta["dhash"], meta["split"], meta["sha256"])


def _near_pairs(kv):
  """One band bucket -> (i, j, distance, across splits) of near, not exact, duplicates."""
  members = sorted(kv[1])
  info = {i: (split, sha) for i, _, split, sha in members}
  for i, j, d in scan.bucket_pairs([(i, int(h, 16)) for i, h, _, _ in members]):
    if info[i][1] != info[j][1]:  # exact duplicates are reported apart, as in build_report
      yield i, j, d, info[i][0] != info[j][0]


def _near_summary(_, count, cross, first):
  return {"t": "near", "count": count, "cross_split": cross, "pairs": [list(p) for p in first]}


def near_duplicates(kept, p):
  """The near-duplicate report as one row: count, pairs across splits, the first pairs (by
  candidate order). Buckets are a GroupByKey on (band, value); pairs found in several bands
  are counted once (Distinct). Only the summary reaches the driver, however many pairs."""
  pairs = (kept | "NearDupBands" >> beam.FlatMap(_band_keys)
           | "NearDupBuckets" >> beam.GroupByKey() | beam.FlatMap(_near_pairs)
           | "NearDupPairs" >> beam.Distinct())
  count = beam.pvalue.AsSingleton(pairs | "NearCount" >> beam.combiners.Count.Globally())
  cross = beam.pvalue.AsSingleton(pairs | beam.Map(lambda q: int(q[3]))
                                  | "NearCross" >> beam.CombineGlobally(sum))
  # The output type is given: Beam infers q[:3] as the 4-tuple it came from and mis-codes it.
  first = beam.pvalue.AsSingleton(
      pairs | beam.Map(lambda q: (q[0], q[1], q[2])).with_output_types(typing.Tuple[int, int, int])
      | "NearFirst" >> beam.combiners.Top.Smallest(plan_lib.MAX_NEAR_DUPLICATES_REPORTED))
  return (p | "NearOnce" >> beam.Create([None])
          | "NearSummary" >> beam.Map(_near_summary, count, cross, first))


def _sum_pairs(pairs):
  return tuple(int(sum(x)) for x in zip(*pairs)) if pairs else (0, 0)


def _first_skip(rows):
  return min(rows, key=lambda r: r["i"]) if rows else None


def build(p: beam.Pipeline, store: Store, parts: list[str], row_buckets: int, s: Settings):
  rows = (p | "CandidateFiles" >> beam.Create(parts)
          | "ReadCandidates" >> beam.FlatMap(_read_part, store) | beam.Reshuffle())
  checked = rows | "FetchDecodeCheck" >> beam.ParDo(_FetchCheck(s)).with_outputs("skip", main="ok")
  ok, read_skips = checked.ok, checked.skip

  owners = (ok | "GroupBySha256" >> beam.CombinePerKey(_GroupInfo()) | beam.Map(_owner))
  owner_splits = beam.pvalue.AsList(
      owners | beam.Map(lambda kv: kv[1]["split"] or "") | "OwnerSplits" >> beam.Distinct())
  to_deal = owners | beam.FlatMap(_to_deal)
  groups_per_class = beam.pvalue.AsDict(to_deal | beam.Map(lambda kv: (kv[0], 1))
                                        | "GroupsPerClass" >> beam.CombinePerKey(sum))
  dealt = (to_deal | "GroupByClass" >> beam.GroupByKey()
           | "StratifiedSplit" >> beam.FlatMap(_deal, s, groups_per_class, owner_splits))
  joined = ({"rec": ok, "owner": owners, "dealt": dealt} | "JoinSplit" >> beam.CoGroupByKey()
            | beam.FlatMap(_apply_split).with_outputs("skip", main="kept"))
  kept, dedupe_skips = joined.kept, joined.skip

  ok_per_class = beam.pvalue.AsDict(ok | beam.MapTuple(lambda sha, meta: (meta["label"], 1))
                                    | "OkPerClass" >> beam.CombinePerKey(sum))
  first_skip = beam.pvalue.AsDict(read_skips | beam.Map(lambda r: (r["label"], r))
                                  | "FirstSkip" >> beam.CombinePerKey(_first_skip))
  usable = beam.pvalue.AsSingleton(p | "Once" >> beam.Create([None])
                                   | "UsableClasses" >> beam.Map(_check_usable, s, ok_per_class,
                                                                  first_skip))
  totals = beam.pvalue.AsDict(kept | beam.Map(lambda r: (r["split"], (1, r["size"])))
                              | "SplitTotals" >> beam.CombinePerKey(_sum_pairs))
  slotted = kept | "AssignShard" >> beam.Map(_slot, s, totals)
  used = beam.pvalue.AsList(slotted | beam.Keys() | "UsedShards" >> beam.Distinct())
  written = (slotted | "GroupByShard" >> beam.GroupByKey()
             | "WriteShards" >> beam.ParDo(_WriteShard(store, s), used, usable))
  outputs = [written, read_skips, dedupe_skips]
  if s.near_duplicates:
    outputs.append(near_duplicates(kept, p))
  _ = (tuple(outputs) | beam.Flatten()
       | beam.Map(_row_bucket, row_buckets) | "GroupRows" >> beam.GroupByKey()
       | "WriteRows" >> beam.ParDo(_WriteRows(store)))


# ------------------------------------------------------------------------------- driver

def _candidate_rows(res: ingest_sources.Resolved, index: dict[str, int]):
  for i, c in enumerate(res.candidates):
    yield {"i": i, "uri": c.uri, "loc": c.location or c.uri, "label": index[c.label_name],
           "split": c.split}


CANDIDATES_PER_FILE = 50_000


def _write_candidates(store: Store, res: ingest_sources.Resolved, index: dict[str, int]) -> list[str]:
  """candidates.jsonl parts in the store, where every worker can read them."""
  rows = list(_candidate_rows(res, index))
  parts = []
  for k in range(0, len(rows), CANDIDATES_PER_FILE):
    rel = f"{WORK}/candidates/part-{k // CANDIDATES_PER_FILE:05d}.jsonl"
    store.write_text(rel, "".join(json.dumps(r) + "\n" for r in rows[k:k + CANDIDATES_PER_FILE]))
    parts.append(rel)
  return parts


def _run(s: Settings, store: Store, parts: list[str], runner: str,
         pipeline_args: list[str]) -> list[dict]:
  options = PipelineOptions([f"--runner={RUNNERS[runner]}", *pipeline_args])
  # A DataError in a worker is re-raised below as one line; Beam would also log its traceback.
  logging.getLogger("apache_beam").setLevel(os.environ.get("JAXCLF_BEAM_LOGLEVEL", "CRITICAL"))
  buckets = max(1, min(256, sum(s.per_class_in) // 20_000))
  try:
    with beam.Pipeline(options=options) as p:
      build(p, store, parts, buckets, s)
  except DataError as e:
    raise DataError(str(e).replace(_MARK, "")) from None
  except Exception as e:  # noqa: BLE001 - runners wrap worker errors in their own types
    found = re.search(re.escape(_MARK) + "(.*?)" + re.escape(_MARK), str(e), re.S)
    if found:
      raise DataError(found.group(1)) from None
    if (lost := remote.store_unreachable_in(str(e))) is not None:  # an object store went away
      raise DataError(lost) from None
    raise
  rows = []
  for rel in store.files(f"{WORK}/rows"):
    rows += _read_part(rel, store)
  return rows


def _plan(s: Settings, res: ingest_sources.Resolved, rows: list[dict]) -> tuple[plan_lib.Plan, dict]:
  """The pipeline's records -> the same Plan the local path builds (entries in candidate order,
  skips in the order the local path reports them)."""
  names = list(s.class_names)
  recs = sorted((r for r in rows if r["t"] == "rec"), key=lambda r: r["i"])
  entries = []
  for r in recs:
    cand = plan_lib.Candidate(uri=r["uri"], label_name=names[r["label"]], read=None, split=r["given"])
    chk = scan.Checked(r["uri"], **{k: r[k] for k in _CHECK_FIELDS})
    entries.append(plan_lib.Entry(cand, r["label"], r["split"], chk))
  skipped = [r["skip"] for r in sorted((r for r in rows if r["t"] == "skip"),
                                       key=lambda r: (r["order"], r["i"]))]
  if s.given:
    no_train = sorted({names[e.label] for e in entries} -
                      {names[e.label] for e in entries if e.split == "train"})
    if no_train:
      raise DataError(f"{s.source}: class(es) {no_train} have images in val/test but none in train")
  version = scan.content_version(names, [(e.checked.sha256, e.label, e.split) for e in entries])
  near = None
  if s.near_duplicates:
    pos = {r["i"]: k for k, r in enumerate(recs)}  # candidate index -> entry index (same order)
    summary = next(r for r in rows if r["t"] == "near")
    near = {"count": summary["count"], "cross_split": summary["cross_split"],
            "pairs": [(pos[i], pos[j], d) for i, j, d in summary["pairs"]]}
  report = plan_lib.build_report(s.source, names, entries, skipped, len(res.candidates),
                                 s.near_duplicates, near_summary=near)
  written = {(r["split"], r["file"]): r for r in rows if r["t"] == "shard"}
  return plan_lib.Plan(names, entries, skipped, version, report), written


def _commit(store: Store, s: Settings, plan: plan_lib.Plan, written: dict):
  """Checks the pipeline's shards against the layout the local path computes, then moves them
  into place and removes shards of an earlier layout. -> (layout, split -> shard rows)."""
  shard_rows = {}
  lay = ingest_shards.shard_layout(plan, s.seed, s.shard_mb)
  for split, shards in lay.items():
    shard_rows[split] = []
    for i, entries in enumerate(shards):
      name = layout.shard_name(split, i, len(shards))
      row = written.get((split, name))
      if row is None or row["records"] != len(entries):
        raise RuntimeError(f"beam ingest: shard {name} ({len(entries)} records by the layout) was "
                           f"not written as laid out ({row}); this is a bug")
      shard_rows[split].append({k: row[k] for k in ("file", "records", "bytes", "sha256")})
  wanted = {r["file"] for rows in shard_rows.values() for r in rows}
  for rel in store.files():
    if "/" not in rel and rel.endswith(".array_record") and rel not in wanted:
      store.remove(rel)
  for name in sorted(wanted):
    store.move(f"{WORK}/shards/{name}", name)
  return lay, shard_rows


def _publish(store: Store, manifest: dict, index: str) -> dict:
  """Index files and card, then manifest.json last (its presence means complete)."""
  import tempfile  # noqa: PLC0415
  if not store.remote:
    return ingest_manifest.write_manifest(store.root, manifest, index)
  with tempfile.TemporaryDirectory(prefix="jaxclf-beam-manifest-") as stage:
    written = ingest_manifest.write_manifest(stage, manifest, index)
    files = sorted(os.path.relpath(os.path.join(d, f), stage)
                   for d, _, fs in os.walk(stage) for f in fs)
    for rel in store.files(ingested.INDEX_DIR):
      if rel not in files:
        store.remove(rel)
    for rel in files:
      if rel != ingested.MANIFEST:
        store.put(os.path.join(stage, rel), rel)
    store.put(os.path.join(stage, ingested.MANIFEST), ingested.MANIFEST)
  return written


def ingest(src: str, opts: IngestOptions, runner: str = "direct",
           pipeline_args: list[str] | None = None) -> dict:
  """The Beam ingest of `src` into opts.out (a local folder, s3:// or gs://); returns the
  manifest, as the local `ingest` does. Temp files live in OUT/.partial-beam/, where every worker
  can reach them when OUT is an object store."""
  import tempfile  # noqa: PLC0415
  if runner not in RUNNERS:
    raise DataError(f"--runner {runner!r}: choose one of {sorted(RUNNERS)}")
  if remote.is_remote(opts.out):
    if remote.scheme(opts.out) not in ("s3", "gs"):
      raise DataError(f"--out {opts.out!r}: give a local folder, s3:// or gs://")
    out = opts.out.rstrip("/")
  else:
    out = ingest_lib.local_out(src, opts)
    os.makedirs(out, exist_ok=True)
  store = Store(out)
  opener = ingest_lib.create_opener(opts)
  # Archives are unpacked here, by the driver: beside a local OUT (a killed run's copy is
  # removed by the next run), else in a temp dir.
  scratch = (tempfile.mkdtemp(prefix="jaxclf-beam-list-") if store.remote
             else os.path.join(out, WORK + "-list"))
  archive.remove(scratch)
  listing = os.path.join(scratch, "work")
  os.makedirs(listing)
  try:
    existing = ingest_lib.existing_dataset(src, out, listing, opts, opener)
    if existing is not None:
      return existing
    store.remove(WORK)  # a killed run's leftovers: the pipeline starts again from scratch
    res = ingest_sources.resolve(src, listing, opts, opener)
    if res.kind in ("fashion_mnist", "tfds"):
      raise DataError(f"{src}: in-memory sources are ingested by the local path; drop --runner")
    if not res.candidates:
      raise DataError(f"{src}: no files to ingest")
    names, index = plan_lib.class_index(src, [c.label_name for c in res.candidates],
                                        [c.split for c in res.candidates], res.class_names)
    parts = _write_candidates(store, res, index)
    per_class_in = np.bincount([index[c.label_name] for c in res.candidates], minlength=len(names))
    fractions = plan_lib.split_fractions(float(opts.val_fraction), float(opts.test_fraction))
    s = Settings(source=src, seed=int(opts.seed), fractions=tuple(fractions.items()),
                 given=any(c.split for c in res.candidates), channels=opts.channels,
                 max_pixels=opts.max_pixels, shard_mb=float(opts.shard_mb),
                 http=(opts.http_timeout, opts.http_retries, opts.http_concurrency),
                 class_names=tuple(names), per_class_in=tuple(int(n) for n in per_class_in),
                 near_duplicates=opts.near_duplicates)
    log(f"{len(res.candidates)} files from {src} ({res.kind}); Beam {RUNNERS[runner]}")
    rows = _run(s, store, parts, runner, list(pipeline_args or []))
  finally:
    archive.remove(scratch)
  plan, written = _plan(s, res, rows)
  lay, shard_rows = _commit(store, s, plan, written)
  manifest = ingest_manifest.build_manifest(src, res, plan, lay, shard_rows, opts)
  manifest["provenance"]["engine"] = f"beam:{RUNNERS[runner]}"
  manifest = _publish(store, manifest, opts.index)
  store.remove(WORK)
  log(f"done: {manifest['num_records']} records, version {manifest['version']}, "
                  f"{manifest['report']['num_skipped']} skipped -> {out}")
  return manifest
