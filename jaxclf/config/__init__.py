"""Run configuration: defaults, file/YAML/env/CLI loading, validation, name registries."""
from jaxclf.config.args import parse_arg
from jaxclf.config.defaults import default_config
from jaxclf.config.loading import load_config, set_dotted
from jaxclf.config.validate import ConfigError, validate

__all__ = ["ConfigError", "default_config", "load_config", "parse_arg", "set_dotted", "validate"]
