"""Export the feature network to ONNX, torch.export or TorchScript, and check it against PyTorch.

The exported network takes float (N, 3, H, W) crops prepared as the model
file's input spec says (for our networks: BGR, (x - 127.5) / 128) and
returns the (N, feature_dim) feature. An ONNX export gets the spec beside
it, MODEL.onnx.json, so that `--model MODEL.onnx` runs it like the original.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from spherecli.core.errors import UserError
from spherecli.core.data import load_face, to_chw
from spherecli.models.features import prepare, to_onnx
from spherecli.core.formats import InputSpec, onnx_sidecar, write_input_spec
from spherecli.core.images import walk_images
from spherecli.models import load_model
from spherecli.core.outputs import Outputs


def check_batch(spec: InputSpec, check_dir: str | Path | None, n: int = 32) -> tuple[torch.Tensor, str]:
    """Real aligned faces from check_dir, or seeded noise pixels when none is given."""
    if check_dir:
        rels = list(walk_images(check_dir))[:n]
        if not rels:
            raise UserError(f"`check` {check_dir}: no images")
        crops = torch.stack([to_chw(load_face(str(Path(check_dir) / r))) for r in rels])
        return prepare(crops, spec), f"{len(rels)} aligned faces from {check_dir}"
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (8, 3, *spec.size), generator=g, dtype=torch.uint8)
    return prepare(noise, spec), "8 random inputs (pass --check DIR for real faces)"


def export(model_path: str | Path, output: str | Path, *, check_dir: str | Path | None = None,
           opset: int = 17, overwrite: bool = False) -> dict:
    """Write the network as .onnx, .pt2 (torch.export) or .ts (TorchScript, which LibTorch
    loads; no spherecli command reads it back) and compare its features. A .pt name is
    refused: that is what spherecli's own model files are called."""
    with Outputs([model_path, check_dir], overwrite) as outputs:
        output = outputs.file(output, "export")
        if output.suffix == ".onnx":
            outputs.file(onnx_sidecar(output), "input spec")
        return _export(model_path, output, check_dir, opset)


def _export(model_path, output: Path, check_dir, opset: int) -> dict:
    model, file = load_model(model_path)
    x, what = check_batch(file.input, check_dir)
    with torch.no_grad():
        expected = model(x).numpy()
    if output.suffix == ".onnx":
        output.write_bytes(to_onnx(model, file.input, opset))
        write_input_spec(onnx_sidecar(output), file.input)
        try:
            import onnxruntime
        except ImportError:
            return {"output": str(output), "checked": False,
                    "note": "onnxruntime is not installed: the export was not checked"}
        session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
        got = session.run(["feature"], {"image": x.numpy()})[0]
        runtime = f"onnxruntime {onnxruntime.__version__}"
    elif output.suffix == ".pt2":
        # torch.export is what PyTorch now maintains in TorchScript's place, and what
        # AOTInductor compiles for serving without Python.
        batch = torch.export.Dim("batch", min=1, max=65536)
        torch.export.save(torch.export.export(model, (x,), dynamic_shapes=({0: batch},)), output)
        with torch.no_grad():
            got = torch.export.load(output).module()(x).numpy()
        runtime = "torch.export"
    elif output.suffix == ".ts":
        # TorchScript is deprecated in PyTorch (which warns at every call) but still what
        # LibTorch (C++) loads.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            traced = torch.jit.trace(model, x[:1])
            traced.save(str(output))
            with torch.no_grad():
                got = torch.jit.load(str(output))(x).numpy()
        runtime = "torch.jit"
    else:
        raise UserError(f"{output}: use .onnx for ONNX, .pt2 for torch.export or .ts for TorchScript")
    return {"output": str(output), "input": file.input.describe(), "checked": True, "runtime": runtime,
            "inputs": what,
            "max_abs_diff": float(np.abs(got - expected).max()),
            "max_abs_feature": float(np.abs(expected).max())}
