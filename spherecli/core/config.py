"""Settings objects: detection's and training's, plain values with the original's as
defaults, each field declaring its help and what it may be (spherecli.core.validate), so
that the command line, TOML recipes and Python callers check alike.

Kept free of torch so that `sphereface --help` stays instant.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from spherecli.core.errors import UserError
from spherecli.core.registry import (A_SOFTMAX_BACKWARD, ACCUMULATE_RULES, AMP_MODES, BORDER_MODES,
                                     FLIP_MODES, HEADS, MHE_DISTANCES, MHE_PAIRS, NETWORKS, RUNTIMES,
                                     SELECT_RULES, SPHEREFACE_R_VERSIONS, STALL_ACTIONS)
from spherecli.core.validate import COUNT, NOT_NEGATIVE_INT, Range, check_settings, check_value, setting


def opt(default, help: str, range: Range | None = None, choices: tuple | None = None):
    return setting(default, help, range, choices)


@dataclass
class DetectSettings:
    """Everything that changes what the manifest says; stored in its header. Each field's
    help and range are the `detect` option's."""
    # P-Net's window is 12 px: a smaller face would need the photo enlarged first.
    min_face: int = setting(20, "Smallest face searched for, in pixels (original: 20).",
                            Range(12, integer=True))
    factor: float = setting(0.85, "Image pyramid scale factor (original: 0.85).",
                            Range(0, 1, lo_open=True, hi_open=True))
    thresholds: tuple = setting((0.6, 0.7, 0.9), "P-Net,R-Net,O-Net score thresholds (original: "
                                "0.6,0.7,0.9).", Range(0.1, 1))  # below 0.1 every window passes
    select: str = setting("center", "Which face of a photo with several: nearest the centre (the "
                          "original), largest, most confident.", choices=SELECT_RULES)
    all_faces: bool = setting(False, "Also record every face found, under 'all'.")
    exif: bool = setting(True, "Apply the EXIF orientation tag.")
    max_side: int = setting(2000, "Downscale larger images for detection; landmarks are mapped back.",
                            Range(12, integer=True))
    border: str = setting("redetect", "Faces that fill the frame: detect again on a black-padded copy "
                          "when a box leaves the frame or no face is found (redetect), always detect "
                          "padded (pad), or as the original (none), whose landmarks slide up such faces.",
                          choices=BORDER_MODES)

    def __post_init__(self):
        if isinstance(self.thresholds, str):
            self.thresholds = tuple(v for v in self.thresholds.split(","))
        if not isinstance(self.thresholds, (tuple, list)) or len(self.thresholds) != 3:
            raise UserError(f"thresholds: expected three numbers (P-Net, R-Net, O-Net), got "
                            f"{self.thresholds!r}")
        check_settings(self)
        self.thresholds = tuple(float(t) for t in self.thresholds)

    def as_json(self) -> dict:
        d = asdict(self)
        d["thresholds"] = list(self.thresholds)
        return d


@dataclass
class EvalSettings:
    """How `evaluate` makes features and scores them, for every benchmark of a call. Each
    field's help and range are the `evaluate` option's."""
    flip: str = setting("concat", "An image's feature with its mirror's: concatenated (the original), "
                        "summed, or alone.", choices=FLIP_MODES)
    mean_subtract: bool = setting(True, "Subtract the other folds' mean feature before the cosine "
                                  "(original: yes).")
    skip_missing: bool = setting(False, "Score pairs with a missing image as failures.")
    arch: str | None = setting(None, "Expected network; a checkpoint of another one is refused.")
    input_spec: str | None = setting(None, "For an ONNX model: the input it takes, as a preset (insightface: "
                                     "112x112 RGB, ArcFace points, (x - 127.5) / 127.5; sphereface), a JSON "
                                     "file, or key=value pairs (size, reference, channels, mean, std).  "
                                     "[default: MODEL.onnx.json]")
    device: str = setting("cpu", "cpu, cuda or cuda:N.")
    amp: str = setting("none", "Extract in reduced precision: faster, LFW within 0.1 points "
                       "(docs/benchmarks.md); none is fp32, as the original.", choices=AMP_MODES)
    runtime: str = setting("auto", "What runs a model file: PyTorch, or onnxruntime; auto takes "
                           "onnxruntime on the CPU in fp32 for networks measured faster there "
                           "(MobileFaceNet), with the same features.", choices=RUNTIMES)
    batch_size: int = setting(128, "Images per forward pass.", COUNT)
    workers: int = setting(2, "DataLoader worker processes.", NOT_NEGATIVE_INT)

    def __post_init__(self):
        check_settings(self)


EVAL_FIELDS = {f.name: f for f in fields(EvalSettings)}


