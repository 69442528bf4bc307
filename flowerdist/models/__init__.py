"""Model zoo: `create_model(name, num_classes, ...)` and `list_models()`.

Scratch models (seed_resnet, resnet18..152) register on import below; `timm/<name>` goes to timm.
"""

from flowerdist.models import resnet, seed  # noqa: F401  (registers the scratch models)
from flowerdist.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
