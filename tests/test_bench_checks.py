"""The benches' own checks can fail:

  bench/soak.py   a backend that did not run is reported as skipped, never counted as passing;
  bench/race.py   split_check compares hashes of the rows each side actually used: what
                  bench/torch_anchor.py built its training tensors from, and the Dataset jaxclf's
                  training loop was handed (bench/jax_rows.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
if str(BENCH) not in sys.path:
  sys.path.insert(0, str(BENCH))


# ------------------------------------------------------------------------------ soak

def test_soak_reports_a_skipped_backend_as_skipped():
  from soak import verdict
  onnx_ok = {"ok": True, "status": {"5xx": 0}}
  skipped = {"skipped": "no serving venv: run scripts/setup_serving_env.sh"}
  assert verdict({"onnx": onnx_ok, "triton": skipped}) == {
      "ok": True, "passed": ["onnx"], "failed": [],
      "skipped": {"triton": "no serving venv: run scripts/setup_serving_env.sh"}}
  # Nothing ran: not a pass.
  assert verdict({"onnx": {"skipped": "x"}, "triton": {"skipped": "y"}})["ok"] is False
  # A run that reports no verdict failed; it is not a pass by default.
  v = verdict({"onnx": onnx_ok, "triton": {"requests": 10}})
  assert (v["ok"], v["failed"]) == (False, ["triton"])
  v = verdict({"onnx": {"ok": False}, "triton": {"ok": True}})
  assert (v["ok"], v["passed"], v["failed"]) == (False, ["triton"], ["onnx"])


# ------------------------------------------------------------------------------ row hashes

def test_row_hash_names_the_rows_whatever_their_order():
  from row_hash import rows_sha256
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (50, 28, 28, 1), dtype=np.uint8)
  y = rng.integers(0, 10, 50).astype(np.int32)
  h = rows_sha256(x, y)
  perm = rng.permutation(50)
  assert rows_sha256(x[perm], y[perm]) == h
  assert rows_sha256(x[..., 0], y.astype(np.int64)) == h  # the same bytes, other shape/label dtype
  x2 = x.copy()
  x2[7, 3, 3, 0] ^= 1
  y2 = y.copy()
  y2[7] = (y2[7] + 1) % 10
  others = {rows_sha256(x2, y), rows_sha256(x, y2), rows_sha256(x[1:], y[1:]),
            rows_sha256(np.concatenate([x, x[:1]]), np.concatenate([y, y[:1]]))}
  assert h not in others and len(others) == 4
  with pytest.raises(ValueError, match="float32, expected uint8"):
    rows_sha256(x.astype(np.float32), y)


def anchor(code: str) -> dict:
  """`code` in a fresh interpreter with bench/torch_anchor.py imported (it refuses to share a
  process with jax, which this one has); it prints one JSON object."""
  r = subprocess.run([sys.executable, "-c", "import json, sys\nsys.path.insert(0, sys.argv[1])\n"
                      "import numpy as np, torch_anchor\n" + code, str(BENCH)], cwd=REPO,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  return json.loads(r.stdout.strip().splitlines()[-1])


def test_torch_anchor_reports_the_rows_its_tensors_hold():
  """The hash the anchor reports names the rows in the very tensors it trains and tests on:
  recovered from them (normalisation undone, exact for uint8 in float32) and hashed again."""
  out = anchor("""
from row_hash import rows_sha256
data, info = torch_anchor.load_data(0.1, 0)
again = {}
for split, (x, y) in data.items():
  pixels = torch_anchor.torch.round((x * torch_anchor.STD + torch_anchor.MEAN) * 255)
  again[split] = rows_sha256(pixels.numpy().astype(np.uint8)[:, 0], y.numpy())
