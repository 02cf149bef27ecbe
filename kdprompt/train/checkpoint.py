"""Training checkpoints: atomic directories ``step-00000123/`` with weights, optimizer state and counters.

A checkpoint is complete when its ``meta.json`` exists; the directory is built under a temporary name and
renamed into place, so a crash never leaves a half checkpoint that ``resume: auto`` could pick up.
Trainable weights go to safetensors; the optimizer and RNG states are plain tensors/numbers saved with
``torch.save`` and read back with ``weights_only=True`` (no arbitrary pickle).

``meta.json`` (written last) records the sha256 of every other file, so a torn or bit-rotten file is
detected on load (:class:`DamagedCheckpoint`) instead of resuming with silently wrong weights;
``resume: auto`` then falls back to the previous checkpoint. Checkpoints written before the checksums
existed are still loaded, with a note that they are unverified.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from kdprompt.errors import KdpromptError
from kdprompt.faults import crash_point
from kdprompt.io import atomic_path, file_sha256, recover_swap

_NAME = re.compile(r"^step-(\d{8})$")
# What kdprompt.io.atomic_path leaves beside ``step-XXXXXXXX`` when killed: its temporary directory
# ``.step-XXXXXXXX.<random>.tmp`` and, mid directory swap, the old content ``.step-XXXXXXXX.old``.
_TEMPORARY = re.compile(r"^\.step-\d{8}\.[^/]+\.tmp$")
_SWAPPED_ASIDE = re.compile(r"^\.(step-\d{8})\.old$")
WEIGHTS, STATE, META = "weights.safetensors", "state.pt", "meta.json"
CHECKSUMS = "sha256"  # the meta.json field: {file name: sha256 hex digest}


class DamagedCheckpoint(KdpromptError):
    """A checkpoint whose files are missing, torn, unparsable or do not match their checksums."""


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


def _step_of(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))


def save_checkpoint(
    directory: Path,
    step: int,
    weights: dict[str, torch.Tensor],
    state: dict[str, Any],
    meta: dict[str, Any] | None = None,
    keep_last: int = 2,
) -> Path:
    """Write checkpoint ``step`` under ``directory`` atomically and keep only the newest ``keep_last``.

    Rotation counts only checkpoints up to ``step``: a newer one (left by a run that is being redone
    from an earlier checkpoint, damaged perhaps) is neither kept in their place nor removed.
    """
    directory = Path(directory)
    final = directory / f"step-{step:08d}"
    with atomic_path(final) as tmp:
        tmp.mkdir()
        save_file(_contiguous(weights), str(tmp / WEIGHTS))
        crash_point("checkpoint.weights_written")
        torch.save(state, tmp / STATE)
        crash_point("checkpoint.state_written")
        checksums = {name: file_sha256(tmp / name) for name in (WEIGHTS, STATE)}
        # meta.json last: its presence marks the checkpoint complete.
        record = {"step": step, **(meta or {}), CHECKSUMS: checksums}
        (tmp / META).write_text(json.dumps(record, indent=2), encoding="utf-8")
        crash_point("checkpoint.meta_written")
    crash_point("checkpoint.renamed")
    older = [p for p in list_checkpoints(directory) if _step_of(p) <= step]
    for old in older[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints under ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _NAME.match(p.name) and (p / META).is_file()]
    return sorted(found, key=_step_of)


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint, or ``None``."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def clean_stale_temporaries(directory: Path) -> list[Path]:
    """Clear what killed writers left in a checkpoint directory; returns the leftovers cleared.

    Only call this while holding the run lock (:mod:`kdprompt.train.runlock`): a live writer's temporaries
    look the same. A directory swap cut between its renames is finished by
    :func:`kdprompt.io.recover_swap`, which puts the old checkpoint back when the new one never arrived.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for path in sorted(directory.iterdir()):
        aside = _SWAPPED_ASIDE.match(path.name)
        if aside:
            recover_swap(directory / aside.group(1))
            if not path.exists():
                removed.append(path)
        elif _TEMPORARY.match(path.name) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _read_meta(path: Path) -> dict[str, Any]:
    meta_file = path / META
    if not meta_file.is_file():
        raise DamagedCheckpoint(f"{path} is not a complete kdprompt checkpoint (no {META})")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DamagedCheckpoint(f"{meta_file} is not valid JSON ({err})") from None
    if not isinstance(meta, dict) or type(meta.get("step")) is not int:
        raise DamagedCheckpoint(f"{meta_file} has no integer `step`")
    sums = meta.get(CHECKSUMS)
    if sums is not None and not (isinstance(sums, dict) and all(isinstance(v, str) for v in sums.values())):
        raise DamagedCheckpoint(f"{meta_file} has a malformed `{CHECKSUMS}` field")
    return meta


