"""Stage 4: train a SphereFace network with a margin head, from one CPU to many GPUs.

Read it top to bottom: the config, the pieces it builds, then one loop.
Defaults are the original Caffe recipe (sphereface_solver.prototxt and
sphereface_model.prototxt); every value is a flag or a line of a TOML file.
Several processes (`--gpus 0,1`, `--nproc N`, or torchrun) train with
DistributedDataParallel; the batch size is per process, as in Caffe.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from spherecli import UserError, __version__
from spherecli.config import TrainConfig, to_toml
from spherecli.data import EpochBatches, batches, check_images, load_face
from spherecli.features import prepare
from spherecli.formats import (CHECKPOINT_FORMAT, InputSpec, ModelFile, load_checkpoint, read_list,
                               save_checkpoint)
from spherecli.losses import create_head
from spherecli.models import autocast_dtype, create_model


# --------------------------------------------------------------------------- pieces

class Trainee(nn.Module):
    """Network and head as one module, so DDP synchronises both."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x, labels):
        features = self.backbone(x)
        return self.head(features, labels), features


def param_groups(module: nn.Module, weight_decay: float, caffe_rules: bool) -> list[dict]:
    decay, bias = [], []
    for name, p in module.named_parameters():
        (bias if caffe_rules and name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "lr_mult": 1.0}]
    if bias:
        groups.append({"params": bias, "weight_decay": 0.0, "lr_mult": 2.0})
    return groups


def learning_rate(cfg: TrainConfig, it: int) -> float:
    """Caffe's multistep policy at 0-based iteration it, with optional linear warm-up."""
    steps = [s * cfg.max_iter if s < 1 else s for s in cfg.lr_steps]
    lr = cfg.lr * cfg.lr_factor ** sum(it >= s for s in steps)
    if cfg.warmup and it < cfg.warmup:
        lr *= (it + 1) / cfg.warmup
    return lr


def distributed_env() -> tuple[int, int, int]:
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def pick_device(cfg: TrainConfig, local_rank: int) -> torch.device:
    kind = cfg.device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda asked for, but PyTorch sees no GPU")
        return torch.device("cuda", local_rank if kind == "cuda" else int(kind.split(":")[1]))
    return torch.device("cpu")


class Stopped(UserError):
    """Training stopped on purpose (divergence, stall); the last checkpoint is kept."""


# --------------------------------------------------------------------------- training

