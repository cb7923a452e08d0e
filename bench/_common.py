"""Shared by the benches: print a result as JSON and optionally save it."""
import json
import os


def emit(result: dict, out: str | None) -> None:
  text = json.dumps(result, indent=2)
  print(text)
  if out:
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
      f.write(text)
