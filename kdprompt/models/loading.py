"""Create open_clip models from a :class:`ModelSpec`, and save their weights.

Three kinds of weights: none (random init, offline), a local file (read without pickle where
possible, strictly checked), or an open_clip tag (downloaded by open_clip on first use).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn

from kdprompt.errors import KdpromptError
from kdprompt.io import atomic_write, file_sha256
from kdprompt.models.spec import ModelSpec

CONFIGS_DIR = Path(__file__).parent / "configs"
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")

# Paths already handed to open_clip.add_model_config: each rescans every registered path, so
# registering once keeps resolution cheap.
_registered: set[Path] = set()


@dataclass
class LoadedClip:
    """An open_clip model with its transforms and tokenizer.

    Attributes:
        model: the CLIP model (eval mode, on the requested device and precision).
        preprocess_train: open_clip's training transform (random resized crop).
        preprocess_val: open_clip's evaluation transform (resize + centre crop).
        tokenizer: callable ``list[str] -> LongTensor (N, context_length)``.
        spec: the spec the model was created from.
        name: the model name as open_clip knows it (a JSON path resolves to its stem).
    """

    model: nn.Module
    preprocess_train: Callable[[Any], torch.Tensor]
    preprocess_val: Callable[[Any], torch.Tensor]
    tokenizer: Callable[..., torch.Tensor]
    spec: ModelSpec
    name: str


def available_kdprompt_models() -> list[str]:
    """Names of the model configs shipped with kdprompt (e.g. ``kd-tiny-teacher``)."""
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.json"))


def _register(path: Path) -> None:
    path = path.resolve()
    if path not in _registered:
        open_clip.add_model_config(path)
        _registered.add(path)


def _resolve_json_path(path: Path) -> str:
    if not path.is_file():
        raise KdpromptError(f"model config file {path} does not exist")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise KdpromptError(f"model config {path} is not readable JSON: {e}") from e
    missing = [
        k for k in ("embed_dim", "vision_cfg", "text_cfg") if not isinstance(cfg, dict) or k not in cfg
    ]
    if missing:
        raise KdpromptError(
            f"model config {path} is not an open_clip model config: missing {', '.join(missing)} "
            "(an open_clip config has embed_dim, vision_cfg and text_cfg)"
        )
    name = path.stem
    known = open_clip.get_model_config(name)
    # open_clip keys configs by file stem: refuse to silently replace a different config of that name.
    if known is not None and known != cfg and path.resolve() not in _registered:
        raise KdpromptError(
            f"model config {path} is named {name!r}, but open_clip already has a different config of "
            "that name; rename the file"
        )
    _register(path)
    return name


def resolve_model_name(name: str) -> str:
    """Return the name open_clip knows for ``name``, registering kdprompt's configs on first use.

    Args:
        name: an open_clip built-in config name, a kdprompt config name, or a path to a JSON config
            (registered under its file stem).

    Raises:
        KdpromptError: the name is unknown or the JSON file is missing or invalid.
    """
    _register(CONFIGS_DIR)
    path = Path(name).expanduser()
    if name.endswith(".json") or (os.sep in name and path.exists()):
        return _resolve_json_path(path)
    # open_clip accepts the OpenAI spelling "ViT-B/32" for "ViT-B-32".
    cleaned = name.replace("/", "-")
    if open_clip.get_model_config(cleaned) is not None:
        return cleaned
    raise KdpromptError(
        f"unknown model {name!r}. kdprompt configs: {', '.join(available_kdprompt_models())}; "
        "open_clip built-ins are listed by `python -c 'import open_clip; print(open_clip.list_models())'`; "
        "or give the path to an open_clip JSON model config"
    )


def _is_local_weights(pretrained: str) -> bool:
    return pretrained.lower().endswith(WEIGHT_SUFFIXES) or os.sep in pretrained or Path(pretrained).exists()


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict without pickle where possible (safetensors, or weights-only torch.load)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path), device="cpu")
        except Exception as e:
            raise KdpromptError(f"weights file {path} is not a readable safetensors file: {e}") from e
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise KdpromptError(
                f"weights file {path} could not be read safely (torch.load weights_only=True): {e}. "
                "Convert it to a state dict in .safetensors form (kdprompt.models.save_clip_weights)"
            ) from e
    if isinstance(obj, torch.jit.ScriptModule):
        # OpenAI's original checkpoints are TorchScript archives; torch.load dispatches to jit.load.
        obj = {
            k: v
            for k, v in obj.state_dict().items()
            if k not in ("input_resolution", "context_length", "vocab_size")
        }
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise KdpromptError(f"weights file {path} does not hold a state dict (name -> tensor)")
    # DDP/DataParallel checkpoints prefix every key with "module.".
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in obj.items()}


def _load_local_weights(model: nn.Module, path: Path, name: str) -> None:
    state_dict = _read_state_dict(path)
    # Reuse open_clip's conversions (third-party layouts, old text layout, resized position tables)
    # so that every file open_clip's own loader accepts is accepted here too.
    from open_clip.factory import convert_state_dict, resize_pos_embed, resize_text_pos_embed
    from open_clip.model import convert_to_custom_text_state_dict

    state_dict = convert_state_dict(model, state_dict)
    if "positional_embedding" in state_dict and not hasattr(model, "positional_embedding"):
        state_dict = convert_to_custom_text_state_dict(state_dict)
    for key in ("logit_scale", "logit_bias"):
        # Scalar vs 1-d logit scale/bias differ between open_clip versions.
        target = getattr(model, key, None)
        if key in state_dict and target is not None and state_dict[key].numel() == target.numel():
            state_dict[key] = state_dict[key].reshape(target.shape)
    if "logit_bias" not in state_dict and getattr(model, "logit_bias", None) is not None:
        state_dict["logit_bias"] = torch.zeros_like(model.logit_bias)  # SigLIP model from CLIP weights
    # Shapes too different to interpolate are reported by the strict check below.
    with contextlib.suppress(Exception):
        resize_pos_embed(state_dict, model)
        resize_text_pos_embed(state_dict, model)
    expected = set(model.state_dict())
    missing = sorted(expected - set(state_dict))
    unexpected = sorted(set(state_dict) - expected)
    own = model.state_dict()
    wrong_shape = sorted(
        k for k in expected & set(state_dict) if tuple(state_dict[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        if wrong_shape:
            examples = ", ".join(
                f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in wrong_shape[:3]
            )
            parts.append(f"{len(wrong_shape)} tensors of another shape (e.g. {examples})")
        raise KdpromptError(
            f"weights file {path} does not match model {name!r}: {'; '.join(parts)}. "
            "Check that `name` is the architecture these weights were trained with"
        )
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise KdpromptError(f"weights file {path} does not fit model {name!r}: {e}") from e


def _tag_error(name: str, tag: str, reason: str) -> KdpromptError:
    tags = open_clip.list_pretrained_tags_by_model(name)
    available = ", ".join(tags) if tags else "none"
    return KdpromptError(
        f"cannot load pretrained weights {tag!r} for model {name!r}: {reason}. "
        f"Tags open_clip knows for {name}: {available}. Tags are downloaded on first use and need the "
        "internet; without it, set `pretrained` to a local weights file (.safetensors/.pt/.pth/.bin)"
    )


@contextlib.contextmanager
def _no_random_init_warning() -> Iterator[None]:
    """Hide open_clip's "No pretrained weights loaded ... initialized randomly" while building a model
    whose weights kdprompt loads itself (or does not need)."""
    quiet = logging.Filter()
    quiet.filter = lambda record: not record.getMessage().startswith("No pretrained weights loaded")  # type: ignore[method-assign]
    logging.getLogger().addFilter(quiet)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(quiet)


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def _sha256_prefix(path: Path) -> str:
    """The first 12 hex digits of a file's sha256, computed once per (path, size, mtime) per process."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = file_sha256(path)[:12]
    return _SHA_CACHE[key]


