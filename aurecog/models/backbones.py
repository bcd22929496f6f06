"""Backbones from timm, and their ImageNet initialisation.

``create_backbone(name, pretrained, pretrained_file, pretrained_tag, **timm_kwargs)`` returns a timm model without
its classifier (pooled features) and the feature width. The ``backbone`` section of a model config holds these keys:

* ``pretrained: true`` initialises from ImageNet weights (the papers' and authors' initialisation, see the
  model configs' ``profiles.paper``); ``false`` trains from scratch (the quick profile's narrow ResNets).
* ``pretrained_tag`` (default ``tv_in1k``): the timm hub tag. ``tv_in1k`` are torchvision's original ImageNet
  weights, i.e. what ``torchvision.models.resnet34(pretrained=True)`` loads (CISNet's and IERN's authors).
* ``pretrained_file``: a local state dict (``.pth``/``.pt``/``.bin``/``.safetensors``) used instead of the hub. It may
  be in timm's, torchvision's (``resnet34-b627a593.pth``) or the CISNet authors' ``Sequential(*children()[:-1])``
  layout (:func:`to_timm_resnet_keys`); the classifier is dropped; every other tensor must match by name and shape.
  ``{name}`` in the path is replaced by ``backbone.name`` (so one quick-profile entry serves the variants that change
  the trunk, e.g. CISNet's ResNet-18/34/50 rows); a relative path is relative to the repository root. The quick
  profiles point it at the SynthAU-pretrained trunks of ``pretrained/synthau/`` (:mod:`aurecog.pretrain`,
  ``make pretrain``).

Every ``*pretrained_file`` key of a cell config (:func:`pretrained_files`; also ``ac2d.pretrained_file``) names
weights whose sha256 is part of the cell's identity (:mod:`aurecog.runner.identity`).

Where the weights come from (:func:`resolve_pretrained`), first match wins:

1. ``backbone.pretrained_file``;
2. ``$AURECOG_PRETRAINED_DIR/<name>.<tag>.{safetensors,pth}``, ``<name>.{safetensors,pth}`` or torchvision's file
   name of the weights (:data:`TORCHVISION_FILES`): the way to provision an offline cluster once;
3. the Hugging Face hub cache (``timm/<name>.<tag>``), which needs no network;
4. the hub itself, unless ``HF_HUB_OFFLINE`` is set, and only if a HEAD request for the file succeeds within
   :data:`HUB_PROBE_TIMEOUT_S` (in a daemon thread: a stalled DNS lookup or a silent proxy cannot hang the run).

:func:`check_pretrained` applies this to a resolved cell config before anything trains (the grid runner calls it
for every cell); when nothing is available it raises :class:`PretrainedUnavailable` with one line naming the
options. In the hub case it downloads the file into the cache once, so parallel cells read the cache.
Why this policy: the file and cache steps never touch the network (reproducible, offline-safe); the probe is
bounded, so a machine without network fails in seconds with the fix in the message instead of inside a cell.

Loading a trained checkpoint (:meth:`aurecog.models.base.AUModel.load_from_checkpoint`) builds the network inside
:func:`no_pretrained`: its weights come from the checkpoint, so no ImageNet file or network is needed then.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from contextvars import ContextVar
from pathlib import Path

import timm
import torch
from timm.models.resnet import ResNet
from torch import nn

from aurecog.config import REPO_ROOT

log = logging.getLogger(__name__)

DEFAULT_TAG = "tv_in1k"  # torchvision's ImageNet-1k weights (timm hub copies of download.pytorch.org files)
ENV_DIR = "AURECOG_PRETRAINED_DIR"
HUB_HOST = "huggingface.co"
HUB_PROBE_TIMEOUT_S = 3.0
#: torchvision's file names of the ImageNet weights that ``tv_in1k`` copies (V1 weights; the older hashes are the
#: same weights saved earlier), looked up in ``$AURECOG_PRETRAINED_DIR`` and torch hub's checkpoint folder.
TORCHVISION_FILES = {
    "resnet18": ("resnet18-f37072fd.pth", "resnet18-5c106cde.pth"),
    "resnet34": ("resnet34-b627a593.pth", "resnet34-333f7ec4.pth"),
    "resnet50": ("resnet50-0676ba61.pth", "resnet50-19c8e357.pth"),
    "resnet101": ("resnet101-63fe2227.pth", "resnet101-5d3b4d8f.pth"),
}
#: CISNet authors' trunk ``nn.Sequential(*resnet.children()[:-1])``: child index -> torchvision/timm name.
SEQUENTIAL_CHILDREN = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}
CLASSIFIER_PREFIXES = ("fc.", "head.fc.", "classifier.")
#: where ``make pretrain`` writes the SynthAU-pretrained trunks (aurecog/pretrain.py)
SYNTH_PRETRAINED_DIR = "pretrained/synthau"

_SKIP_PRETRAINED: ContextVar[bool] = ContextVar("aurecog_skip_pretrained", default=False)


class PretrainedUnavailable(RuntimeError):
    """ImageNet weights were asked for (``backbone.pretrained: true``) and none can be had."""


@contextlib.contextmanager
def no_pretrained():
    """Build backbones without loading ImageNet weights (their weights are about to be overwritten)."""
    token = _SKIP_PRETRAINED.set(True)
    try:
        yield
    finally:
        _SKIP_PRETRAINED.reset(token)


def loading_skipped() -> bool:
    """True inside :func:`no_pretrained` (the weights come from a checkpoint): builders skip their weight files."""
    return _SKIP_PRETRAINED.get()


def create_backbone(name: str = "resnet18", pretrained: bool = False, pretrained_file: str | None = None,
                    pretrained_tag: str | None = None, **kwargs) -> tuple[nn.Module, int]:
    """A timm model without its classifier, returning pooled features; and their dimension.

    Extra ``kwargs`` go to the timm constructor, e.g. ``channels=[16, 32, 64, 128]`` for the
    narrow ResNets of the quick CPU profile. ``pretrained``/``pretrained_file``/``pretrained_tag``: module docstring.
    """
    if "channels" in kwargs and kwargs["channels"] is not None:
        kwargs["channels"] = tuple(kwargs["channels"])
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    _check_stem_width(name, model, kwargs.get("stem_width"))
    if (pretrained or pretrained_file) and not _SKIP_PRETRAINED.get():
        source = resolve_pretrained(name, pretrained_file, pretrained_tag, probe=False)
        if isinstance(source, Path):
            load_pretrained_file(model, source)
        else:  # hub: timm downloads (or reads the cache) and drops the classifier
            model = timm.create_model(source, pretrained=True, num_classes=0, **kwargs)
        model.pretrained_source = str(source)
        log.info("backbone %s initialised from %s", name, source)
    return model, model.num_features


# ---------------------------------------------------------------------------------------------------------------
def wants_pretrained(backbone_cfg: dict | None) -> bool:
    b = backbone_cfg or {}
    return bool(b.get("pretrained") or b.get("pretrained_file"))


def check_pretrained(cfg: dict) -> None:
    """Raise :class:`PretrainedUnavailable` (one line naming the options) unless the ImageNet weights a resolved
    cell config asks for can be loaded; fetch them into the hub cache when only the hub has them. Fast and
    offline-safe: no network access unless nothing local exists, then one bounded probe."""
    for key, path in pretrained_files(cfg).items():  # every local weights file (backbone and others) exists
        if not path.is_file():
            raise PretrainedUnavailable(missing_file_message(key, path))
    b = cfg.get("backbone") or {}
    if not wants_pretrained(b):
        return
    source = resolve_pretrained(b.get("name", "resnet18"), b.get("pretrained_file"), b.get("pretrained_tag"),
                                probe=True)
    if isinstance(source, str):
        _download(source)


def resolve_pretrained(name: str, pretrained_file: str | None = None, tag: str | None = None,
                       probe: bool = True) -> Path | str:
    """A local file (Path), or the timm hub name ``<name>.<tag>`` (str); the order is in the module docstring.
    ``probe=False`` skips the network probe (inside a cell, after :func:`check_pretrained` has run)."""
    tag = tag or DEFAULT_TAG
    if pretrained_file:
        path = resolve_file(pretrained_file, name)
        if not path.is_file():
            raise PretrainedUnavailable(missing_file_message("backbone.pretrained_file", path, name))
        return path
    local = _find_local(name, tag)
    if local is not None:
        return local
    hub_name = f"{name}.{tag}"
    if _in_hub_cache(hub_name) or not probe:
        return hub_name
    if _hub_offline():
        reason = "HF_HUB_OFFLINE is set"
    elif not _hub_reachable(_hub_url(hub_name)):
        reason = f"{HUB_HOST} cannot be reached (a {HUB_PROBE_TIMEOUT_S:g} s probe failed)"
    else:
        return hub_name
    tv = TORCHVISION_FILES.get(name, ("<file>.pth",))[0]
    raise PretrainedUnavailable(
        f"backbone {name}: ImageNet weights (backbone.pretrained: true, timm '{hub_name}') are not cached and "
        f"{reason}; set backbone.pretrained_file=PATH (e.g. torchvision's {tv}), or put the file in ${ENV_DIR}, or "
        "set backbone.pretrained=false to train from scratch")


def resolve_file(value: str | os.PathLike, name: str | None = None) -> Path:
    """A ``pretrained_file`` value as a path: ``~`` and ``$VARS`` expanded, ``{name}`` -> ``name`` (the backbone's
    timm name), relative paths taken from the repository root (cells run from any directory)."""
    text = os.path.expandvars(os.path.expanduser(str(value)))
    if "{name}" in text:
        if not name:
            raise ValueError(f"pretrained_file={value!r} uses {{name}} but the section has no name")
        text = text.replace("{name}", str(name))
    path = Path(text)
    return path if path.is_absolute() else REPO_ROOT / path


def pretrained_files(cfg: dict) -> dict[str, Path]:
    """Every local weights file a resolved cell config initialises from: dotted key -> path, for each non-empty
    key named ``pretrained_file`` (``backbone.pretrained_file``, ``ac2d.pretrained_file``, ...), with
    :func:`resolve_file` applied (``{name}`` from the same section's ``name``)."""
    out: dict[str, Path] = {}

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif k == "pretrained_file" and v:
                out[f"{prefix}{k}"] = resolve_file(v, d.get("name"))

    walk({k: v for k, v in cfg.items() if k != "slurm"}, "")
    return out


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def missing_file_message(key: str, path: Path, name: str | None = None) -> str:
    """One line for a weights file that does not exist: ``make pretrain`` for the SynthAU trunks, else the
    ImageNet file to point the key at."""
    try:
        synth = path.resolve().is_relative_to((REPO_ROOT / SYNTH_PRETRAINED_DIR).resolve())
    except OSError:
        synth = False
    if synth:
        return (f"{key}={str(path)!r} does not exist; run `make pretrain` (SynthAU trunk pretraining, "
                f"aurecog/pretrain.py) to write the quick profile's pretrained trunks, or set {key}=null to train "
                "from scratch")
    tv = TORCHVISION_FILES.get(name or "", ("<file>.pth",))[0]
    return (f"{key}={str(path)!r} does not exist; point it at a {name or 'trunk'} ImageNet state dict (torchvision "
            f"or timm layout, e.g. {tv})")


def _find_local(name: str, tag: str) -> Path | None:
    tv = TORCHVISION_FILES.get(name, ()) if tag == DEFAULT_TAG else ()
    candidates = []
    if os.environ.get(ENV_DIR):
        d = Path(os.environ[ENV_DIR]).expanduser()
        names = [f"{name}.{tag}.safetensors", f"{name}.{tag}.pth"]
        if tag == DEFAULT_TAG:
            names += [f"{name}.safetensors", f"{name}.pth", *tv]
        candidates += [d / n for n in names]
    candidates += [Path(torch.hub.get_dir()) / "checkpoints" / n for n in tv]  # where torchvision caches them
    return next((p for p in candidates if p.is_file()), None)


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_url(hub_name: str) -> str:
    repo, files = _hub_files(hub_name)
    return f"https://{HUB_HOST}/{repo}/resolve/main/{files[0]}"


def _hub_reachable(url: str, timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """One HTTP HEAD request for the weights file, in a daemon thread joined with ``timeout`` (so neither DNS nor a
    proxy that accepts connections and never answers can hang the caller)."""
    import urllib.request

    ok = []

    def probe():
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout) as r:
                ok.append(r.status < 400)
        except Exception:  # any failure (DNS, refused, TLS, HTTP error) means: not reachable
            ok.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok and ok[0])


