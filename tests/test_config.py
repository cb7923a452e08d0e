import pytest

from jaxclf.config import ConfigError, default_config, load_config, validate


def test_yaml_twin_matches_python_config(repo_root):
  py = load_config(f"{repo_root}/configs/cnn.py", environ={})
  yml = load_config(f"{repo_root}/configs/cnn.yaml", environ={})
  assert py.to_dict() == yml.to_dict()


def test_cli_and_env_overrides_apply_in_order(repo_root):
  c = load_config(f"{repo_root}/configs/cnn.py",
                  overrides=["--config.optimizer.learning_rate=0.05", "train.num_epochs=3"],
                  environ={"JAXCLF_TRAIN__BATCH_SIZE": "128", "JAXCLF_OPTIMIZER__LEARNING_RATE": "0.3",
                           "JAXCLF_SEED": "7"})
  assert c.train.batch_size == 128 and c.seed == 7
  assert c.optimizer.learning_rate == 0.05  # command line beats environment
  assert c.train.num_epochs == 3


def test_config_arg_selects_variant(repo_root):
  c = load_config(f"{repo_root}/configs/resnet.py:model=resnet34,width=16", environ={})
  assert c.model.name == "resnet34" and c.model.kwargs.num_filters == 16


@pytest.mark.parametrize("override, message", [
    ("train.batch_sise=3", "unknown config key 'train.batch_sise'. Did you mean train.batch_size?"),
    ("optimiser.name=sgd", "unknown config key 'optimiser'. Did you mean optimizer?"),
    ("train.batch_size=abc", "train.batch_size: expected an integer, got 'abc'"),
    ("train.batch_size=0", "train.batch_size: 0 is out of range"),
    ("optimizer.learning_rate=-1", "optimizer.learning_rate: -1.0 is out of range"),
    ("optimizer.name=adamx", "optimizer.name: 'adamx' is not one of ['adam', 'adamw', 'sgd']. Did you mean 'adam'"),
    ("schedule.name=cosine", "schedule.name: 'cosine' is not one of"),
    ("model.name=resnet19", "model.name: unknown model 'resnet19'. Did you mean"),
    ("train.tta_flip=maybe", "train.tta_flip: expected true/false"),
    ("data.channels=3", "preprocessing.mean: needs 3 value(s) for data.channels=3"),
])
def test_validation_names_the_field(repo_root, override, message):
  with pytest.raises(ConfigError) as e:
    load_config(f"{repo_root}/configs/cnn.py", overrides=[override], environ={})
  assert message in str(e.value)


def test_env_override_error_names_the_variable(repo_root):
  with pytest.raises(ConfigError, match="JAXCLF_TRAIN__BATCH_SIZ.*Did you mean train.batch_size"):
    load_config(f"{repo_root}/configs/cnn.py", environ={"JAXCLF_TRAIN__BATCH_SIZ": "3"})


def test_yaml_unknown_key_and_bad_yaml(tmp_path):
  p = tmp_path / "c.yaml"
  p.write_text("train:\n  epochs: 3\n")
  with pytest.raises(ConfigError, match="unknown config key 'train.epochs'. Did you mean train.num_epochs"):
    load_config(str(p), environ={})
  p.write_text("train: [1, 2\n")
  with pytest.raises(ConfigError, match="not valid YAML"):
    load_config(str(p), environ={})


def test_custom_model_by_import_path_validates():
  c = default_config()
  c.model.name = "jaxclf.models.cnn:CNN"
  validate(c)
  c.model.name = "jaxclf.models.cnn:Nope"
  with pytest.raises(ConfigError, match="has no attribute 'Nope'"):
    validate(c)


def test_missing_config_file():
  with pytest.raises(ConfigError, match="does not exist"):
    load_config("configs/nope.py", environ={})


def test_name_registries_match_the_implementations():
  """config/names.py lists what the trainer and the model registry implement, argument for argument."""
  import dataclasses
  from jaxclf.config.names import MODEL_ARGS, OPTIMIZER_NAMES, SCHEDULE_NAMES
  from jaxclf.models.registry import model_names, resolve_model
  from jaxclf.train.optimizers import OPTIMIZERS
  from jaxclf.train.schedules import SCHEDULES
  assert sorted(OPTIMIZERS) == sorted(OPTIMIZER_NAMES)
  assert sorted(SCHEDULES) == sorted(SCHEDULE_NAMES)
  assert sorted(model_names()) == sorted(MODEL_ARGS)
  for name in model_names():
    cls = getattr(resolve_model(name), "func", resolve_model(name))
    fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name", "num_classes"}
    assert fields == set(MODEL_ARGS[name]), name


def test_config_is_a_foundation():
  """Validating a config imports neither the trainer nor jaxclf's model constructors."""
  import subprocess
  import sys
  code = ("import sys; from jaxclf.config import load_config; "
          "load_config('configs/cnn.py', ['model.name=resnet18', 'model.kwargs={}', 'optimizer.name=adam'], environ={}); "
          "bad = [m for m in sys.modules if m.startswith(('jaxclf.train', 'jaxclf.models', 'flax', "
          "'optax', 'jaxclf.sweeps'))]; print(bad); sys.exit(bool(bad))")
  root = __import__("os").path.dirname(__import__("os").path.dirname(__file__))
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
  assert out.returncode == 0, out.stdout + out.stderr