@dataclass
class VideoSettings:
    """How `identify` tracks and names the faces of a video, camera or stream. Each field's
    help and range are the `identify` option's."""
    # On every frame: sparser detection measured faster but merged crossing people's tracks
    # (docs/benchmarks.md, "video").
    detect_every: int = setting(1, "Tracked video: run the detector on every N-th frame, the tracks' "
                                "boxes held between.", Range(1, 100, integer=True))
    # 40 px halves MTCNN's time on a 640 x 480 frame against the original's 20, and a face
    # under 40 px is upscaled 3x into a 112 x 96 crop anyway.
    min_face: int = setting(40, "Tracked video: the smallest face (pixels) the detector looks for.",
                            Range(12, 10_000, integer=True))
    accumulate: str = setting("template", "Tracked video: a track's identity from the mean of its best "
                              "views, or from a vote of them.", choices=ACCUMULATE_RULES)
    timeout: float = setting(10.0, "Seconds without a frame before the run ends, saying so (a stream "
                             "that stops is first reopened, 3 tries).", Range(0.1, 3600))

    def __post_init__(self):
        check_settings(self)


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
    cache_file: str | None = opt(None, "Decode the list's images once into this file (uint8, about 32 KB "
                                       "per 112x96 face; memory-mapped and shared by every process, for "
                                       "data larger than memory or several GPUs); made on first use.")
    workers: int = opt(4, "DataLoader worker processes per training process.", NOT_NEGATIVE_INT)
    # network
    arch: str = opt("sphere20", "Network: " + ", ".join(NETWORKS.names) + " (`--list-archs`).",
                    choices=NETWORKS.names)
    feature_dim: int | None = opt(None, "Face feature size [default: the network's own: 512 for "
                                        "SphereFace, 128 for MobileFaceNet].", Range(1, 2048, integer=True))
    # head: its type, and its own settings (the [head] table of a TOML file; HEAD_SETTINGS)
    head: str = opt("asoftmax", "Margin head: " + ", ".join(HEADS.names) + ".", choices=HEADS.names)
    head_args: dict = field(default_factory=dict, metadata={"help": "The head's settings."})
    # solver
    batch_size: int = opt(256, "Images per process and iteration (Caffe: 256 per GPU).", COUNT)
    lr: float = opt(0.1, "Base learning rate.", Range(0, lo_open=True))
    momentum: float = opt(0.9, "SGD momentum.", Range(0, 1, hi_open=True))
    weight_decay: float = opt(5e-4, "L2 weight decay.", Range(0))
    lr_steps: tuple = opt((16000, 24000), "Iterations where lr is multiplied by lr_factor; values "
                                          "below 1 are fractions of max_iter.", Range(0))
    lr_factor: float = opt(0.1, "lr multiplier at each step.", Range(0, lo_open=True))
    max_iter: int = opt(28000, "Iterations to train.", NOT_NEGATIVE_INT)
    warmup: int = opt(0, "Linear lr warm-up iterations (0: none, the original).", NOT_NEGATIVE_INT)
    clip_grad: float = opt(0.0, "Clip the gradient norm to this value (0: off, the original).", Range(0))
    caffe_param_rules: bool = opt(True, "Biases at 2x lr and no weight decay, as in the original.")
    seed: int = opt(0, "Seed of the initial weights and of the data order.",
                    Range(0, 2**31 - 1, integer=True))
    # devices
    device: str = opt("auto", "cpu, cuda or auto (cuda when available).")
    gpus: str | None = opt(None, "GPU ids, e.g. 0,1: one DDP process per GPU.")
    nproc: int = opt(1, "Processes on this machine when --gpus is not given (CPU: gloo).", COUNT)
    amp: str = opt("auto", "Mixed precision: auto (bf16 where the hardware runs it fast: "
                           "CUDA with native bf16, CPUs with AMX or AVX512-BF16), none (fp32, the "
                           "original), bf16, or fp16 (with loss scaling). The margin head is always fp32.",
                  choices=AMP_MODES)
    channels_last: bool = opt(True, "Channels-last memory format (measured faster on CPU).")
    compile: bool = opt(False, "torch.compile the network (measured slower on CPU).")
    # run control
    display: int = opt(20, "Log every this many iterations.", COUNT)
    snapshot: int = opt(1000, "Checkpoint every this many iterations.", COUNT)
    init_from: str | None = opt(None, "Start from the network weights of this checkpoint or model "
                                      "(e.g. a softmax-trained one); the head starts fresh.")
    on_stall: str = opt("warn", "When the loss sits at ln C while features shrink: warn, stop "
                                "or ignore.", choices=STALL_ACTIONS)


