"""The bundle's image encoder as ONNX, checked against torch with onnxruntime.

Needs the ``onnx`` extra (``pip install 'kdprompt[onnx]'``: onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kdprompt.errors import KdpromptError

INPUT_NAME, OUTPUT_NAME = "images", "features"
# Features are unit vectors; 1e-4 absolute is far below what changes a class ranking.
TOLERANCE = 1e-4


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise KdpromptError(
            f"ONNX support needs the {module} package: pip install 'kdprompt[onnx]'"
        ) from None


def export_onnx(
    encoder: nn.Module, path: Path, *, image_size: tuple[int, int], opset: int = 18, check_batch: int = 4
) -> dict[str, Any]:
    """Write ``encoder`` as an ONNX graph with a dynamic batch axis and check it with onnxruntime.

    Args:
        encoder: the float32 image encoder (eval mode).
        path: the ``.onnx`` file to write.
        image_size: (H, W) of the input.
        opset: ONNX opset version.
        check_batch: images in the random batch the graph is checked on.

    Returns:
        ``file``, ``opset``, ``input``/``output`` names and the measured ``max_abs_diff``.

    Raises:
        KdpromptError: a missing package, or onnxruntime's features differ from torch's by more than
            ``TOLERANCE``.
    """
    _require("onnx")
    _require("onnxscript")
    _require("onnxruntime")
    encoder = encoder.eval()
    example = torch.randn(2, 3, *image_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own progress and deprecation chatter
        program = torch.onnx.export(
            encoder,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            opset_version=opset,
            verbose=False,
        )
    program.save(str(path), external_data=False)
    generator = torch.Generator().manual_seed(0)
    check = torch.randn(check_batch, 3, *image_size, generator=generator)
    with torch.no_grad():
        expected = encoder(check).numpy()
    got = OnnxImageEncoder(path).run(check.numpy())
    diff = float(np.abs(got - expected).max())
    if not diff <= TOLERANCE:
        raise KdpromptError(
            f"the ONNX graph's features differ from torch's by {diff:.2e} (> {TOLERANCE}); "
            "export without --onnx, or report this model to kdprompt"
        )
    return {
        "file": path.name,
        "opset": opset,
        "input": INPUT_NAME,
        "output": OUTPUT_NAME,
        "max_abs_diff": diff,
    }


class OnnxImageEncoder:
    """``image_encoder.onnx`` on onnxruntime (CPU): (B, 3, H, W) -> (B, D) unit-norm features."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        ort = _require("onnxruntime")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise KdpromptError(f"onnxruntime cannot load {path}: {e}; re-export with --onnx") from e

    def run(self, images: np.ndarray) -> np.ndarray:
        """Features of a float32 NCHW array."""
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(images, dtype=np.float32)})[
            0
        ]

    def __call__(self, images: Tensor) -> Tensor:
        return torch.from_numpy(self.run(images.detach().cpu().float().numpy()))
