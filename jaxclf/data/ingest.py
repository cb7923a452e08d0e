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
temporary files.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import sys
from typing import Callable

import numpy as np

from jaxclf.data import decode, layout
from jaxclf.data.dataset import DataError
from jaxclf.data.sources import archive, image_folder, ingested, remote, scan, tabular
from jaxclf.data.sources import plan as plan_lib

PARTIAL = ".partial"
CHECK_BATCH = 256


@dataclasses.dataclass
class IngestOptions:
  out: str
  name: str = ""
  license: str = "unknown"  # say what the data may be used for; it goes into the card
  description: str = ""
  channels: int = 3  # only for the decode check; shards keep the original bytes
  max_pixels: int = decode.DEFAULT_MAX_PIXELS
  val_fraction: float = 0.1
  test_fraction: float = 0.1
  seed: int = 0
  shard_mb: float = 64.0  # target shard size; shards hold whole records
  workers: int = 0  # decode-check threads; 0 = min(4, 2 x cores)
  http_timeout: float = 30.0
  http_retries: int = 3
  http_concurrency: int = 8
  tfds_data_dir: str = ""
  force: bool = False  # replace an existing, different dataset in `out`
  index: str = "parquet"  # per-record index: Parquet files next to the shards, or "json" (inline)
  near_duplicates: bool = True  # the dHash near-duplicate report (slow at millions of images)

  def provenance_options(self) -> dict:
    """The options that shape the output (so they are recorded, and a resume must match)."""
    return {"channels": self.channels, "max_pixels": self.max_pixels,
            "val_fraction": self.val_fraction, "test_fraction": self.test_fraction,
            "seed": self.seed, "shard_mb": self.shard_mb,
            **({} if self.near_duplicates else {"near_duplicates": False})}


@dataclasses.dataclass
class Resolved:
  kind: str
  candidates: list[plan_lib.Candidate]
  class_names: list[str] | None = None
  skipped: list[dict] = dataclasses.field(default_factory=list)  # refused before decoding
  info: dict = dataclasses.field(default_factory=dict)
  license: str | None = None


