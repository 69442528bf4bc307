"""Name -> model constructor, in the style of timm's registry.

Scratch models register themselves with `@register_model`; names starting with `timm/` are
handed to timm. One entry point, `create_model`, turns the config's `model.*` keys into a module.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Callable

import torch.nn as nn

from flowerdist.errors import FlowerdistError

TIMM_PREFIX = "timm/"

_ENTRYPOINTS: dict[str, Callable[..., nn.Module]] = {}
_OPTIONS: dict[str, frozenset[str] | None] = {}  # None: the entry point takes **kwargs, i.e. every option


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register `fn` under its own name.

    The entry point's own signature says which options it takes: `create_model` passes it
    `num_classes` (which it must accept) and those of `shortcut`, `image_size`, `init_weights` it
    names. An entry point that cannot take `num_classes` is refused here, at import.
    """
    params = inspect.signature(fn).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if "num_classes" not in params and not takes_all:
        raise TypeError(f"model entry point {fn.__module__}.{fn.__name__} must accept num_classes")
    _ENTRYPOINTS[fn.__name__] = fn
    _OPTIONS[fn.__name__] = None if takes_all else frozenset(params)
    return fn


def list_models() -> list[str]:
    """The registered scratch models, then a hint that any timm model works behind `timm/`."""
    return sorted(_ENTRYPOINTS) + [TIMM_PREFIX + "<any timm model name>"]


def create_model(
    name: str,
    num_classes: int = 5,
    *,
    shortcut: str = "B",
    pretrained: bool = False,
    pretrained_file: str | None = None,
    image_size: int = 224,
    init_weights: bool = True,
) -> nn.Module:
    """Build model `name` (a registered scratch name or `timm/<name>`) for `num_classes` classes.

    Scratch models take `shortcut`, `image_size` and `init_weights` where they use them; timm
    models take `pretrained` / `pretrained_file` (timm does its own init).
    """
    if name.startswith(TIMM_PREFIX):
        from flowerdist.models.timm_models import create_timm_model  # timm is slow to import

        return create_timm_model(
            name[len(TIMM_PREFIX):], num_classes, pretrained=pretrained, pretrained_file=pretrained_file
        )
    if name not in _ENTRYPOINTS:
        close = difflib.get_close_matches(name, list(_ENTRYPOINTS), n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise FlowerdistError(
            f"unknown model.name '{name}': {hint}choose one of {', '.join(sorted(_ENTRYPOINTS))} "
            f"or {TIMM_PREFIX}<any timm model name>"
        )
    if pretrained or pretrained_file:
        raise FlowerdistError(
            f"scratch model '{name}' has no pretrained weights: set model.pretrained=false and drop "
            f"model.pretrained_file, or use a timm model such as model.name={TIMM_PREFIX}resnet50"
        )
    options = {"num_classes": num_classes, "shortcut": shortcut, "image_size": image_size, "init_weights": init_weights}
    accepted = _OPTIONS[name]
    return _ENTRYPOINTS[name](**{k: v for k, v in options.items() if accepted is None or k in accepted})
