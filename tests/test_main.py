"""`python -m jaxclf.main` on ml_collections' config_flags: config args, --config.* overrides,
the JAXCLF_* environment layer between them, YAML configs, and one-line did-you-mean errors.
(The kill -9 test in tests/test_train.py trains through the same entry point.)"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(args, env=None):
  clean = {k: v for k, v in os.environ.items() if not k.startswith("JAXCLF_")}
  return subprocess.run([sys.executable, "-m", "jaxclf.main", *args, "--print_config"],
                        capture_output=True, text=True, cwd=ROOT,
                        env={**clean, "JAX_PLATFORMS": "cpu", **(env or {})})


def test_config_arg_flag_overrides_and_environment_in_order():
  # file -> environment -> command line: the CLI's learning rate beats the environment's.
  out = _main(["--config=configs/resnet.py:model=resnet18",
               "--config.optimizer.learning_rate=0.05", "--config.periodic.log=10%"],
              env={"JAXCLF_OPTIMIZER__LEARNING_RATE": "0.3", "JAXCLF_TRAIN__BATCH_SIZE": "64"})
  assert out.returncode == 0, out.stderr
  c = json.loads(out.stdout)
  assert c["model"]["name"] == "resnet18" and c["model"]["kwargs"]["num_filters"] == 64
  assert c["optimizer"]["learning_rate"] == 0.05
  assert c["train"]["batch_size"] == 64 and c["periodic"]["log"] == "10%"


def test_yaml_config_and_same_values_as_jaxclf_train_set():
  from jaxclf.config import load_config
  out = _main(["--config=configs/cnn.yaml", "--config.data.on_device=false",
               "--config.train.num_epochs=3"])
  assert out.returncode == 0, out.stderr
  via_set = load_config(f"{ROOT}/configs/cnn.yaml", ["data.on_device=false", "train.num_epochs=3"],
                        environ={})
  assert json.loads(out.stdout) == json.loads(json.dumps(via_set.to_dict(), default=list))


@pytest.mark.parametrize("args, env, message", [
    (["--config=configs/cnn.py", "--config.train.batch_sise=3"], {},
     "unknown config key 'train.batch_sise'. Did you mean train.batch_size?"),
    (["--config=configs/cnn.py"], {"JAXCLF_TRAIN__BATCH_SIZ": "3"},
     "environment variable JAXCLF_TRAIN__BATCH_SIZ: unknown config key 'train.batch_siz'. "
     "Did you mean train.batch_size?"),
    (["--config=configs/cnn.py:tinny"], {},
     "configs/cnn.py:tinny: arg variant='tinny' is not one of ['', 'quick', 'tiny', 'anchor']. "
     "Did you mean 'tiny'?"),
    (["--config=configs/cnn.py", "--config.train.log_every_steps=5"], {},
     "train.log_every_steps is now periodic.log"),
])
def test_errors_are_one_line_with_did_you_mean(args, env, message):
  out = _main(args, env)
  assert out.returncode == 2
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("jaxclf: error: "), out.stderr
  assert message in lines[0]