def _log(msg: str) -> None:
  print(f"[ingest] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ sources

def _from_folder(root: str, uri_prefix: str | None = None) -> Resolved:
  candidates, listing = image_folder.list_candidates(root)
  if uri_prefix is not None:  # archive members: name them by archive, not by temp folder
    for c in candidates:
      c.location = c.uri
      c.uri = f"{uri_prefix}#{os.path.relpath(c.uri, root).replace(os.sep, '/')}"
  return Resolved("folder", candidates, info={"given_splits": listing["given_splits"],
                                              "ignored": len(listing["ignored"])})


def _from_archive(src: str, work: str, opener: remote.Opener) -> Resolved:
  local = remote.local_path(src) if not remote.is_remote(src) else os.path.join(
      work, "archive" + _archive_suffix(src))
  if remote.is_remote(src) and not os.path.exists(local):
    _log(f"downloading {src}")
    remote.download(opener, src, local)
  if not os.path.exists(local):
    raise DataError(f"archive {src!r} does not exist")
  dest = os.path.join(work, "extracted")
  done = os.path.join(work, "extracted.done")
  refused: list[dict] = []
  if os.path.exists(done):
    with open(done) as f:
      refused = json.load(f)
  else:
    archive.remove(dest)
    _log(f"extracting {src}")
    refused = archive.extract(local, dest, name=src)
    with open(done, "w") as f:
      json.dump(refused, f)
  res = _from_folder(archive.content_root(dest), uri_prefix=src)
  res.kind = "archive"
  res.skipped = refused
  return res


def _archive_suffix(uri: str) -> str:
  name = uri.split("?", 1)[0].lower()
  return next(s for s in sorted(archive.ARCHIVE_SUFFIXES, key=len, reverse=True) if name.endswith(s))


def _from_manifest(src: str, opener: remote.Opener) -> Resolved:
  text = opener.read_or_raise(src, "label manifest").decode("utf-8-sig")
  rows = tabular.read_rows(src, text)
  names = tabular.sorted_labels(label for _, label, _ in rows)
  candidates = [plan_lib.Candidate(uri=u, label_name=l, split=s, read=opener.reader(u))
                for u, l, s in rows]
  dupes = len(candidates) - len({c.uri for c in candidates})
  if dupes:
    raise DataError(f"{src}: {dupes} uri(s) appear more than once; each image needs one row")
  return Resolved("csv" if not src.lower().endswith((".jsonl", ".ndjson")) else "jsonl",
                  candidates, class_names=names)


def _from_object_tree(src: str, opener: remote.Opener) -> Resolved:
  """An s3:// or gs:// prefix laid out as class folders (optionally under split folders)."""
  prefix = src.rstrip("/")
  objects = [(k, n) for k, n in opener.list_objects(prefix)
             if not any(p.startswith(".") for p in k.split("/"))]
  if not objects:
    raise DataError(f"{src}: no objects under this prefix (or it does not exist)")
  tops = {k.split("/")[0] for k, _ in objects if "/" in k}
  given = (tops and all(t.lower() in image_folder.SPLIT_DIR_NAMES for t in tops) and "train" in
           {image_folder.SPLIT_DIR_NAMES[t.lower()] for t in tops} and len(tops) >= 2)
  candidates, loose = [], []
  for key, _ in objects:
    parts = key.split("/")
    split = image_folder.SPLIT_DIR_NAMES[parts[0].lower()] if given else None
    rest = parts[1:] if given else parts
    if len(rest) < 2:
      loose.append(key)
      continue
    uri = f"{prefix}/{key}"
    candidates.append(plan_lib.Candidate(uri=uri, label_name=rest[0], split=split,
                                         read=opener.reader(uri)))
  if not candidates:
    raise DataError(f"{src}: no class folders. Expected {prefix}/<class name>/<image files>"
                    + (f"; found loose objects such as {loose[0]!r}" if loose else ""))
  given_splits = sorted({c.split for c in candidates if c.split})
  return Resolved(remote.scheme(src), candidates,
                  info={"given_splits": given_splits, "ignored": len(loose)})


def _png(arr: np.ndarray) -> bytes:
  import io  # noqa: PLC0415
  from PIL import Image  # noqa: PLC0415
  buf = io.BytesIO()
  Image.fromarray(arr[:, :, 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr).save(
      buf, "PNG", optimize=False, compress_level=6)
  return buf.getvalue()


def _from_arrays(name_prefix: str, splits: dict[str, tuple[np.ndarray, np.ndarray]],
                 class_names: list[str]) -> list[plan_lib.Candidate]:
  """In-memory images (Fashion-MNIST, TFDS) -> candidates that PNG-encode on read (lossless)."""
  out = []
  for split, (images, labels) in splits.items():
    for i in range(len(labels)):
      out.append(plan_lib.Candidate(
          uri=f"{name_prefix}:{split}/{i:07d}", label_name=class_names[int(labels[i])], split=split,
          read=functools.partial(lambda im: (_png(im), None), images[i])))
  return out


def _from_fashion_mnist() -> Resolved:
  from jaxclf.data.sources import fashion_mnist  # noqa: PLC0415
  arrays = fashion_mnist.load_arrays()
  cands = _from_arrays("fashion_mnist", arrays, fashion_mnist.CLASS_NAMES)
  return Resolved("fashion_mnist", cands, class_names=list(fashion_mnist.CLASS_NAMES),
                  license="MIT (Zalando Research, Fashion-MNIST)",
                  info={"given_splits": ["test", "train"], "sha256_idx": fashion_mnist.FILES})


def _from_tfds(src: str, opts: IngestOptions) -> Resolved:
  """tfds:NAME (train/validation/test splits) from a data_dir where it is already prepared in
  array_record format. Works without TensorFlow: `tfds.data_source` reads ArrayRecord, and with
  SkipDecoding the original encoded image bytes come through untouched."""
  name = src[len("tfds:"):]
  try:
    import tensorflow_datasets as tfds  # noqa: PLC0415 - optional, heavy
  except ImportError as e:
    raise DataError(f"{src}: needs the tensorflow-datasets package ({e}); "
                    "pip install -r requirements/data.txt") from None
  data_dir = opts.tfds_data_dir or os.environ.get("TFDS_DATA_DIR") or None
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    features = builder.info.features
    image_key = next(k for k, f in features.items() if isinstance(f, tfds.features.Image))
    label_key = next(k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel))
    sources = tfds.data_source(name, data_dir=data_dir, download=False,
                               decoders={image_key: tfds.decode.SkipDecoding()})
  except StopIteration:
    raise DataError(f"{src}: needs an Image feature and a ClassLabel feature") from None
  except Exception as e:  # noqa: BLE001 - tfds raises many kinds
    raise DataError(
        f"{src}: no prepared copy readable in {data_dir or '~/tensorflow_datasets'} "
        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). TFDS cannot download "
        "here; prepare it where it can (file_format=array_record), copy the data_dir, and pass "
        "--tfds-data-dir.") from None
  names = list(features[label_key].names)
  mapping = {"train": "train", "validation": "val", "val": "val", "test": "test"}

  def read(ds, i):
    image = ds[i][image_key]
    return (bytes(image) if isinstance(image, (bytes, np.bytes_)) else _png(np.asarray(image))), None

  cands = []
  for split in sorted(sources):
    ours = mapping.get(split)
    if ours is None:
      continue
    ds = sources[split]
    for i in range(len(ds)):
      cands.append(plan_lib.Candidate(
          uri=f"tfds:{name}/{split}/{i:07d}", label_name=names[int(ds[i][label_key])], split=ours,
          read=functools.partial(read, ds, i)))
  lic = getattr(builder.info, "license", None) or ("see citation: " + str(builder.info.citation)[:200]
                                                   if builder.info.citation else None)
  return Resolved("tfds", cands, class_names=names, license=lic,
                  info={"given_splits": sorted({c.split for c in cands})})


