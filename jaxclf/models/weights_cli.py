"""`jaxclf weights inspect | convert`: users' own .pth / .safetensors weights (jaxclf/models/weights.py).

A file that cannot be read or does not fit prints one line naming it and exits 2, like every other
user error of the CLI.
"""
from __future__ import annotations

import json
import sys


def _inspect(args) -> int:
  from jaxclf.models.weights import inspect_weights
  info = inspect_weights(args.file)
  if args.json:
    print(json.dumps(info))
    return 0
  print(f"{info['file']}: {info['format']}, {info['count']} tensors, {info['values']:,} values, "
        f"sha256 {info['sha256']}")
  width = max((len(t["name"]) for t in info["tensors"]), default=4)
  for t in info["tensors"]:
    print(f"  {t['name']:<{width}}  {t['dtype']:<8}  {tuple(t['shape'])}")
  return 0


def _convert(args) -> int:
  from jaxclf.models.weights import check_sha256_arg, convert_file
  pin = check_sha256_arg(args.sha256) if args.sha256 else None
  meta = convert_file(args.file, args.arch, args.out, sha256=pin)
  print(json.dumps({"out": args.out, "sha256": meta["sha256"], "arch": meta["arch"],
                    "source_sha256": meta["source_sha256"], "pinned": meta["sha256_pinned"],
                    "use": f"--config.model.name={meta['model']} "
                           + "".join(f"--config.model.kwargs.{k}={v} "
                                     for k, v in meta["model_kwargs"].items())
                           + f"--config.model.pretrained={args.out}"}))
  return 0


def _guarded(fn):
  def run(args) -> int:
    from jaxclf.models.state_dict import PretrainedError
    try:
      return fn(args)
    except PretrainedError as e:
      print(f"jaxclf: error: {e}", file=sys.stderr)
      return 2
  return run


def add_weights_commands(sub) -> None:
  w = sub.add_parser("weights", help="inspect or convert .pth / .safetensors weights (no code run)")
  wsub = w.add_subparsers(dest="weights_command", required=True)
  i = wsub.add_parser("inspect", help="tensor names, shapes and dtypes of a weights file")
  i.add_argument("file")
  i.add_argument("--json", action="store_true", help="one JSON object instead of a table")
  i.set_defaults(func=_guarded(_inspect))
  c = wsub.add_parser("convert", help="torchvision-layout state dict -> .npz for model.pretrained")
  c.add_argument("file")
  c.add_argument("--arch", required=True,
                 help="resnet18 | resnet34 | resnet50 | vgg11_bn | vgg16_bn (torchvision names)")
  c.add_argument("--out", required=True, help="the .npz to write")
  c.add_argument("--sha256", help="refuse the file unless its sha256 is this (64 hex digits)")
  c.set_defaults(func=_guarded(_convert))
