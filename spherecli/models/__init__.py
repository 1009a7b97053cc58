"""Face feature networks by name, from the registry (spherecli/core/registry.py).

A family is a module of its own that defines its networks and registers each
builder with `@NETWORKS.register`; its names are declared in the registry.
Every network has `forward_features` (the convolutional body), `forward_head`
(body -> feature vector), `feature_dim` and `model_args` (the keyword
arguments that rebuild it, stored in model files).
"""

from __future__ import annotations

import torch
from torch import nn

from spherecli.core.errors import UserError
from spherecli.core.formats import ModelFile
from spherecli.core.registry import NETWORKS


def create_model(arch: str, **model_args) -> nn.Module:
    try:
        return NETWORKS.get(arch)(**model_args)
    except TypeError as e:
        raise UserError(f"{arch} does not take these settings: {e}") from None


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for --amp (auto, none, bf16, fp16); None means fp32."""
    if amp == "auto":
        # CPUs: AMX tiles (Intel) or AVX512-BF16 (AMD Zen 4, Intel Cooper Lake) run bf16
        # natively; both measured 2-3x faster than fp32 (docs/benchmarks.md).
        fast_bf16 = (torch.cuda.is_bf16_supported(including_emulation=False) if device.type == "cuda"
                     else torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
        return torch.bfloat16 if fast_bf16 else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_from(file: ModelFile, where: str | None = None) -> nn.Module:
    """The network of a model file, with its weights, in eval mode."""
    model = create_model(file.arch, **file.model_args)
    try:
        model.load_state_dict(file.weights)
    except RuntimeError as e:
        raise UserError(f"{where or 'model file'}: weights do not fit {file.arch}: "
                        f"{str(e).splitlines()[0]}") from None
    return model.eval()


def load_model(path, arch: str | None = None) -> tuple[nn.Module, ModelFile]:
    """The feature network of a checkpoint or model file, in eval mode, and the file."""
    file = ModelFile.load(path)
    if arch and arch != file.arch:
        raise UserError(f"{path} holds a {file.arch} network, not {arch}")
    return build_from(file, str(path)), file


def describe() -> list[tuple[str, str, str, str]]:
    """(name, description, feature size, parameters at 112x96) of every registered network."""
    rows = []
    for name, build in NETWORKS.all().items():
        net = build()
        rows.append((name, (build.__doc__ or "").strip().splitlines()[0], str(net.feature_dim),
                     f"{count_parameters(net):,}"))
    return rows