def resolve(src: str, work: str, opts: IngestOptions, opener: remote.Opener) -> Resolved:
  if src == "fashion_mnist":
    return _from_fashion_mnist()
  if src.startswith("tfds:"):
    return _from_tfds(src, opts)
  if tabular.is_manifest(src):
    return _from_manifest(src, opener)
  if archive.is_archive(src):
    return _from_archive(src, work, opener)
  if remote.scheme(src) in ("s3", "gs"):
    return _from_object_tree(src, opener)
  if remote.is_remote(src):
    raise DataError(f"{src}: over {remote.scheme(src)}:// give an archive (.tar.gz/.zip) or a "
                    "CSV/JSONL manifest; a web server cannot be listed like a folder")
  path = remote.local_path(src)
  if os.path.isdir(path):
    if os.path.isfile(os.path.join(path, ingested.MANIFEST)):
      raise DataError(f"{src} is already an ingested dataset; point data.source at it directly")
    return _from_folder(path)
  if os.path.exists(path):
    raise DataError(f"{src}: a file that is neither an archive (.tar/.tar.gz/.zip) nor a "
                    "CSV/JSONL label manifest")
  raise DataError(f"{src} does not exist")


# ----------------------------------------------------------------------- resumable checks

def _identity(uri: str) -> str:
  """What must not have changed for a journaled check to be reused."""
  if remote.is_remote(uri):
    return ""  # remote bytes are kept as blobs by sha256; the check is reused while its blob is
  try:
    st = os.stat(remote.local_path(uri))
    return f"{st.st_size}:{st.st_mtime_ns}"
  except OSError:
    return ""  # archive members (extracted in .partial), in-memory arrays: fixed for the run


def _blob_path(work: str, sha: str) -> str:
  return os.path.join(work, "blobs", sha[:2], sha)


def _keeping_blobs(c: plan_lib.Candidate, work: str) -> Callable:
  """Wraps a remote reader so the fetched bytes are kept (content-addressed) for the shard
  writer and for a resumed run: nothing is downloaded twice."""
  def read():
    data, err = c.read()
    if data is not None:
      path = _blob_path(work, hashlib.sha256(data).hexdigest())
      if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{id(data)}"
        with open(tmp, "wb") as f:
          f.write(data)
        os.replace(tmp, path)
    return data, err
  return read


def _read_journal(path: str, key: str) -> dict[str, dict]:
  """Rows of a JSON-lines journal by `key`; a line torn by a crash ends it (all before is good)."""
  done: dict[str, dict] = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          row = json.loads(line)
        except json.JSONDecodeError:
          break
        done[row[key]] = row
  return done


