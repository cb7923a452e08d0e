"""`python -m jaxclf.export.triton {serve,write,check}` (scripts/start_tritonserver.sh): the command
line over the Triton modules of this package:

  triton_config.py      model configs (one source of truth) <-> config.pbtxt, repository checks
  triton_repository.py  an export written into a model repository as a version, offline or live
  triton_server.py      the tritonserver process and the repository API of a running one
  serving_env.py        the serving venv that has tritonserver and its backends

This module imports neither jax nor onnx: it runs in both the training and the serving venv.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from jaxclf.export.serving_env import ServingEnv, ServingEnvError
from jaxclf.export.triton_config import ServingOptions, TritonConfigError, validate_repository
from jaxclf.export.triton_repository import write_model_repository
from jaxclf.export.triton_server import TritonServerError, servable_models, server_command


def main(argv: Sequence[str] | None = None) -> int:
  """python -m jaxclf.export.triton {serve,write,check} ... (scripts/start_tritonserver.sh)."""
  p = argparse.ArgumentParser(prog="python -m jaxclf.export.triton")
  sub = p.add_subparsers(dest="cmd", required=True)
  s = sub.add_parser("serve", help="run tritonserver on a model repository (foreground)")
  s.add_argument("repository")
  s.add_argument("--http-port", type=int, default=8000)
  s.add_argument("--grpc-port", type=int, default=8001)
  s.add_argument("--metrics-port", type=int, default=8002)
  s.add_argument("--models", nargs="*", help="models to load (default: all servable here)")
  s.add_argument("--poll-secs", type=int, default=0,
                 help="poll mode: reload changed models every N s (default: explicit mode)")
  s.add_argument("--address", default="127.0.0.1", help="listen address (0.0.0.0: all interfaces)")
  s.add_argument("--venv", help="serving venv (default: $JAXCLF_SERVING_VENV or .venv-serve)")
  s.add_argument("--print-command", action="store_true")
  s.add_argument("extra", nargs="*", help="extra tritonserver flags after --")
  w = sub.add_parser("write", help="write an export into a model repository")
  w.add_argument("export_dir")
  w.add_argument("repository")
  w.add_argument("--name", required=True)
  w.add_argument("--version", type=int, default=1)
  w.add_argument("--no-gpu", action="store_true", help="leave out NAME_onnx")
  c = sub.add_parser("check", help="parse and cross-check every config.pbtxt")
  c.add_argument("repository")
  args = p.parse_args(argv)
  try:
    if args.cmd == "write":
      out = write_model_repository(args.export_dir, args.repository, args.name, args.version,
                                   ServingOptions(gpu=not args.no_gpu))
      print(json.dumps(out, indent=2))
      return 0
    if args.cmd == "check":
      env = ServingEnv.find()
      configs = validate_repository(args.repository)
      print(json.dumps({"models": sorted(configs),
                        "servable_here": servable_models(args.repository, env.backend_dir)}, indent=2))
      return 0
    env = ServingEnv.find(args.venv)
    cmd = server_command(env, args.repository, http_port=args.http_port, grpc_port=args.grpc_port,
                         metrics_port=args.metrics_port, models=args.models,
                         poll_secs=args.poll_secs or None, address=args.address,
                         extra=args.extra)
    if args.print_command:
      print(" ".join(cmd))
      return 0
    os.execve(cmd[0], cmd, env.environ())  # the server takes this process: signals reach it
  except (TritonConfigError, ServingEnvError, TritonServerError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