def _hub_files(hub_name: str) -> tuple[str, tuple[str, ...]]:
    cfg = timm.models.get_pretrained_cfg(hub_name)
    if cfg is None or not cfg.hf_hub_id:
        raise PretrainedUnavailable(f"timm has no hub weights named {hub_name!r}; set backbone.pretrained_tag "
                                    f"(e.g. {DEFAULT_TAG}) or backbone.pretrained_file=PATH")
    return cfg.hf_hub_id, ("model.safetensors", "pytorch_model.bin")


def _in_hub_cache(hub_name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        return False
    repo, files = _hub_files(hub_name)
    return any(isinstance(try_to_load_from_cache(repo, f), str) for f in files)


def _download(hub_name: str) -> None:
    from huggingface_hub import hf_hub_download

    repo, files = _hub_files(hub_name)
    try:
        hf_hub_download(repo, files[0])
    except Exception as e:  # one line with the fix instead of a traceback from deep inside the hub client
        raise PretrainedUnavailable(f"could not download {repo}/{files[0]} ({type(e).__name__}); set "
                                    "backbone.pretrained_file=PATH or backbone.pretrained=false") from e


# ---------------------------------------------------------------------------------------------------------------
def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):  # training checkpoints wrap the weights
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: not a state dict (got {type(sd).__name__})")
    return sd