def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Train on this process's share; under torchrun every process calls this."""
    rank, world, local_rank = distributed_env()
    device = pick_device(cfg, local_rank)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    main = rank == 0
    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.pt"
    if not cfg.list:
        raise UserError("no training list: pass --list LIST (from `sphereface list`)")
    if ckpt_path.exists() and not resume:
        raise UserError(f"{out} already holds a run; add --resume to continue it, "
                        "or choose another --out")
    if resume and not ckpt_path.exists():
        raise UserError(f"--resume: no checkpoint in {out}")

    items, missing = check_images(read_list(cfg.list, cfg.root), cfg.list, cfg.skip_missing)
    num_classes = max(label for _, label in items) + 1
    input_size = load_face(items[0][0]).shape[:2]
    spec = InputSpec(size=input_size)
    torch.manual_seed(cfg.seed)
    backbone = create_model(cfg.arch, input_size=input_size,
                            **({"feature_dim": cfg.feature_dim} if cfg.feature_dim else {}))
    head = create_head(cfg.head, backbone.feature_dim, num_classes,
                       m=cfg.margin,
                       s=cfg.scale, base=cfg.lambda_base, gamma=cfg.lambda_gamma,
                       power=cfg.lambda_power, lambda_min=cfg.lambda_min, hold=cfg.lambda_hold,
                       backward=cfg.backward)
    trainee = Trainee(backbone, head).to(device)
    if cfg.channels_last:
        trainee.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(param_groups(trainee, cfg.weight_decay, cfg.caffe_param_rules),
                                lr=cfg.lr, momentum=cfg.momentum)
    amp_dtype = autocast_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    start = 0
    if resume:
        state = load_checkpoint(ckpt_path, CHECKPOINT_FORMAT)
        trainee.backbone.load_state_dict(state["model"])
        trainee.head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        start = state["iteration"]
    elif cfg.init_from:
        try:
            trainee.backbone.load_state_dict(ModelFile.load(cfg.init_from).weights)
        except RuntimeError as e:
            raise UserError(f"--init-from {cfg.init_from}: its network does not match "
                            f"{cfg.arch} at {input_size}: {str(e).splitlines()[0]}") from None
    if cfg.compile:
        trainee.backbone = torch.compile(trainee.backbone)
    model = nn.parallel.DistributedDataParallel(trainee) if world > 1 else trainee

    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.toml").write_text(to_toml(cfg), encoding="utf-8")
    sampler = EpochBatches(len(items), cfg.batch_size, world, rank, cfg.seed, start, cfg.max_iter)
    # A finished run that is resumed only re-exports its model: no data to load.
    data = (batches(items, sampler, cfg.workers, cfg.cache, pin=device.type == "cuda")
            if start < cfg.max_iter else iter(()))
    model_file = ModelFile(cfg.arch, backbone.model_args, {}, spec, {"config": asdict(cfg)})
    meta = {**model_file.header(), "head_name": cfg.head, "num_classes": num_classes,
            "tool": f"spherecli {__version__}"}

    def checkpoint(it: int) -> None:
        if main:
            save_checkpoint(ckpt_path, {
                "format": CHECKPOINT_FORMAT, **meta, "iteration": it,
                "model": backbone.state_dict(), "head": head.state_dict(),
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []}})

    log = Log(out / "log.jsonl", cfg, num_classes, world, start, main and progress) if main else None
    if main:
        log.note(f"{len(items)} images, {num_classes} identities"
                 + (f", {missing} missing images skipped" if missing else "")
                 + f"; {cfg.arch} + {cfg.head} on {world} x {device}"
                 f" ({'fp32' if amp_dtype is None else str(amp_dtype)[6:]}); batch {cfg.batch_size} x "
                 f"{world} = {cfg.batch_size * world} per iteration; iterations {start}..{cfg.max_iter}")
    stats = torch.zeros(5, device=device)  # loss sum, correct, feature norm sum, images, stop
    interrupted = []

    def on_interrupt(*_):
        if interrupted:  # a second Ctrl-C does not wait for the checkpoint
            raise KeyboardInterrupt
        interrupted.append(1)

    previous_handler = signal.signal(signal.SIGINT, on_interrupt) if main_thread() else None
    model.train()
    try:
        for it in range(start, cfg.max_iter):
            lr = learning_rate(cfg, it)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_mult"]
            x, y = next(data)
            x = prepare(x, spec, device)
            y = y.to(device, non_blocking=True)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits, features = model(x, y)
            loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.clip_grad:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(trainee.parameters(), cfg.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            with torch.no_grad():
                stats[:4] += torch.stack([loss.detach() * len(y), (logits.argmax(1) == y).sum(),
                                          features.detach().float().norm(dim=1).sum(),
                                          torch.tensor(float(len(y)), device=device)])
            done = it + 1
            if main:
                log.tick(done)
            report = done % cfg.display == 0 or done % cfg.snapshot == 0 or done == cfg.max_iter
            if interrupted and world == 1:
                report = True
            if not report:
                continue
            # Ctrl-C reaches every process at a different moment; agree here on stopping.
            stats[4] = float(bool(interrupted))
            if world > 1:
                dist.all_reduce(stats)
            loss_avg, acc, norm = (stats[:3] / stats[3]).tolist()
            stop = stats[4].item() > 0
            stats.zero_()
            if not math.isfinite(loss_avg):
                raise Stopped(f"loss became {loss_avg} by iteration {done}; the last good "
                              f"checkpoint is kept in {ckpt_path}. Lower --lr, or add "
                              "--clip-grad 5 and --warmup 100.")
            if main:
                verdict = log.record(done, loss_avg, acc, norm, lr, getattr(head, "last_lambda", None))
                if verdict and cfg.on_stall != "ignore":
                    if cfg.on_stall == "stop":
                        raise Stopped(verdict)
                    log.note(verdict)
            if done % cfg.snapshot == 0 or done == cfg.max_iter or stop:
                checkpoint(done)
            if stop:
                raise Stopped(f"interrupted: iteration {done} is saved in {ckpt_path}; "
                              "run again with --resume to continue")
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)
        if main:
            log.close()
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    if main:
        model_file.weights = backbone.state_dict()
        model_file.save(out / "model.pt")
        return log.summary
    return {}


