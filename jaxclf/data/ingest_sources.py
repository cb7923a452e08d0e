"""What an ingest reads: a source listed as candidates (uri, label, split, a reader), nothing
decoded yet.

  a class-per-folder directory   (optionally under train/ val/ test/ split folders)
  an archive                     .tar/.tar.gz/.zip, local, s3:// or https://; downloaded and
                                 extracted into the work folder once (a resumed run reuses it)
  a CSV/JSONL label manifest     uri,label[,split]; uris local, s3:// or https://
  an s3:// or gs:// prefix       laid out as class folders
  tfds:NAME                      a TFDS dataset already prepared in a data_dir (no TensorFlow)
  fashion_mnist                  in-memory arrays, PNG-encoded (lossless) on read
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os

import numpy as np

from jaxclf.data.ingest_options import IngestOptions, log
from jaxclf.data.sources import archive, image_folder, ingested, remote, tabular
from jaxclf.data.sources import plan as plan_lib
from jaxclf.data.types import DataError


@dataclasses.dataclass
class Resolved:
  kind: str
  candidates: list[plan_lib.Candidate]
  class_names: list[str] | None = None
  skipped: list[dict] = dataclasses.field(default_factory=list)  # refused before decoding
  info: dict = dataclasses.field(default_factory=dict)
  license: str | None = None


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
    log(f"downloading {src}")
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
    log(f"extracting {src}")
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