# The heads' settings, as flags and as keys of the [head] table. Each head takes
# the ones its constructor names (spherecli/training/heads.py); others are an error.
HEAD_SETTINGS = {
    "margin": (float, "Margin m [default: A-Softmax 4, CosFace 0.35, ArcFace 0.5, SphereFace-R 1.5, "
                      "SphereFace2 0.4].", Range(0)),
    "scale": (float, "Feature scale s [default: CosFace/ArcFace 64, SphereFace-R 30, SphereFace2 (r) 40; "
                     "A-Softmax none, i.e. |x|; a value gives feature-normalised A-Softmax].",
              Range(0, lo_open=True)),
    "lambda_base": (float, "A-Softmax lambda = max(lambda_min, base (1 + gamma t)^-power) [1000].", Range(0)),
    "lambda_gamma": (float, "A-Softmax lambda decay gamma [0.12].", Range(0)),
    "lambda_power": (float, "A-Softmax lambda decay power [1].", Range(0)),
    "lambda_min": (float, "A-Softmax lambda floor [5].", Range(0)),
    "lambda_hold": (int, "A-Softmax: keep lambda at its base for this many iterations before the "
                         "decay starts [0: the original].", NOT_NEGATIVE_INT),
    "backward": (A_SOFTMAX_BACKWARD, "A-Softmax gradient: exact (autograd) or original (the Caffe "
                                     "layer's normalised gradient, which diverged on CelebA; "
                                     "docs/training.md) [exact].", None),
    "version": (SPHEREFACE_R_VERSIONS, "SphereFace-R's margin: v0, the original's psi for any real m, "
                                       "or v1, cos(min(m theta, pi)) [v0].", None),
    "positive_weight": (float, "SphereFace2: lambda, the weight of the target's binary term against "
                               "the others' [0.7].", Range(0, 1, lo_open=True, hi_open=True)),
    "similarity_power": (float, "SphereFace2: t of the similarity adjustment 2((cos + 1)/2)^t - 1 [3].",
                         Range(0, lo_open=True)),
    "loss_weight": (float, "SphereFace2: the loss's multiplier, lw [50].", Range(0, lo_open=True)),
    # SphereFace+ (minimum hyperspherical energy): every head takes these.
    "mhe": (float, "SphereFace+: weight lambda_M of the hyperspherical energy of the class weights "
                   "[0: off].", Range(0)),
    "mhe_power": (float, "SphereFace+: the energy's power s, d^-s (0: log 1/d) [2].", Range(0)),
    "mhe_distance": (MHE_DISTANCES, "SphereFace+: Euclidean distance (MHE) or angle (A-MHE) between "
                                    "class weights [euclidean].", None),
    "mhe_half_space": (bool, "SphereFace+: also count each class weight's reflection (half-space "
                             "MHE) [false].", None),
    "mhe_pairs": (MHE_PAIRS, "SphereFace+: the batch's classes against every class (the paper's "
                             "mini-batch form, B x C pairs) or all C^2 pairs [batch].", None),
}

# What run configs written before the [head] table held for every head, whichever it was.
LEGACY_DEFAULTS = {"lambda_base": 1000.0, "lambda_gamma": 0.12, "lambda_power": 1.0, "lambda_min": 5.0,
                   "lambda_hold": 0, "backward": "exact"}

FIELDS = {f.name: f for f in fields(TrainConfig)}


def field_type(f) -> type:
    """The value type of a config field, from its annotation ('float | None' -> float)."""
    name = str(f.type).split("|")[0].strip()
    return {"str": str, "int": int, "float": float, "bool": bool, "tuple": tuple}[name]


