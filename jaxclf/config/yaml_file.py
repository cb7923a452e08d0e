"""A Python config file that reads a YAML config: `python -m jaxclf.main --config=x.yaml` becomes
`--config=<this file>:x.yaml`, because ml_collections' config_flags loads Python files only."""
from jaxclf.config.loading import load_file


def get_config(arg=None):
  return load_file(arg)