print(json.dumps({"info": info, "again": again}))""")
  assert out["again"] == out["info"]["rows_sha256"]
  assert out["info"]["counts"] == {"train": 54000, "val": 6000, "test": 10000}


@pytest.fixture(scope="module")
def jax_rows_tiny(tmp_path_factory):
  """configs/cnn.py:tiny trained through bench/jax_rows.py (jaxclf.main plus the row hashes)."""
  tmp = tmp_path_factory.mktemp("jax-rows")
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAXCLF_") or k == "JAXCLF_CACHE"}
  r = subprocess.run([sys.executable, str(BENCH / "jax_rows.py"), str(tmp / "rows.json"),
                      f"--config={REPO / 'configs' / 'cnn.py'}:tiny", f"--workdir={tmp / 'run'}"],
                     cwd=REPO, env={**env, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
                     timeout=1200)
  assert r.returncode == 0, r.stderr[-4000:]
  assert json.loads((tmp / "run" / "run.json").read_text())["status"] == "completed"
  return json.loads((tmp / "rows.json").read_text())


def test_jax_rows_hashes_what_the_training_loop_was_handed(jax_rows_tiny):
  """tiny keeps the first 512 rows of each split (data.limit_per_split): the hashes are those
  rows', computed here from the IDX arrays and the carve, not the full splits'."""
  from jaxclf.config import load_config
  from jaxclf.data.sources import fashion_mnist
  from jaxclf.data.splits import carve_validation
  from row_hash import rows_sha256
  d = load_config(f"{REPO}/configs/cnn.py:tiny", environ={}).data
  limit = int(d.limit_per_split)
  arrays = fashion_mnist.load_arrays(None)
  x, y = arrays["train"]
  tr, va = carve_validation(y, float(d.val_fraction), int(d.split_seed))
  want = {"train": rows_sha256(x[tr][:limit], y[tr][:limit]),
          "val": rows_sha256(x[va][:limit], y[va][:limit]),
          "test": rows_sha256(arrays["test"][0][:limit], arrays["test"][1][:limit])}
  assert jax_rows_tiny["rows_sha256"] == want
  assert jax_rows_tiny["counts"] == {"train": limit, "val": limit, "test": limit}
  assert jax_rows_tiny["hash_s"] >= 0


def test_race_split_check_fails_when_the_sides_used_other_rows(jax_rows_tiny):
  """The anchor's full split against a jaxclf run on 512 rows per split: the same carve
  arguments, other rows, so no match; the same rows on both sides match."""
  import race
  info = anchor("print(json.dumps(torch_anchor.load_data(0.1, 0)[1]))")
  check = race.split_check({"data": info}, {"data_rows": jax_rows_tiny})
  assert check["match"] is False
  assert check["per_split"] == {"train": False, "val": False, "test": False}
  same = race.split_check({"data": {"rows_sha256": jax_rows_tiny["rows_sha256"]}},
                          {"data_rows": jax_rows_tiny})
  assert same["match"] is True
  assert race.split_check({"data": info}, {"data_rows": None})["match"] is None


# ------------------------------------------------------------------------------ recipe

def test_the_default_config_is_the_anchor_plus_the_chosen_recipe_arm():
  """bench/recipe.py's table is what chose configs/cnn.py: the default must be exactly the
  `:anchor` variant with the overrides of the arm its docstring names, or the table describes
  another model than the one a user trains."""
  from recipe import ARMS, CONFIG, DEFAULT_ARM
  from jaxclf.config import load_config
  default = load_config(str(REPO / "configs" / "cnn.py"), environ={})
  arm = load_config(str(REPO / CONFIG), overrides=list(ARMS[DEFAULT_ARM]), environ={})
  anchor = load_config(str(REPO / CONFIG), environ={})
  assert default.to_dict() == arm.to_dict()
  assert default.to_dict() != anchor.to_dict()
  assert f"`{DEFAULT_ARM}`" in (REPO / "configs" / "cnn.py").read_text()


@pytest.mark.parametrize("name", ["cnn", "transfer100", "transfer500", "photos"])
def test_every_recipe_arm_is_a_valid_config(name):
  """A typo in an arm's overrides fails here, not hours into an ablation."""
  from recipe import SUITES
  from jaxclf.config import load_config
  suite = SUITES[name]
  data = ["data.source=fashion_mnist"] if suite.data else []  # the photo set's path is built
  for arm, overrides in suite.arms.items():
    load_config(str(REPO / suite.config), overrides=[*data, *suite.shared, *overrides],
                environ={})
