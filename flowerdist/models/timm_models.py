"""`timm/<name>`: any timm model, with pretrained weights that load offline or fail fast.

Without network timm retries the Hugging Face hub for about 46 s before failing with a stack trace.
Here weights come from `model.pretrained_file`, else the local HF cache (tried with the hub forced
offline), else the hub, and only after a 3 s reachability probe says it can be reached.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import socket
import threading
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
import torch.nn as nn

from flowerdist.errors import FlowerdistError

PROBE_TIMEOUT_S = 3.0
_HUB_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:")


def create_timm_model(
    name: str, num_classes: int, *, pretrained: bool = False, pretrained_file: str | None = None
) -> nn.Module:
    """timm.create_model(name) with a `num_classes` head; weights as the module docstring says."""
    check_name(name)
    if not pretrained:
        if pretrained_file:
            raise FlowerdistError(
                f"model.pretrained_file={pretrained_file} is set but model.pretrained=false: "
                f"set model.pretrained=true to load it, or drop model.pretrained_file"
            )
        return timm.create_model(name, num_classes=num_classes)
    if pretrained_file:
        return _from_file(name, num_classes, pretrained_file)
    return _from_hub(name, num_classes)


def _suggest(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    return f"did you mean {' or '.join('timm/' + c for c in close)}? " if close else ""


def check_name(name: str) -> None:
    """Unknown architectures and unknown pretrained tags (`resnet18.foo`) fail with the closest names."""
    if name.startswith(_HUB_PREFIXES):
        return
    if not timm.is_model(name):
        raise FlowerdistError(
            f"unknown timm model in model.name=timm/{name}: {_suggest(name, timm.list_models())}"
            f"pick a name from timm.list_models()"
        )
    try:
        timm.models.get_pretrained_cfg(name)
    except RuntimeError:  # the architecture exists but the tag after the dot does not
        arch, tag = name.split(".", 1)
        tagged = sorted(timm.models.get_arch_pretrained_cfgs(arch)) or [arch]
        raise FlowerdistError(
            f"model.name=timm/{name}: {arch} has no pretrained tag '{tag}': {_suggest(name, tagged)}"
            f"use one of {', '.join('timm/' + t for t in tagged)}"
        ) from None


def _from_file(name: str, num_classes: int, pretrained_file: str) -> nn.Module:
    """Backbone from a local .pth/.safetensors file, then a new head for `num_classes`.

    The file is loaded with the head it was saved with (the pretrained cfg's class count), because
    timm loads non-strictly as soon as the class counts differ, and would then silently keep random
    weights for every layer the file lacks (resnet18 weights into a resnet34, say).
    """
    path = Path(pretrained_file).expanduser()
    if not path.is_file():
        raise FlowerdistError(
            f"model.pretrained_file={pretrained_file} does not exist: point model.pretrained_file at a "
            f".pth or .safetensors weights file for timm/{name}"
        )
    if name.startswith(_HUB_PREFIXES):  # the class count lives in the hub's config: let timm handle it
        file_classes = num_classes
    else:  # an architecture without pretrained cfgs gets timm's default, 1000 classes
        cfg = timm.models.get_pretrained_cfg(name)
        file_classes = cfg.num_classes if cfg is not None and cfg.num_classes is not None else 1000
    try:
        model = timm.create_model(
            name, pretrained=True, num_classes=file_classes, pretrained_cfg_overlay=dict(file=str(path))
        )
    except Exception as e:  # unreadable file, wrong architecture: every failure here is the file's
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise FlowerdistError(
            f"model.pretrained_file={pretrained_file} cannot be loaded into timm/{name} "
            f"({type(e).__name__}: {first_line}): "
            f"point model.pretrained_file at weights saved from timm/{name} with {file_classes} classes"
        ) from e
    if file_classes != num_classes:
        model.reset_classifier(num_classes)
    return model


def _from_hub(name: str, num_classes: int) -> nn.Module:
    """Local caches first (no network touched), then the network only if a short probe reaches it."""
    cfg = None if name.startswith(_HUB_PREFIXES) else timm.models.get_pretrained_cfg(name)
    if not name.startswith(_HUB_PREFIXES) and (cfg is None or not (cfg.hf_hub_id or cfg.url)):
        raise FlowerdistError(
            f"timm/{name} has no pretrained weights: set model.pretrained=false, give model.pretrained_file, "
            f"or pick a model from timm.list_models(pretrained=True)"
        )
    from huggingface_hub import constants

    if cfg is None or cfg.hf_hub_id:  # timm prefers the hub whenever the model has a hub id
        try:
            with _hf_offline():
                return timm.create_model(name, pretrained=True, num_classes=num_classes)
        except OSError:  # LocalEntryNotFoundError / OfflineModeIsEnabled: not in the local HF cache
            pass
        url = constants.ENDPOINT
        where = f"the Hugging Face cache ({constants.HF_HUB_CACHE})"
        fetch = f"`hf download {cfg.hf_hub_id if cfg else name.split(':', 1)[1]}` on a machine with network"
        if constants.HF_HUB_OFFLINE:  # the user asked for no network: the hub's own error would be a traceback
            raise FlowerdistError(
                f"pretrained weights for timm/{name} are not in {where} and HF_HUB_OFFLINE is set: "
                f"set model.pretrained_file=/path/to/weights.safetensors, or pre-download them ({fetch})"
            )
    else:  # URL-only weights go through torch.hub's cache, which loads offline when the file is there
        url = cfg.url
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
        if cached.is_file():
            return timm.create_model(name, pretrained=True, num_classes=num_classes)
        where = f"the torch hub cache ({cached.parent})"
        fetch = f"download {url} into {cached.parent}"
    if not _reachable(url):
        raise FlowerdistError(
            f"pretrained weights for timm/{name} are not in {where} and {urlparse(url).hostname} is unreachable: "
            f"set model.pretrained_file=/path/to/weights.safetensors, or pre-download them ({fetch})"
        )
    return timm.create_model(name, pretrained=True, num_classes=num_classes)


@contextlib.contextmanager
def _hf_offline():
    """HF_HUB_OFFLINE=1 for the duration; huggingface_hub reads the env var only at import, so set both."""
    from huggingface_hub import constants

    old_env, old_const = os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old_const
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


def _reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """One TCP connect to the host (or its proxy), DNS included, bounded by `timeout` seconds."""
    target = urlparse(url)
    proxy = urllib.request.getproxies().get(target.scheme)
    if proxy and not urllib.request.proxy_bypass(target.hostname or ""):
        target = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    port = target.port or (443 if target.scheme == "https" else 80)
    ok: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((target.hostname, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    probe = threading.Thread(target=connect, daemon=True)  # a thread, so a hanging DNS lookup is bounded too
    probe.start()
    probe.join(timeout)
    return bool(ok)