def check_resumable(candidates: list[plan_lib.Candidate], work: str, opts: IngestOptions,
                    keep_blobs: bool) -> list[scan.Checked]:
  journal = os.path.join(work, "checks.jsonl")
  done = _read_journal(journal, "uri")
  results: dict[str, scan.Checked] = {}
  todo = []
  for c in candidates:
    row = done.get(c.uri)
    blob_ok = (not keep_blobs or (row and row["checked"]["skip"]) or
               (row and os.path.exists(_blob_path(work, row["checked"]["sha256"]))))
    if row is not None and row["identity"] == _identity(c.uri) and blob_ok:
      results[c.uri] = scan.Checked(**row["checked"])
    else:
      todo.append(c)
  if results:
    _log(f"resuming: {len(results)} files already checked, {len(todo)} to go")
  fields = [f.name for f in dataclasses.fields(scan.Checked)]
  with open(journal, "a") as f:
    for start in range(0, len(todo), CHECK_BATCH):
      batch = todo[start:start + CHECK_BATCH]
      items = [(c.uri, _keeping_blobs(c, work) if keep_blobs else c.read) for c in batch]
      checked = scan.check_files(items, channels=opts.channels, max_pixels=opts.max_pixels,
                                 workers=opts.workers or None)
      for c, chk in zip(batch, checked):
        results[c.uri] = chk
        f.write(json.dumps({"uri": c.uri, "identity": _identity(c.uri),
                            "checked": {k: getattr(chk, k) for k in fields}}) + "\n")
      f.flush()
      os.fsync(f.fileno())
      _log(f"checked {min(start + CHECK_BATCH, len(todo)) + len(candidates) - len(todo)}"
           f"/{len(candidates)}")
  return [results[c.uri] for c in candidates]


# ----------------------------------------------------------------------------- shards

def shard_layout(plan: plan_lib.Plan, seed: int, shard_mb: float) -> dict[str, list[list[plan_lib.Entry]]]:
  """split -> shards -> entries, by `jaxclf.data.layout` (the Beam ingest lays out the same
  shards): records go to shards by a seeded hash of their content and uri and are sorted by it
  within each shard, so shard order is already a fair mix (a `limit_per_split` prefix has every
  class). A pure function of the plan: a resumed run lays out the same shards."""
  out = {}
  for split in plan_lib.SPLITS:
    entries = plan.split_entries(split)
    n = layout.num_shards(len(entries), sum(e.checked.size for e in entries), shard_mb)
    slots: dict[int, list[tuple[str, plan_lib.Entry]]] = {}
    for e in entries:
      key = layout.record_key(seed, split, e.checked.sha256, e.candidate.uri)
      slots.setdefault(layout.slot_of(key, n), []).append((key, e))
    out[split] = [[e for _, e in sorted(slots[s], key=lambda ke: ke[0])] for s in sorted(slots)]
  return out


shard_name = layout.shard_name


def _entry_bytes(e: plan_lib.Entry, work: str, keep_blobs: bool) -> bytes:
  if keep_blobs:
    path = _blob_path(work, e.checked.sha256)
    if os.path.exists(path):
      with open(path, "rb") as f:
        data = f.read()
      if hashlib.sha256(data).hexdigest() == e.checked.sha256:
        return data
  data, err = e.candidate.read()
  if data is None:
    raise DataError(f"{e.candidate.uri}: readable when checked, now fails ({err}); re-run ingest")
  if hashlib.sha256(data).hexdigest() != e.checked.sha256:
    raise DataError(f"{e.candidate.uri}: changed while ingesting (sha256 differs from the check); "
                    "re-run ingest once the source is stable")
  return data


def write_shard(path: str, entries: list[plan_lib.Entry], work: str, keep_blobs: bool) -> dict:
  records = (ingested.encode_record(_entry_bytes(e, work, keep_blobs), e.label, e.checked.sha256,
                                    e.candidate.uri, e.checked.format) for e in entries)
  return write_shard_file(path, records)


def write_shard_file(path: str, records, tmp_suffix: str = ".tmp") -> dict:
  """Encoded records -> one ArrayRecord shard at `path`, written under a temp name and renamed
  when complete. -> its manifest row {file, records, bytes, sha256}."""
  from array_record.python.array_record_module import ArrayRecordWriter  # noqa: PLC0415
  tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}{tmp_suffix}")
  if os.path.exists(tmp):
    os.unlink(tmp)
  # group_size:1 = one record per chunk: what random access (a global shuffle) needs. Images are
  # already compressed, so chunk compression would only spend CPU.
  writer = ArrayRecordWriter(tmp, "group_size:1,uncompressed")
  n = 0
  for record in records:
    writer.write(record)
    n += 1
  writer.close()
  with open(tmp, "rb+") as f:
    os.fsync(f.fileno())
  sha = ingested.sha256_file(tmp)
  size = os.path.getsize(tmp)
  os.replace(tmp, path)
  return {"file": os.path.basename(path), "records": n, "bytes": size, "sha256": sha}