def create_clip(spec: ModelSpec, device: str | torch.device = "cpu", load_weights: bool = True) -> LoadedClip:
    """Create the open_clip model described by ``spec``.

    Args:
        spec: architecture, weights and precision.
        device: where the model lives.
        load_weights: with False, build the architecture and transforms ``spec.pretrained`` implies
            (an open_clip tag may switch on QuickGELU or set the preprocessing) without reading or
            downloading the weights, for a caller that loads a full state dict of its own.

    Returns:
        The model (in eval mode) with its transforms and tokenizer.

    Raises:
        KdpromptError: unknown model, missing or mismatched weights file, or a tag that cannot be
            loaded (unknown, or no network).
    """
    name = resolve_model_name(spec.name)
    pretrained = spec.pretrained
    local: Path | None = None
    tag: str | None = None
    if pretrained and not load_weights:
        return _create_architecture(name, spec, device)
    if pretrained:
        if _is_local_weights(pretrained):
            local = Path(pretrained).expanduser()
            if not local.is_file():
                raise KdpromptError(f"weights file {local} does not exist (model.pretrained)")
        else:
            tag = pretrained
            if tag not in open_clip.list_pretrained_tags_by_model(name):
                raise _tag_error(name, tag, "unknown tag")
    try:
        # A local file is loaded right below: open_clip's "initialized randomly" warning would be false.
        quiet = _no_random_init_warning() if local is not None else contextlib.nullcontext()
        with quiet:
            model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
                name, pretrained=tag, precision=spec.precision, device=device
            )
    except Exception as e:
        if tag is None:
            raise
        raise _tag_error(name, tag, f"{type(e).__name__}: {e}") from e
    if local is not None:
        _load_local_weights(model, local, name)
        print(f"loaded {name} weights from {local} (sha256 {_sha256_prefix(local)})", file=sys.stderr)
    model.eval()
    tokenizer = open_clip.get_tokenizer(name)
    return LoadedClip(model, preprocess_train, preprocess_val, tokenizer, spec, name)


