"""Training checkpoints: atomic directories ``step-00000123/`` with weights, optimizer state and counters.

A checkpoint is complete when its ``meta.json`` exists; the directory is built under a temporary name and
renamed into place, so a crash never leaves a half checkpoint that ``resume: auto`` could pick up.
Trainable weights go to safetensors; the optimizer and RNG states are plain tensors/numbers saved with
``torch.save`` and read back with ``weights_only=True`` (no arbitrary pickle).
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from kdprompt.errors import KdpromptError
from kdprompt.io import atomic_path

_NAME = re.compile(r"^step-(\d{8})$")


@dataclass
class Checkpoint:
    """A loaded checkpoint."""

    path: Path
    step: int
    weights: dict[str, torch.Tensor]
    state: dict[str, Any]
    meta: dict[str, Any]


def rng_state() -> dict[str, Any]:
    """Python and torch RNG states (CUDA too when present)."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states captured by :func:`rng_state`."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore_rng_on_resume(state: dict[str, Any], is_main: bool, seed: int) -> None:
    """Continue the random stream of an interrupted run.

    The main process saved its RNG state; other ranks reseed deterministically from ``seed``
    (already offset by rank and step by the caller), since only the main process writes checkpoints.
    """
    if is_main:
        set_rng_state(state)
    else:
        torch.manual_seed(seed)


def _contiguous(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage: give each tensor its own copy.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in weights.items()}


def save_checkpoint(
    directory: Path,
    step: int,
    weights: dict[str, torch.Tensor],
    state: dict[str, Any],
    meta: dict[str, Any] | None = None,
    keep_last: int = 2,
) -> Path:
    """Write checkpoint ``step`` under ``directory`` atomically and keep only the newest ``keep_last``."""
    directory = Path(directory)
    final = directory / f"step-{step:08d}"
    with atomic_path(final) as tmp:
        tmp.mkdir()
        save_file(_contiguous(weights), str(tmp / "weights.safetensors"))
        torch.save(state, tmp / "state.pt")
        # meta.json last: its presence marks the checkpoint complete.
        (tmp / "meta.json").write_text(json.dumps({"step": step, **(meta or {})}, indent=2), encoding="utf-8")
    for old in list_checkpoints(directory)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints under ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _NAME.match(p.name) and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint, or ``None``."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint directory written by :func:`save_checkpoint`."""
    path = Path(path)
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise KdpromptError(
            f"{path} is not a complete kdprompt checkpoint (no meta.json); pick another or resume: never"
        )
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    weights = load_file(str(path / "weights.safetensors"))
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    return Checkpoint(path=path, step=int(meta["step"]), weights=weights, state=state, meta=meta)


def resolve_resume(resume: str | Path, directory: Path, fingerprint: str | None = None) -> Path | None:
    """The checkpoint to resume from: ``auto`` -> latest in ``directory``, ``never`` -> None, or a path.

    With ``fingerprint`` (see :func:`kdprompt.config.recipe_fingerprint`), a checkpoint written by a
    different recipe is refused rather than silently continued.
    """
    if resume == "never":
        return None
    if resume == "auto":
        path = latest_checkpoint(directory)
        if path is None:
            return None
    else:
        path = Path(resume)
        if not (path / "meta.json").is_file():
            raise KdpromptError(
                f"resume checkpoint {path} not found or incomplete; available: "
                f"{[p.name for p in list_checkpoints(directory)] or 'none'} (or use resume=auto / resume=never)"
            )
    found = json.loads((path / "meta.json").read_text(encoding="utf-8")).get("recipe_fingerprint")
    if fingerprint is not None and found is not None and found != fingerprint:
        raise KdpromptError(
            f"checkpoint {path} was written by a different recipe (fingerprint {found}, this recipe {fingerprint}): "
            "the model, data, method or optimisation changed. Use another `name`, delete "
            f"{Path(path).parent}, or set resume=never to start over (its checkpoints will be replaced)"
        )
    return path


def resume_training(
    setting: Any, directory: Path, fingerprint: str, optimizer: torch.optim.Optimizer, *, main: bool = True
) -> Checkpoint | None:
    """Pick the checkpoint ``resume`` names (``auto``, ``never`` or a path) and restore the optimizer from it.

    The caller restores its own tensors from ``Checkpoint.weights`` and its step, counters and RNG
    state from ``step`` and ``state``. Returns None for a fresh run.
    """
    resume_from = resolve_resume(setting, directory, fingerprint)
    if resume_from is None:
        return None
    ckpt = load_checkpoint(resume_from)
    optimizer.load_state_dict(ckpt.state["optimizer"])
    if main:
        from tqdm.auto import tqdm

        tqdm.write(f"resuming from {resume_from} (step {ckpt.step})")
    return ckpt


def save_training_checkpoint(
    accelerator: Any,
    directory: Path,
    step: int,
    tensors: Callable[[], dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    counters: dict[str, Any],
    meta: dict[str, Any],
    keep_last: int,
) -> None:
    """Every rank calls this together; the main process writes ``tensors()`` with the optimizer state, the
    counters and its RNG state, between two barriers (so no rank runs ahead of a half-written checkpoint)."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"optimizer": optimizer.state_dict(), "counters": counters, "rng": rng_state()}
        save_checkpoint(directory, step, tensors(), state, meta, keep_last)
    accelerator.wait_for_everyone()