def to_timm_resnet_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a ResNet state dict into timm's names and drop its classifier.

    torchvision's and timm's ResNets use the same parameter names (``conv1``, ``bn1``, ``layer{1-4}.{i}.conv1``,
    ``...downsample.{0,1}``, ``fc``); the CISNet authors' ``nn.Sequential(*resnet34.children()[:-1])`` numbers the
    children (0 conv1, 1 bn1, 4-7 layer1-4). A common ``module.``/``backbone.`` prefix (DDP, wrappers) is removed.
    """
    keys = list(sd)
    for prefix in ("module.", "backbone.", "trunk."):
        if keys and all(k.startswith(prefix) for k in keys):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
            keys = list(sd)
    if keys and all(k.split(".", 1)[0].isdigit() for k in keys):
        out = {}
        for k, v in sd.items():
            head, rest = k.split(".", 1)
            if head in SEQUENTIAL_CHILDREN:
                out[f"{SEQUENTIAL_CHILDREN[head]}.{rest}"] = v
        sd = out
    return {k: v for k, v in sd.items() if not k.startswith(CLASSIFIER_PREFIXES)}


def load_pretrained_file(model: nn.Module, path: str | Path) -> None:
    """Load a local ImageNet state dict into ``model`` (a timm backbone without classifier); every tensor of the
    model must be in the file with the same shape, and nothing but the classifier may be left over."""
    sd = read_state_dict(path)
    if isinstance(model, ResNet):
        sd = to_timm_resnet_keys(sd)
    sd = {k: v for k, v in sd.items() if not k.startswith(CLASSIFIER_PREFIXES)}
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shape = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shape:
        raise ValueError(
            f"{path}: does not fit backbone {type(model).__name__} ({len(missing)} missing, e.g. {missing[:3]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:3]}; {len(shape)} of another shape, e.g. {shape[:3]}); "
            "backbone.pretrained_file must hold ImageNet weights of backbone.name with default widths")
    model.load_state_dict({k: sd[k].to(own[k].dtype) for k in own})


def _check_stem_width(name: str, model: nn.Module, stem_width: int | None) -> None:
    """timm's ResNets accept ``stem_width`` but use it only for deep stems: the default 7x7 stem is 64 channels
    whatever it says. Refuse the silently ignored value instead of training a different network than asked."""
    if stem_width is None or not isinstance(model, ResNet) or not isinstance(model.conv1, nn.Conv2d):
        return
    if model.conv1.out_channels != stem_width:
        raise ValueError(
            f"backbone {name!r}: stem_width={stem_width} has no effect on timm's single 7x7 stem, which has "
            f"{model.conv1.out_channels} channels; remove stem_width from the backbone config, or set "
            "stem_type: deep (three 3x3 convolutions whose width it sets)")