def _create_architecture(name: str, spec: ModelSpec, device: str | torch.device) -> LoadedClip:
    """The model ``spec`` describes, randomly initialised, shaped as its weights would shape it."""
    forced: dict[str, Any] = {}
    pretrained = spec.pretrained or ""
    if not _is_local_weights(pretrained) and pretrained in open_clip.list_pretrained_tags_by_model(name):
        tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
        forced["force_quick_gelu"] = bool(tag_cfg.get("quick_gelu", False))
        # create_model_and_transforms builds force_preprocess_cfg itself, from these image_* arguments.
        keys = ("mean", "std", "interpolation", "resize_mode")
        forced.update({f"image_{k}": tag_cfg[k] for k in keys if k in tag_cfg})
    with _no_random_init_warning():
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            name, pretrained=None, precision=spec.precision, device=device, **forced
        )
    model.eval()
    return LoadedClip(model, preprocess_train, preprocess_val, open_clip.get_tokenizer(name), spec, name)


def save_clip_weights(model: nn.Module, path: str | os.PathLike) -> Path:
    """Save ``model``'s state dict to ``path`` as safetensors, atomically.

    open_clip's own loader reads the file back
    (``open_clip.create_model_and_transforms(name, pretrained=str(path))``), as does
    :func:`create_clip` with ``pretrained: <path>``.

    Args:
        model: an open_clip model (a DDP wrapper is unwrapped).
        path: destination, conventionally ending in ``.safetensors``.

    Returns:
        ``path`` as a Path.
    """
    from safetensors.torch import save_file

    model = getattr(model, "module", model)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in model.state_dict().items():
        t = value.detach().to("cpu")
        ptr = t.untyped_storage().data_ptr()
        # safetensors refuses tensors that share storage (tied weights, views): give those a copy.
        t = t.clone().contiguous() if ptr in seen else t.contiguous()
        seen.add(ptr)
        tensors[key] = t
    return atomic_write(path, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
