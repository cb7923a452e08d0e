"""Models chosen by name: `create_model('resnet18', num_classes=10)`, or 'pkg.module:ClassName'."""
from jaxclf.models.registry import MODELS, create_model, model_names, register_model

__all__ = ["MODELS", "create_model", "model_names", "register_model"]
