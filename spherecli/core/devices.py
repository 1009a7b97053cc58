"""The device a user asked for, or a clear no: a GPU asked for that is not there is an
error, and only `auto` falls back to the CPU."""

from __future__ import annotations

import re

from spherecli.core.errors import UserError


def resolve_device(text: str, what: str = "`device`") -> str:
    """'cpu', 'cuda', 'cuda:N' or 'auto' (any case) as PyTorch names the device to use."""
    import torch

    name = text.strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match is None:
        raise UserError(f"{what} {text!r}: expected cpu, cuda, cuda:N or auto")
    if not torch.cuda.is_available():
        raise UserError(f"{what} {text}: PyTorch sees no GPU here (torch {torch.__version__}, CUDA "
                        f"{torch.version.cuda or 'not built in'}); use `device` cpu, or auto to take a GPU "
                        "only when there is one")
    if match.group(1) is not None and int(match.group(1)) >= torch.cuda.device_count():
        raise UserError(f"{what} {text}: PyTorch sees {torch.cuda.device_count()} GPU(s), numbered from 0")
    return name


def check_gpus(gpus: str) -> list[int]:
    """--gpus 0,1: the ids, each one a GPU PyTorch can see."""
    import torch

    try:
        ids = [int(v) for v in gpus.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"`gpus` {gpus!r}: expected GPU numbers, e.g. 0,1") from None
    if not ids:
        raise UserError("`gpus`: no GPU numbers given")
    if not torch.cuda.is_available():
        raise UserError(f"`gpus` {gpus}: PyTorch sees no GPU here; train on the CPU with `device` cpu "
                        "(and `nproc` N for several processes)")
    missing = [i for i in ids if i >= torch.cuda.device_count()]
    if missing:
        raise UserError(f"`gpus` {gpus}: PyTorch sees {torch.cuda.device_count()} GPU(s), numbered from 0")
    return ids
