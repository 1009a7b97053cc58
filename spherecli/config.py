"""Training configuration: plain values with the original recipe as defaults.

Kept free of torch so that `sphereface --help` stays instant.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from spherecli import UserError
from spherecli.registry import NETWORKS


def opt(default, help: str):
    return field(default=default, metadata={"help": help})


# Cosine threshold for a model without an evaluation result, whose features
# are therefore not centred either: on LFW, without mean subtraction, both
# CelebA-trained models of docs/results.md had their best threshold at 0.20.
# `sphereface evaluate` calibrates a model properly.
DEFAULT_THRESHOLD = 0.2


@dataclass
class TrainConfig:
    # data
    list: str = opt("", "Training list from `sphereface list` (path label per line).")
    root: str | None = opt(None, "Folder that relative list paths are relative to "
                                 "[default: the list's folder].")
    out: str = opt("runs/sphereface", "Run folder: config, log, checkpoints, model.")
    skip_missing: bool = opt(False, "Leave out list lines whose image is missing (counted) "
                                    "instead of stopping.")
    cache: bool = opt(False, "Decode every image once into memory (fast on CPU; needs "
                             "~32 KB per 112x96 image).")
    workers: int = opt(4, "DataLoader worker processes per training process.")
    # network
    arch: str = opt("sphere20", "Network (`--list-archs` describes them).")
    feature_dim: int | None = opt(None, "Face feature size [default: the network's own: 512 for "
                                        "SphereFace, 128 for MobileFaceNet].")
    # head
    head: str = opt("asoftmax", "Margin head: asoftmax, softmax, cosface, arcface.")
    margin: float | None = opt(None, "Margin m [default: A-Softmax 4, CosFace 0.35, ArcFace 0.5].")
    scale: float | None = opt(None, "Feature scale s [default: CosFace/ArcFace 64; A-Softmax "
                                    "none, i.e. |x|; a value gives feature-normalised A-Softmax].")
    lambda_base: float = opt(1000.0, "A-Softmax lambda = max(lambda_min, base (1 + gamma t)^-power).")
    lambda_gamma: float = opt(0.12, "A-Softmax lambda decay gamma.")
    lambda_power: float = opt(1.0, "A-Softmax lambda decay power.")
    lambda_min: float = opt(5.0, "A-Softmax lambda floor.")
    lambda_hold: int = opt(0, "Keep lambda at its base for this many iterations before the "
                              "decay starts (0: the original).")
    backward: str = opt("exact", "A-Softmax gradient: exact (autograd) or original (the Caffe "
                                 "layer's normalised gradient, which diverged on CelebA; "
                                 "docs/training.md).")
    # solver
    batch_size: int = opt(256, "Images per process and iteration (Caffe: 256 per GPU).")
    lr: float = opt(0.1, "Base learning rate.")
    momentum: float = opt(0.9, "SGD momentum.")
    weight_decay: float = opt(5e-4, "L2 weight decay.")
    lr_steps: tuple = opt((16000, 24000), "Iterations where lr is multiplied by lr_factor; values "
                                          "below 1 are fractions of max_iter.")
    lr_factor: float = opt(0.1, "lr multiplier at each step.")
    max_iter: int = opt(28000, "Iterations to train.")
    warmup: int = opt(0, "Linear lr warm-up iterations (0: none, the original).")
    clip_grad: float = opt(0.0, "Clip the gradient norm to this value (0: off, the original).")
    caffe_param_rules: bool = opt(True, "Biases at 2x lr and no weight decay, as in the original.")
    seed: int = opt(0, "Seed of the initial weights and of the data order.")
    # devices
    device: str = opt("auto", "cpu, cuda or auto (cuda when available).")
    gpus: str | None = opt(None, "GPU ids, e.g. 0,1: one DDP process per GPU.")
    nproc: int = opt(1, "Processes on this machine when --gpus is not given (CPU: gloo).")
    amp: str = opt("auto", "Mixed precision: auto (bf16 where the hardware runs it fast: "
                           "CUDA with native bf16, CPUs with AMX), none (fp32, the original), "
                           "bf16, or fp16 (with loss scaling). The margin head is always fp32.")
    channels_last: bool = opt(True, "Channels-last memory format (measured faster on CPU).")
    compile: bool = opt(False, "torch.compile the network (measured slower on CPU).")
    # run control
    display: int = opt(20, "Log every this many iterations.")
    snapshot: int = opt(1000, "Checkpoint every this many iterations.")
    init_from: str | None = opt(None, "Start from the network weights of this checkpoint or model "
                                      "(e.g. a softmax-trained one); the head starts fresh.")
    on_stall: str = opt("warn", "When the loss sits at ln C while features shrink: warn, stop "
                                "or ignore.")


CHOICES = {"arch": NETWORKS.names, "head": ("asoftmax", "softmax", "cosface", "arcface"),
           "backward": ("original", "exact"), "amp": ("auto", "none", "bf16", "fp16"),
           "on_stall": ("warn", "stop", "ignore")}


def field_type(f) -> type:
    """The value type of a config field, from its annotation ('float | None' -> float)."""
    name = str(f.type).split("|")[0].strip()
    return {"str": str, "int": int, "float": float, "bool": bool, "tuple": tuple}[name]


def _coerce(name: str, value):
    """A config value from TOML or the command line, as the field's type wants it."""
    f = {f.name: f for f in fields(TrainConfig)}.get(name)
    if f is None:
        raise UserError(f"unknown training option {name!r}")
    if value is None:
        return None
    if name == "lr_steps":
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        return tuple(float(v) if float(v) < 1 else int(float(v)) for v in value)
    if name in CHOICES and value not in CHOICES[name]:
        raise UserError(f"{name} must be one of {', '.join(CHOICES[name])}, got {value!r}")
    kind = field_type(f)
    try:
        return kind(value) if kind is not bool or isinstance(value, bool) else value
    except (TypeError, ValueError):
        raise UserError(f"{name}: expected {kind.__name__}, got {value!r}") from None


def load_config(path: str | Path | None = None, overrides: dict | None = None,
                base: dict | None = None) -> TrainConfig:
    """Defaults <- base (a resumed run's config) <- TOML file <- overrides (the command line)."""
    values = dict(base or {})
    if path is not None:
        try:
            with open(path, "rb") as f:
                values.update(tomllib.load(f))
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise UserError(f"{path}: {e}") from None
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})


def to_toml(cfg: TrainConfig) -> str:
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(v)
    return "".join(f"{k} = {value(v)}\n" for k, v in asdict(cfg).items() if v is not None)


def resolve(config_file: str | Path | None, overrides: dict, resume: bool) -> tuple[TrainConfig, bool]:
    """The config of a run, and whether it continues an earlier one.

    With resume, a run folder that holds a checkpoint continues with the
    config it was started with (its config.toml), changed only by what is
    given again now; a folder without one starts fresh.
    """
    cfg = load_config(config_file, overrides)
    saved = Path(cfg.out) / "config.toml"
    if resume and (Path(cfg.out) / "checkpoint.pt").exists() and saved.exists():
        with open(saved, "rb") as f:
            base = tomllib.load(f)
        return load_config(config_file, overrides, base=base), True
    return cfg, False
