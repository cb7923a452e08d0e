"""Sets a kustomization's image overrides, as `kustomize edit set image` does, for the release.

  python3 deploy/k8s/set_images.py OVERLAY_DIR NAME=NEW_NAME:TAG [NAME=NEW_NAME:TAG ...]

e.g. `set_images.py deploy/k8s/overlays/prod jaxclf-gateway=ghcr.io/me/jaxclf-gateway:abc123`.
Rewrites the `images:` block of OVERLAY_DIR/kustomization.yaml: an entry for NAME gets newName and
newTag (one is added if the overlay has none), the other entries stay. deploy.yml runs this before
`kubectl kustomize`, because kubectl's built-in kustomize renders but has no `edit` command; the
rendered manifests then carry the release's images (tests/test_workflows.py renders the result).

Standard library only: the deploy job has Python but no PyYAML. The block it rewrites is the
flat list of `- name:` / `newName:` / `newTag:` entries this repository's overlays use; anything
else there is refused with one line rather than rewritten wrongly.
"""
from __future__ import annotations

import os
import re
import sys

ENTRY_KEYS = ("name", "newName", "newTag")


class SetImageError(ValueError):
  pass


def parse_override(text: str) -> tuple[str, str, str]:
  """NAME=NEW_NAME:TAG -> (NAME, NEW_NAME, TAG)."""
  m = re.fullmatch(r"([A-Za-z0-9._/-]+)=([A-Za-z0-9._/:-]+?):([A-Za-z0-9_][A-Za-z0-9._-]{0,127})",
                   text)
  if not m:
    raise SetImageError(f"{text!r}: expected NAME=NEW_NAME:TAG, e.g. "
                        "jaxclf-gateway=ghcr.io/owner/jaxclf-gateway:v1.2.0")
  return m.group(1), m.group(2), m.group(3)


def split_images_block(text: str, path: str) -> tuple[list[str], list[str], list[str]]:
  """(lines before `images:`, the block's entry lines, lines after it)."""
  lines = text.splitlines()
  starts = [i for i, line in enumerate(lines) if line.rstrip() == "images:"]
  if len(starts) > 1:
    raise SetImageError(f"{path}: more than one top-level images: block")
  if not starts:
    return lines, [], []
  end = starts[0] + 1
  while end < len(lines) and (lines[end].startswith((" ", "-")) or not lines[end].strip()):
    end += 1
  return lines[:starts[0]], lines[starts[0] + 1:end], lines[end:]


def parse_entries(block: list[str], path: str) -> list[dict[str, str]]:
  entries: list[dict[str, str]] = []
  for line in block:
    m = re.fullmatch(r"\s*(- )?\s*(\w+):\s*\"?([^\"#]*?)\"?\s*", line)
    if not line.strip():
      continue
    if not m or m.group(2) not in ENTRY_KEYS or (m.group(1) is None and not entries):
      raise SetImageError(f"{path}: images: line {line.strip()!r} is not a name/newName/newTag "
                          "entry; edit that overlay by hand")
    if m.group(1):
      entries.append({})
    entries[-1][m.group(2)] = m.group(3)
  if any("name" not in e for e in entries):
    raise SetImageError(f"{path}: an images: entry without name")
  return entries


def render_entries(entries: list[dict[str, str]]) -> list[str]:
  out = ["images:"]
  for e in entries:
    out.append(f"  - name: {e['name']}")
    out += [f"    {k}: {e[k]}" if k == "newName" else f'    {k}: "{e[k]}"'
            for k in ENTRY_KEYS[1:] if k in e]
  return out


def set_images(overlay: str, overrides: list[str]) -> list[dict[str, str]]:
  path = os.path.join(overlay, "kustomization.yaml")
  if not os.path.isfile(path):
    raise SetImageError(f"{path}: no kustomization.yaml in {overlay}")
  with open(path, encoding="utf-8") as f:
    text = f.read()
  before, block, after = split_images_block(text, path)
  entries = parse_entries(block, path)
  for name, new_name, tag in map(parse_override, overrides):
    entry = next((e for e in entries if e["name"] == name), None)
    if entry is None:
      entry = {"name": name}
      entries.append(entry)
    entry.update(newName=new_name, newTag=tag)
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(before + render_entries(entries) + after) + "\n")
  return entries


def main(argv: list[str]) -> int:
  if len(argv) < 2:
    print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
    return 2
  try:
    for e in set_images(argv[0], argv[1:]):
      print(f"{e['name']}: {e.get('newName', e['name'])}:{e.get('newTag', '')}")
  except (SetImageError, OSError) as e:
    print(f"set_images.py: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