def _read_verified(path: Path, name: str, meta: dict[str, Any]) -> bytes:
    """The bytes of ``path/name``, checked against meta.json's checksum (read once: hash and parse agree)."""
    file = path / name
    try:
        data = file.read_bytes()
    except OSError as err:
        raise DamagedCheckpoint(f"{file} cannot be read ({err.strerror or err})") from None
    sums = meta.get(CHECKSUMS)
    if sums is not None:
        expected = sums.get(name)
        if expected is None:
            raise DamagedCheckpoint(f"{path / META} records no sha256 for {name}")
        if hashlib.sha256(data).hexdigest() != expected:
            raise DamagedCheckpoint(f"{file} does not match the sha256 in {META} (torn or corrupted)")
    return data


def _parse(file: Path, parse: Callable[[], Any]) -> Any:
    try:
        return parse()
    except Exception as err:  # a torn file fails in many ways; all of them mean the same here
        detail = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise DamagedCheckpoint(f"{file} cannot be parsed ({detail})") from None


def load_checkpoint(path: Path) -> Checkpoint:
    """Read and verify a checkpoint directory written by :func:`save_checkpoint`.

    Raises:
        DamagedCheckpoint: a file is missing, unparsable, or differs from its checksum in ``meta.json``.
    """
    path = Path(path)
    meta = _read_meta(path)
    weights_bytes = _read_verified(path, WEIGHTS, meta)
    state_bytes = _read_verified(path, STATE, meta)
    weights = _parse(path / WEIGHTS, lambda: load_safetensors(weights_bytes))
    state = _parse(
        path / STATE, lambda: torch.load(io.BytesIO(state_bytes), map_location="cpu", weights_only=True)
    )
    return Checkpoint(path=path, step=meta["step"], weights=weights, state=state, meta=meta)


def _say(text: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(text, file=sys.stderr)


def _check_fingerprint(ckpt: Checkpoint, fingerprint: str | None) -> None:
    found = ckpt.meta.get("recipe_fingerprint")
    if fingerprint is not None and found is not None and found != fingerprint:
        raise KdpromptError(
            f"checkpoint {ckpt.path} was written by a different recipe (fingerprint {found}, this recipe "
            f"{fingerprint}): the model, data, method or optimisation changed. Use another `name`, delete "
            f"{ckpt.path.parent}, or set resume=never to start over (its checkpoints will be replaced)"
        )


def load_resume_checkpoint(
    resume: str | Path, directory: Path, fingerprint: str | None = None, *, main: bool = True
) -> Checkpoint | None:
    """The checkpoint to resume from, loaded and verified: ``auto`` -> the newest sound one in
    ``directory``, ``never`` -> None, or the checkpoint at a path.

    Under ``auto`` a damaged checkpoint is skipped with a one-line warning (on the main process) naming
    it and the problem; a named damaged checkpoint is an error. With ``fingerprint`` (see
    :func:`kdprompt.config.recipe_fingerprint`), a checkpoint written by a different recipe is refused
    rather than silently continued.

    Raises:
        KdpromptError: the named checkpoint is missing or damaged, every checkpoint under ``directory``
            is damaged, or the checkpoint belongs to another recipe.
    """
    if resume == "never":
        return None
    available = [p.name for p in list_checkpoints(directory)] or "none"
    if resume == "auto":
        damaged = []
        for path in reversed(list_checkpoints(directory)):
            try:
                ckpt = load_checkpoint(path)
            except DamagedCheckpoint as err:
                damaged.append(str(err))
                if main:
                    _say(f"warning: skipping damaged checkpoint {path.name}: {err}; trying the one before")
                continue
            break
        else:
            if not damaged:
                return None
            raise KdpromptError(
                f"every checkpoint under {directory} is damaged ({'; '.join(damaged)}): delete them, "
                "or set resume=never to start over"
            )
    else:
        path = Path(resume)
        if not (path / META).is_file():
            raise KdpromptError(
                f"resume checkpoint {path} not found or incomplete; available: {available} "
                "(or use resume=auto / resume=never)"
            )
        try:
            ckpt = load_checkpoint(path)
        except DamagedCheckpoint as err:
            raise KdpromptError(
                f"resume checkpoint {path} is damaged: {err}; available: {available} "
                "(or use resume=auto / resume=never)"
            ) from None
    _check_fingerprint(ckpt, fingerprint)
    if main and CHECKSUMS not in ckpt.meta:
        _say(
            f"note: checkpoint {ckpt.path} has no checksums (written by an older kdprompt): loaded unverified"
        )
    return ckpt


def resume_training(
    setting: Any, directory: Path, fingerprint: str, optimizer: torch.optim.Optimizer, *, main: bool = True
) -> Checkpoint | None:
    """Pick the checkpoint ``resume`` names (``auto``, ``never`` or a path) and restore the optimizer from it.

    The caller restores its own tensors from ``Checkpoint.weights`` and its step, counters and RNG
    state from ``step`` and ``state``. Returns None for a fresh run.
    """
    ckpt = load_resume_checkpoint(setting, directory, fingerprint, main=main)
    if ckpt is None:
        return None
    optimizer.load_state_dict(ckpt.state["optimizer"])
    if main:
        from tqdm.auto import tqdm

        tqdm.write(f"resuming from {ckpt.path} (step {ckpt.step})")
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