def write_shards(layout, out: str, work: str, keep_blobs: bool) -> dict[str, list[dict]]:
  journal = os.path.join(work, "shards.jsonl")
  done = _read_journal(journal, "file")
  result: dict[str, list[dict]] = {}
  with open(journal, "a") as jf:
    for split, shards in layout.items():
      result[split] = []
      for i, entries in enumerate(shards):
        name = shard_name(split, i, len(shards))
        path = os.path.join(out, name)
        row = done.get(name)
        if row and os.path.exists(path) and os.path.getsize(path) == row["bytes"]:
          result[split].append(row)
          continue
        row = write_shard(path, entries, work, keep_blobs)
        jf.write(json.dumps(row) + "\n")
        jf.flush()
        os.fsync(jf.fileno())
        _log(f"wrote {name} ({row['records']} records, {row['bytes'] / 1e6:.1f} MB)")
        result[split].append(row)
  return result


# ---------------------------------------------------------------------------- manifest

def _versions() -> dict:
  from importlib import metadata  # noqa: PLC0415
  out = {}
  for pkg in ("jaxclf", "pillow", "array-record"):
    try:
      out[pkg] = metadata.version(pkg)
    except metadata.PackageNotFoundError:
      out[pkg] = None
  return out


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


def _default_name(src: str) -> str:
  base = src.rstrip("/").split("/")[-1].split("#")[0]
  for suffix in sorted(archive.ARCHIVE_SUFFIXES + (".csv", ".tsv", ".jsonl", ".ndjson"),
                       key=len, reverse=True):
    if base.lower().endswith(suffix):
      return base[: -len(suffix)]
  return base.replace("tfds:", "")


def _write_atomic(path: str, text: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


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


# ------------------------------------------------------------------------------- driver

def _candidate_uris_match(manifest: dict, res: Resolved, out: str) -> bool:
  known = {r["uri"] for recs in ingested.read_records(out, manifest).values() for r in recs}
  known |= {s["path"] for s in manifest["report"]["skipped"]}
  return known == {c.uri for c in res.candidates} | {s["path"] for s in res.skipped}


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
      _log(f"{out} is up to date (version {existing['version']})")
      archive.remove(work)
      return existing
  raise DataError(f"{out} already holds a different dataset (version {existing['version']}, "
                  f"from {existing['provenance']['source']}); pass --force to replace it or "
                  "choose another --out")


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
  _write_atomic(state_path, json.dumps(state, sort_keys=True))

  res = resolve(src, work, opts, opener)
  if not res.candidates:
    raise DataError(f"{src}: no files to ingest")
  _log(f"{len(res.candidates)} files from {src} ({res.kind})")
  keep_blobs = any(remote.is_remote(c.uri) for c in res.candidates)
  checked = check_resumable(res.candidates, work, opts, keep_blobs)
  plan = plan_lib.make_plan(res.candidates, source=src, channels=opts.channels,
                            max_pixels=opts.max_pixels, val_fraction=opts.val_fraction,
                            test_fraction=opts.test_fraction, seed=opts.seed,
                            class_names=res.class_names, checked=checked,
                            near_duplicates=opts.near_duplicates)
  layout = shard_layout(plan, opts.seed, opts.shard_mb)
  remove_foreign_shards(out, layout)
  shards = write_shards(layout, out, work, keep_blobs)
  manifest = write_manifest(out, build_manifest(src, res, plan, layout, shards, opts), opts.index)
  archive.remove(work)
  _log(f"done: {manifest['num_records']} records, version {manifest['version']}, "
       f"{manifest['report']['num_skipped']} skipped -> {out}")
  return manifest


def write_manifest(out: str, manifest: dict, index: str = "parquet") -> dict:
  """The record index (Parquet files, or inline with index='json': format_version 1), the card,
  then manifest.json last: its presence means the dataset is complete. -> what was written."""
  if index == "parquet":
    manifest = ingested.write_index(out, manifest)
  elif index != "json":
    raise DataError(f"--index {index!r}: choose parquet or json")
  else:
    manifest = {**manifest, "format_version": 1}
  _write_atomic(os.path.join(out, "README.md"), dataset_card(manifest))
  _write_atomic(os.path.join(out, ingested.MANIFEST),
                json.dumps(manifest, indent=1, sort_keys=True) + "\n")
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


def remove_foreign_shards(out: str, layout) -> None:
  """Shard files this layout does not name (a different earlier layout) would confuse readers."""
  wanted = {shard_name(s, i, len(shards)) for s, shards in layout.items() for i in range(len(shards))}
  for name in os.listdir(out):
    if name.endswith(".array_record") and name not in wanted:
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