def test_one_cycle_cos_follows_pytorch_one_cycle_lr():
  """anneal='cos' is PyTorch's OneCycleLR(max_lr, pct_start, div_factor=25, final_div_factor=1e4,
  anneal_strategy='cos'): starts at peak/25, peaks after the warmup share, ends at peak/25/1e4,
  and follows a half-cosine in between (values from its closed form)."""
  import math
  from jaxclf.config import default_config
  from jaxclf.train.schedules import create_learning_rate_fn
  c = default_config()
  c.optimizer.learning_rate, c.schedule.name, c.schedule.anneal = 0.2, "one_cycle", "cos"
  c.schedule.warmup_fraction = 0.25
  lr = create_learning_rate_fn(c, 10, 1000)
  initial, peak, final = 0.2 / 25, 0.2, 0.2 / 25 / 1e4
  cos_mix = lambda a, b, t: b + (a - b) * (1 + math.cos(math.pi * t)) / 2
  assert abs(float(lr(0)) - initial) < 1e-7
  assert abs(float(lr(250)) - peak) < 1e-6
  assert abs(float(lr(125)) - cos_mix(initial, peak, 0.5)) < 1e-4
  assert abs(float(lr(625)) - cos_mix(peak, final, 0.5)) < 1e-4
  assert float(lr(1000)) < 1e-5
  c.schedule.anneal = "linear"
  assert abs(float(create_learning_rate_fn(c, 10, 1000)(125)) - (initial + peak) / 2) < 1e-4


def test_other_components_jaxclf_variables_are_not_config_overrides(repo_root):
  """JAXCLF_REGISTRY, JAXCLF_SERVE_*, JAXCLF_ONEDNN* ... in a training process's environment are
  left to their components; SECTION__KEY names and top-level keys still override (and a misspelt
  SECTION__KEY still fails, test above)."""
  from jaxclf.config import load_config
  c = load_config(f"{repo_root}/configs/cnn.py", environ={
      "JAXCLF_REGISTRY": "/tmp/reg", "JAXCLF_SERVE_API_KEY": "k", "JAXCLF_ONEDNN": "0",
      "JAXCLF_LOGLEVEL": "debug", "JAXCLF_SEED": "5", "JAXCLF_TRAIN__NUM_EPOCHS": "2"})
  assert (c.seed, c.train.num_epochs) == (5, 2)


def test_parse_arg_is_the_one_config_argument_parser(repo_root):
  """big_vision's parse_arg convention: k=v pairs, one bare value for the first key, a bare
  boolean name for true; typed by the defaults; did-you-mean for unknown args and choices."""
  import glob
  from jaxclf.config import parse_arg
  a = parse_arg("width=32,fast", model="resnet18", width=64, fast=False)
  assert (a.model, a.width, a.fast) == ("resnet18", 32, True)
  assert parse_arg("resnet34", model="resnet18", width=64).model == "resnet34"
  assert parse_arg("fast", model="resnet18", fast=False).fast is True
  assert parse_arg(None, model="resnet18").model == "resnet18"
  with pytest.raises(ConfigError, match="unknown arg 'widht'. Did you mean 'width'"):
    parse_arg("widht=3", model="resnet18", width=64)
  with pytest.raises(ConfigError, match="arg width='x': expected int"):
    parse_arg("width=x", width=64)
  with pytest.raises(ConfigError, match=r"is not one of \['a', 'b'\]"):
    parse_arg("c", v="a", choices={"v": ("a", "b")})
  for path in glob.glob(f"{repo_root}/configs/*.py"):
    assert "parse_arg(arg" in open(path).read(), path  # every config file uses it
  assert load_config(f"{repo_root}/configs/vgg.py:vgg16", environ={}).model.name == "vgg16"
  assert load_config(f"{repo_root}/configs/efficientnet.py:b0", environ={}).model.name == (
      "efficientnet_b0")


@pytest.mark.parametrize("override, message", [
    ("periodic.log=5", "periodic.log: '5' is not a periodic rule"),
    ("evals.val.when=end", "evals.val: early_stopping.metric selects by it"),
    ("evals.test.when=sometimes", "evals.test.when: 'sometimes' is not a periodic rule"),
    ("train.checkpoint_every_steps=5", "train.checkpoint_every_steps is now periodic.checkpoint"),
])
def test_periodic_rules_and_evaluators_validate(repo_root, override, message):
  with pytest.raises(ConfigError) as e:
    load_config(f"{repo_root}/configs/cnn.py", overrides=[override], environ={})
  assert message in str(e.value)


def test_a_model_switch_names_every_leftover_kwarg(repo_root):
  """configs/cnn.py's kwargs don't fit a ResNet: one error names each of them, not the first."""
  cnn = load_config(f"{repo_root}/configs/cnn.py", environ={}).model.kwargs
  with pytest.raises(ConfigError) as e:
    load_config(f"{repo_root}/configs/cnn.py", overrides=["model.name=resnet18"], environ={})
  leftover = sorted(set(cnn) - {"stem"})  # ResNets take a stem too
  assert len(leftover) >= 2
  assert str(e.value).startswith(", ".join(f"model.kwargs.{k}" for k in leftover) + ": ")
  assert "model 'resnet18' takes no argument " + ", ".join(map(repr, leftover)) in str(e.value)
  assert "model.kwargs={} drops them" in str(e.value)


def test_an_unknown_evaluator_field_is_named(repo_root):
  c = load_config(f"{repo_root}/configs/cnn.py", environ={})
  c.evals.val.tta = True
  with pytest.raises(ConfigError, match="evals.val.tta: evaluator type 'classification' takes no "
                                        "field 'tta'"):
    validate(c)