def _typed(name: str, value, kind, where: str):
    """value as kind, or an error naming the option and where it came from."""
    def bad(expected):
        return UserError(f"{where}{name}: expected {expected}, got {value!r}")
    if isinstance(kind, tuple):
        if value not in kind:
            raise bad("one of " + ", ".join(kind))
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise bad("a whole number")
        return int(value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if not isinstance(value, str):
        raise bad("a string")
    return value


def _unknown(name: str, where: str) -> UserError:
    import difflib

    close = difflib.get_close_matches(name.replace("-", "_"), [*FIELDS, *HEAD_SETTINGS, "head"], n=1)
    return UserError(f"{where}unknown training option {name!r}"
                     + (f" (did you mean {close[0]}?)" if close else ""))


def _coerce(name: str, value, where: str = ""):
    """A config value from TOML or the command line, as the field's type wants it."""
    f = FIELDS.get(name)
    if f is None or name == "head_args":
        raise _unknown(name, where)
    if value is None:
        return None
    if name == "lr_steps":
        parts = value.split(",") if isinstance(value, str) else value
        try:
            steps = tuple(float(v) for v in parts if not isinstance(v, str) or v.strip())
        except (TypeError, ValueError):
            raise UserError(f"{where}lr_steps: expected iterations (or fractions of max_iter "
                            f"below 1), e.g. 16000,24000, got {value!r}") from None
        return check_value(f, tuple(v if v < 1 else int(v) for v in steps), where)
    value = _typed(name, value, f.metadata["choices"] or field_type(f), where)
    return check_value(f, value, where)


def _layer(values: dict, where: str) -> tuple[dict, str | None, dict]:
    """(options, head type or None, head settings) of one layer of configuration.

    A TOML file holds the head as a table, `[head]` with `type` and its settings;
    recipes and run configs written before that hold `head = "type"` and the
    settings at the top level, which read the same.
    """
    values = dict(values)
    head = values.pop("head", None)
    settings = {k: values.pop(k) for k in list(values) if k in HEAD_SETTINGS}
    legacy = not isinstance(head, dict)
    if not legacy:
        settings.update({k: v for k, v in head.items() if k != "type"})
        head = head.get("type")
    for k, v in settings.items():
        if k not in HEAD_SETTINGS:
            raise _unknown(k, where)
        kind, _, rng = HEAD_SETTINGS[k]
        settings[k] = _typed(k, v, kind, where)
        if rng is not None:
            settings[k] = rng.check(settings[k], f"{where}{k}")
    if head is not None:
        head = _typed("head", head, HEADS.names, where)
        if legacy:
            # Old run configs wrote every head setting, at its default, whatever the head:
            # a value that is what those versions wrote by default is theirs, not the user's.
            settings = {k: v for k, v in settings.items() if LEGACY_DEFAULTS.get(k) != v}
    return {k: _coerce(k, v, where) for k, v in values.items() if v is not None}, head, settings


def load_config(path: str | Path | None = None, overrides: dict | None = None,
                base: dict | None = None) -> TrainConfig:
    """Defaults <- base (a resumed run's config) <- TOML file <- overrides (the command line).

    A layer that names another head drops the head settings of the layers
    before it, which belonged to the other head. Whether the final head takes
    its settings is the head's to say (training/heads.py, check_head), when a
    run starts.
    """
    from spherecli.core.formats import read_toml  # here, so that `sphereface --help` loads no numpy

    layers = [(base or {}, "")]
    if path is not None:
        layers.append((read_toml(path), f"{path}: "))
    layers.append((overrides or {}, ""))
    options, head, settings = {}, TrainConfig.head, {}
    for values, where in layers:
        opts, kind, given = _layer(values, where)
        options.update(opts)
        if kind is not None and kind != head:
            head, settings = kind, {}
        settings.update(given)
    return TrainConfig(**options, head=head, head_args=settings)


def to_toml(cfg: TrainConfig) -> str:
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(v)
    top = {k: v for k, v in asdict(cfg).items() if v is not None and k not in ("head", "head_args")}
    head = {"type": cfg.head, **cfg.head_args}
    return ("".join(f"{k} = {value(v)}\n" for k, v in top.items())
            + "\n[head]\n" + "".join(f"{k} = {value(v)}\n" for k, v in head.items()))


def resolve(config_file: str | Path | None, overrides: dict, resume: bool) -> tuple[TrainConfig, bool]:
    """The config of a run, and whether it continues an earlier one.

    With resume, a run folder that holds a config.toml continues with that
    config, changed only by what is given again now; it resumes from its
    checkpoint when it has one, and starts from the beginning otherwise (a
    run stopped before its first snapshot).
    """
    from spherecli.core.formats import RunFolder, read_toml

    cfg = absolute_paths(load_config(config_file, overrides))
    saved = RunFolder(cfg.out)
    if resume and saved.config.is_file():
        before = absolute_paths(load_config(base=read_toml(saved.config)))
        cfg = absolute_paths(load_config(config_file, overrides, base=read_toml(saved.config)))
        if saved.checkpoint.exists():
            changed = [f"{k} {getattr(before, k)} -> {getattr(cfg, k)}" for k in RESUME_FIXED
                       if getattr(before, k) != getattr(cfg, k)]
            if changed:
                raise UserError(f"{saved.path} holds a run trained with other settings "
                                f"({'; '.join(changed)}); "
                                "a resumed run keeps its network, head and data: drop those options to "
                                "continue it, or train into another `out`")
        return cfg, saved.checkpoint.exists()
    return cfg, False


# What a run resumed from its checkpoint cannot change: the checkpoint's network and
# head were built from them.
RESUME_FIXED = ("arch", "feature_dim", "head", "list", "root")
PATHS = ("list", "root", "cache_file", "init_from")


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """The config with its input paths absolute, so that config.toml resumes from any folder."""
    import os

    for name in PATHS:
        value = getattr(cfg, name)
        if value:
            setattr(cfg, name, os.path.abspath(value))
    return cfg