def main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class Log:
    """Progress on the terminal, the same numbers in log.jsonl, and the stall watch."""

    def __init__(self, path: Path, cfg: TrainConfig, num_classes: int, world: int, start: int,
                 show: bool):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.file = open(path, "a", encoding="utf-8")
        self.cfg, self.world, self.start = cfg, world, start
        self.chance_loss = math.log(num_classes)
        self.console = Console(stderr=True, highlight=False)
        self.show = show
        self.bar = None
        if show and self.console.is_terminal:
            self.bar = Progress(MofNCompleteColumn(), BarColumn(bar_width=20),
                                TextColumn("{task.description}"), console=self.console)
            self.task = self.bar.add_task("starting", total=cfg.max_iter, completed=start)
            self.bar.start()
        self.t0 = self.t_last = time.perf_counter()
        self.it_last = start
        self.first_norm = None
        self.warned = False
        self.summary = {}

    def note(self, text: str) -> None:
        if self.show:
            self.console.print(text)
        self.file.write(json.dumps({"note": text}) + "\n")
        self.file.flush()

    def tick(self, it: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=it)

    def record(self, it, loss, acc, norm, lr, lam) -> str | None:
        now = time.perf_counter()
        speed = (it - self.it_last) * self.cfg.batch_size * self.world / max(now - self.t_last, 1e-9)
        self.t_last, self.it_last = now, it
        eta = (self.cfg.max_iter - it) * self.cfg.batch_size * self.world / max(speed, 1e-9)
        row = {"iter": it, "loss": round(loss, 5), "acc": round(acc, 5), "lr": lr,
               "lambda": None if lam is None else round(lam, 4), "feature_norm": round(norm, 4),
               "images_per_s": round(speed, 1), "elapsed_s": round(now - self.t0, 1),
               "eta_s": round(eta)}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        self.summary = row
        text = (f"loss {loss:.4f} acc {acc:6.2%}" + ("" if lam is None else f" lambda {lam:.2f}")
                + f" lr {lr:.2e} |x| {norm:.2f} {speed:.0f} img/s eta {eta / 60:.1f} min")
        if self.bar is not None:
            self.bar.update(self.task, completed=it, description=text)
        elif self.show:
            self.console.print(f"iter {it}/{self.cfg.max_iter} {text}")
        return self.stall(it, loss, norm)

    def stall(self, it, loss, norm) -> str | None:
        """SphereFace's two known failures, seen from the loss and the mean feature norm:
        the loss pinned at ln C while the features shrink to nothing, or the loss
        climbing past ln C while the features grow without bound."""
        if self.first_norm is None:
            self.first_norm = norm
            return None
        settle = self.start + max(self.cfg.warmup, 100)
        if self.warned or it < settle:
            return None
        if loss > 0.95 * self.chance_loss and norm < 0.25 * self.first_norm:
            what = (f"training looks stalled: loss {loss:.3f} is still near ln C = {self.chance_loss:.3f} "
                    f"while the mean feature norm fell from {self.first_norm:.3f} to {norm:.3f} (the "
                    "network is learning to say nothing)")
        elif loss > 1.5 * self.chance_loss and norm > 10 * self.first_norm:
            what = (f"training looks unstable: loss {loss:.3f} has climbed past ln C = "
                    f"{self.chance_loss:.3f} while the mean feature norm grew from "
                    f"{self.first_norm:.3f} to {norm:.3f}")
        else:
            return None
        self.warned = True
        return (what + ": SphereFace's 'difficulties in convergence'. Remedies, measured in "
                "docs/training.md: --backward exact --lambda-hold 400 --warmup 100 --clip-grad 5; "
                "or --init-from a softmax-trained checkpoint; or feature-normalised A-Softmax "
                "(--scale 30); or a lower --lr.")

    def close(self):
        if self.bar is not None:
            self.bar.stop()
        self.file.close()


def launch(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Start the processes `--gpus`/`--nproc` ask for with torchrun's launcher, or train here."""
    if "LOCAL_RANK" in os.environ:  # already started by torchrun
        return train(cfg, resume, progress)
    nproc = len(cfg.gpus.split(",")) if cfg.gpus else cfg.nproc
    if cfg.gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = cfg.gpus
        if cfg.device == "cpu":
            raise UserError("--gpus and --device cpu contradict each other")
    if nproc <= 1:
        return train(cfg, resume, progress)
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", run_id=f"spherecli-{os.getpid()}",
                          max_restarts=0, monitor_interval=0.5)
    return elastic_launch(config, train)(cfg, resume, progress)[0]
