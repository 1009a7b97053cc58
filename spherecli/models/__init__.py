"""Face feature networks by name. To add a family, add a module and its builders here."""

from __future__ import annotations

import torch
from torch import nn

from spherecli import UserError
from spherecli.formats import load_checkpoint
from spherecli.models.sphereface import sphere4, sphere10, sphere20, sphere36, sphere64

ARCHS = {f.__name__: f for f in (sphere4, sphere10, sphere20, sphere36, sphere64)}


def create_model(arch: str, input_size=(112, 96), feature_dim: int = 512) -> nn.Module:
    if arch not in ARCHS:
        raise UserError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    return ARCHS[arch](input_size=tuple(input_size), feature_dim=feature_dim)


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for --amp (auto, none, bf16, fp16); None means fp32."""
    if amp == "auto":
        fast_bf16 = (torch.cuda.is_bf16_supported(including_emulation=False)
                     if device.type == "cuda" else getattr(torch.cpu, "_is_amx_tile_supported", bool)())
        return torch.bfloat16 if fast_bf16 else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_model(path, arch: str | None = None) -> tuple[nn.Module, dict]:
    """The feature network of a checkpoint or model file, in eval mode, and the file's contents."""
    state = load_checkpoint(path)
    if arch and arch != state["arch"]:
        raise UserError(f"{path} holds a {state['arch']} network, not {arch}")
    model = create_model(state["arch"], state["input_size"], state["feature_dim"])
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not fit {state['arch']}: {str(e).splitlines()[0]}") from None
    return model.eval(), state
