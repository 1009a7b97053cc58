"""Stage 4: train a face network with a margin head, from one CPU to many GPUs.

Read it top to bottom: a Trainer is built from the config (network, head,
optimizer, data), `step` is one iteration, `run` is the loop, and what
watches the loop (the log file, the progress display, the stall watch) are
callbacks outside it. Defaults are the original Caffe recipe
(sphereface_solver.prototxt and sphereface_model.prototxt); every value is a
flag or a line of a TOML file. Several processes (`--gpus 0,1`, `--nproc N`,
or torchrun) train with DistributedDataParallel; the batch size is per
process, as in Caffe.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from spherecli.core.errors import CtrlC, Interrupted, UserError
from spherecli.core.config import TrainConfig, to_toml
from spherecli.core.data import EpochBatches, batches, check_images, load_face
from spherecli.models.features import prepare
from spherecli.core.devices import check_gpus, resolve_device
from spherecli.core.formats import (Checkpoint, ImageList, InputSpec, JsonlAppender, ModelFile, RunFolder,
                                    cache_key_path, read_list)
from spherecli.training.heads import check_head, create_head
from spherecli.models import autocast_dtype, create_model
from spherecli.core.outputs import Outputs, locked
from spherecli.core.parallel import cpu_count


class Trainee(nn.Module):
    """Network and head as one module, so DDP synchronises both."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x, labels):
        features = self.backbone(x)
        return self.head(features, labels), features

    def param_groups(self, weight_decay: float, caffe_rules: bool) -> list[dict]:
        """The original's rules: biases learn at twice the rate and do not decay."""
        decay, bias = [], []
        for name, p in self.named_parameters():
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
    kind = resolve_device(cfg.device)
    if kind.startswith("cuda"):
        return torch.device("cuda", local_rank if kind == "cuda" else int(kind.split(":")[1]))
    return torch.device("cpu")


class Stopped(UserError):
    """Training stopped on purpose (divergence, stall); what is saved is said."""


# --------------------------------------------------------------------------- the trainer

class Trainer:
    """A training run: everything `build` makes from a config, and its state.

    `state_dict` / `load_state_dict` are the checkpoint; `step` is one update
    (override it to change the update); `run` feeds it batches, reports every
    `display` iterations to the callbacks and checkpoints every `snapshot`.
    """

    def __init__(self, cfg: TrainConfig, trainee: Trainee, spec: InputSpec, items: ImageList, *,
                 device: torch.device, rank: int = 0, world: int = 1, missing: int = 0):
        self.cfg, self.trainee, self.spec, self.items = cfg, trainee, spec, items
        self.device, self.rank, self.world, self.missing = device, rank, world, missing
        self.num_classes = int(items.labels.max()) + 1
        self.optimizer = torch.optim.SGD(trainee.param_groups(cfg.weight_decay, cfg.caffe_param_rules),
                                         lr=cfg.lr, momentum=cfg.momentum)
        self.amp_dtype = autocast_dtype(cfg.amp, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.iteration = 0
        if cfg.compile:
            # In place: torch.compile(module) would wrap it, and the wrapper's state_dict keys
            # ("_orig_mod.conv1...") would neither load into a plain network nor resume.
            trainee.backbone.compile()
        # What runs forward: DDP synchronises network and head gradients across the processes.
        self.model = nn.parallel.DistributedDataParallel(trainee) if world > 1 else trainee
        self.folder = RunFolder(Path(cfg.out))

    @classmethod
    def build(cls, cfg: TrainConfig, *, rank: int = 0, world: int = 1,
              device: torch.device | str = "cpu") -> "Trainer":
        """Read the list, build network and head from the seed, put them on the device."""
        device = torch.device(device)
        if not cfg.list:
            raise UserError("no training list: give `list`, a list from `sphereface list`")
        items, missing = check_images(read_list(cfg.list, cfg.root), cfg.list, cfg.skip_missing)
        check_labels(items, cfg.list)
        input_size = load_face(items[0][0]).shape[:2]
        torch.manual_seed(cfg.seed)
        backbone = create_model(cfg.arch, input_size=input_size,
                                **({"feature_dim": cfg.feature_dim} if cfg.feature_dim else {}))
        num_classes = int(items.labels.max()) + 1
        head = create_head(cfg.head, backbone.feature_dim, num_classes, **cfg.head_args)
        trainee = Trainee(backbone, head).to(device)
        if cfg.channels_last:
            trainee.to(memory_format=torch.channels_last)
        return cls(cfg, trainee, InputSpec(size=input_size), items, device=device, rank=rank,
                   world=world, missing=missing)

    # ----------------------------------------------------------------------- state

    def model_file(self) -> ModelFile:
        backbone = self.trainee.backbone
        return ModelFile(self.cfg.arch, backbone.model_args, backbone.state_dict(), self.spec,
                         {"config": asdict(self.cfg)})

    def state_dict(self) -> Checkpoint:
        rng = {"torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else []}
        return Checkpoint(self.model_file(), self.cfg.head, self.num_classes, self.trainee.head.state_dict(),
                          self.optimizer.state_dict(), self.scaler.state_dict(), self.iteration, rng)

    def load_state_dict(self, state: Checkpoint) -> None:
        try:
            self.trainee.backbone.load_state_dict(state.model.weights)
            self.trainee.head.load_state_dict(state.head)
            self.optimizer.load_state_dict(state.optimizer)
        except (RuntimeError, ValueError) as e:
            raise UserError(f"{self.folder.checkpoint}: the checkpoint does not fit {self.cfg.arch} + "
                            f"{self.cfg.head} on {self.num_classes} identities ({str(e).splitlines()[0]}); "
                            "resume with the run's own settings, or train into another `out`") from None
        self.scaler.load_state_dict(state.scaler)
        torch.set_rng_state(state.rng["torch"])
        if self.device.type == "cuda" and state.rng["cuda"]:
            torch.cuda.set_rng_state_all(state.rng["cuda"])
        self.iteration = state.iteration

    def init_from(self, path: str) -> None:
        """Start from another run's network weights (e.g. softmax-trained); the head stays fresh."""
        try:
            self.trainee.backbone.load_state_dict(ModelFile.load(path).weights)
        except RuntimeError as e:
            raise UserError(f"`init_from` {path}: its network does not match {self.cfg.arch} at "
                            f"{self.spec.size}: {str(e).splitlines()[0]}") from None

    # ----------------------------------------------------------------------- the loop

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One update on a uint8 batch x with labels y on the device: (loss, logits, features)."""
        lr = learning_rate(self.cfg, self.iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        x = prepare(x, self.spec, self.device)
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            logits, features = self.model(x, y)
        loss = self.trainee.head.loss(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.clip_grad:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.trainee.parameters(), self.cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.iteration += 1
        return loss, logits, features

    def run(self, data, callbacks=(), interrupted=lambda: False) -> dict:
        """Train to max_iter. Every `display` iterations the averages over the processes
        go to each callback's `report(row)`, which may return a reason to stop."""
        cfg, device = self.cfg, self.device
        stats = torch.zeros(5, device=device)  # loss sum, correct, feature norm sum, images, stop
        row: dict = {}
        while self.iteration < cfg.max_iter:
            x, y = next(data)
            y = y.to(device, non_blocking=True)
            loss, logits, features = self.step(x, y)
            with torch.no_grad():
                stats[:4] += torch.stack([loss.detach() * len(y), (logits.argmax(1) == y).sum(),
                                          features.detach().float().norm(dim=1).sum(),
                                          torch.tensor(float(len(y)), device=device)])
            done = self.iteration
            for cb in callbacks:
                cb.tick(done)
            snapshot = done % cfg.snapshot == 0 or done == cfg.max_iter
            if not (done % cfg.display == 0 or snapshot or (interrupted() and self.world == 1)):
                continue
            # Ctrl-C reaches every process at a different moment; agree here on stopping.
            stats[4] = float(interrupted())
            if self.world > 1:
                dist.all_reduce(stats)
            loss_avg, acc, norm = (stats[:3] / stats[3]).tolist()
            stop = stats[4].item() > 0
            stats.zero_()
            if not math.isfinite(loss_avg):
                raise Stopped(f"loss became {loss_avg} by iteration {done}; {self.saved()}. Lower `lr`, "
                              "or set `clip_grad` 5 and `warmup` 100")
            lr = self.optimizer.param_groups[0]["lr"]  # the step's; group 0 has lr_mult 1
            row = {"iter": done, "loss": loss_avg, "acc": acc, "lr": lr, **self.trainee.head.metrics(),
                   "feature_norm": norm}
            reasons = [r for cb in callbacks if (r := cb.report(row))]
            if snapshot or stop:
                self.save()
            if reasons:
                raise Stopped(reasons[0])
            if stop:
                raise Interrupted(f"interrupted: iteration {done} is saved in {self.folder.checkpoint}; "
                                  "run again with `resume` to continue")
        return row

    def save(self) -> None:
        if self.rank == 0:
            self.state_dict().save(self.folder.checkpoint)

    def saved(self) -> str:
        """What a run stopped now leaves to resume from."""
        if self.folder.checkpoint.exists():
            at = Checkpoint.load(self.folder.checkpoint).iteration
            return f"the last good checkpoint, iteration {at}, is kept in {self.folder.checkpoint}"
        return (f"no checkpoint was written yet (the first is due at iteration {self.cfg.snapshot}); "
                "`resume` starts the run again from the beginning")


# --------------------------------------------------------------------------- what watches the loop

class Callback:
    """Told of every iteration (tick) and every report; report may return a reason to stop."""

    def tick(self, it: int) -> None:
        pass

    def report(self, row: dict) -> str | None:
        return None

    def close(self) -> None:
        pass


class LogFile(Callback):
    """log.jsonl: one row per report, and notes; a line cut by a kill is repaired first."""

    def __init__(self, path: Path, cfg: TrainConfig, world: int, start: int):
        self.out = JsonlAppender(path)
        self.images_per_iter = cfg.batch_size * world
        self.max_iter = cfg.max_iter
        self.t0 = self.t_last = time.perf_counter()
        self.it_last = start
        self.last: dict = {}

    def note(self, text: str) -> None:
        self.out.write([{"note": text}])

    def report(self, row: dict) -> None:
        now = time.perf_counter()
        speed = (row["iter"] - self.it_last) * self.images_per_iter / max(now - self.t_last, 1e-9)
        self.t_last, self.it_last = now, row["iter"]
        self.last = {**row, "loss": round(row["loss"], 5), "acc": round(row["acc"], 5),
                     "feature_norm": round(row["feature_norm"], 4), "images_per_s": round(speed, 1),
                     "elapsed_s": round(now - self.t0, 1),
                     "eta_s": round((self.max_iter - row["iter"]) * self.images_per_iter / max(speed, 1e-9))}
        self.out.write([self.last])

    def close(self) -> None:
        self.out.close()


class Display(Callback):
    """Progress on the terminal: a bar with the last numbers, or plain lines when not a terminal."""

    def __init__(self, log: LogFile, max_iter: int, start: int, show: bool):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.log, self.max_iter, self.show = log, max_iter, show
        self.console = Console(stderr=True, highlight=False)
        self.bar = None
        if show and self.console.is_terminal:
            self.bar = Progress(MofNCompleteColumn(), BarColumn(bar_width=20),
                                TextColumn("{task.description}"), console=self.console)
            self.task = self.bar.add_task("starting", total=max_iter, completed=start)
            self.bar.start()

    def note(self, text: str) -> None:
        if self.show:
            self.console.print(text)

    def tick(self, it: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=it)

    def report(self, row: dict) -> None:
        r = self.log.last
        text = (f"loss {r['loss']:.4f} acc {r['acc']:6.2%}"
                + (f" lambda {r['lambda']:.2f}" if "lambda" in r else "")
                + f" lr {r['lr']:.2e} |x| {r['feature_norm']:.2f} {r['images_per_s']:.0f} img/s "
                  f"eta {r['eta_s'] / 60:.1f} min")
        if self.bar is not None:
            self.bar.update(self.task, completed=row["iter"], description=text)
        elif self.show:
            self.console.print(f"iter {row['iter']}/{self.max_iter} {text}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


class StallWatch(Callback):
    """SphereFace's two known failures, seen from the loss and the mean feature norm:
    the loss pinned at chance (ln C for a softmax; the head says) while the features
    shrink to nothing, or the loss climbing past it while the features grow without bound. Warns once (a note
    in the log and on the terminal) or stops the run, as `on_stall` says."""

    def __init__(self, chance_loss: float, settle: int, action: str, notes=()):
        self.chance_loss = chance_loss
        self.settle, self.action, self.notes = settle, action, notes
        self.first_norm = None
        self.warned = False

    def report(self, row: dict) -> str | None:
        verdict = self.verdict(row["iter"], row["loss"], row["feature_norm"])
        if verdict is None or self.action == "ignore":
            return None
        if self.action == "stop":
            return verdict
        for note in self.notes:
            note(verdict)
        return None

    def verdict(self, it: int, loss: float, norm: float) -> str | None:
        if self.first_norm is None:
            self.first_norm = norm
            return None
        if self.warned or it < self.settle:
            return None
        if loss > 0.95 * self.chance_loss and norm < 0.25 * self.first_norm:
            what = (f"training looks stalled: loss {loss:.3f} is still near chance, {self.chance_loss:.3f} "
                    "(ln C for a softmax head), "
                    f"while the mean feature norm fell from {self.first_norm:.3f} to {norm:.3f} (the "
                    "network is learning to say nothing)")
        elif loss > 1.5 * self.chance_loss and norm > 10 * self.first_norm:
            what = (f"training looks unstable: loss {loss:.3f} has climbed past chance, "
                    f"{self.chance_loss:.3f}, while the mean feature norm grew from "
                    f"{self.first_norm:.3f} to {norm:.3f}")
        else:
            return None
        self.warned = True
        return (what + ": SphereFace's 'difficulties in convergence'. Remedies, measured in "
                "docs/training.md: --backward exact --lambda-hold 400 --warmup 100 --clip-grad 5; "
                "or --init-from a softmax-trained checkpoint; or feature-normalised A-Softmax "
                "(--scale 30); or a lower --lr.")


def check_labels(items: ImageList, where: str) -> None:
    """Labels are 0..C-1: the head gets a row for every label up to the largest, so one far
    above the rest would build a head of mostly empty classes."""
    labels = np.unique(items.labels)
    top = int(labels[-1])
    if top + 1 > 2 * len(labels):
        raise UserError(f"{where}: label {top} is far above the other labels ({len(labels)} identities); "
                        "labels run 0..C-1, as `sphereface list` writes them")


# --------------------------------------------------------------------------- one process

def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Train on this process's share; under torchrun every process calls this."""
    rank, world, local_rank = distributed_env()
    device = pick_device(cfg, local_rank)
    if world > 1 and device.type == "cpu":
        # Each process takes its share of the cores, as torchrun would; all of them each
        # would fight over the same cores.
        torch.set_num_threads(max(1, cpu_count() // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    folder = RunFolder(Path(cfg.out))
    if folder.checkpoint.exists() and not resume:
        raise UserError(f"{folder.path} already holds a run; add `resume` to continue it, "
                        "or choose another `out`")
    if rank > 0:
        return _train(cfg, folder, resume, progress, rank, world, device)
    with Outputs([cfg.list, cfg.init_from, cfg.root]) as outputs:
        outputs.folder(folder.path)
        for path in (folder.config, folder.log, folder.checkpoint, folder.model):
            outputs.file(path, "run file")
        if cfg.cache_file:
            outputs.file(cfg.cache_file, "image cache")
            outputs.file(cache_key_path(cfg.cache_file), "cache key")
        with locked(folder.path / "train", "training run"):
            return _train(cfg, folder, resume, progress, rank, world, device)


def _train(cfg: TrainConfig, folder: RunFolder, resume: bool, progress: bool, rank: int, world: int,
           device: torch.device) -> dict:
    trainer = Trainer.build(cfg, rank=rank, world=world, device=device)
    if resume:
        trainer.load_state_dict(Checkpoint.load(folder.checkpoint))
    elif cfg.init_from:
        trainer.init_from(cfg.init_from)
    main = rank == 0
    start = trainer.iteration
    callbacks = []
    if main:
        folder.path.mkdir(parents=True, exist_ok=True)
        folder.config.write_text(to_toml(cfg), encoding="utf-8")
        log = LogFile(folder.log, cfg, world, start)
        display = Display(log, cfg.max_iter, start, progress)
        watch = StallWatch(trainer.trainee.head.chance_loss(trainer.num_classes),
                           start + max(cfg.warmup, 100), cfg.on_stall, (log.note, display.note))
        callbacks = [log, display, watch]
        precision = "fp32" if trainer.amp_dtype is None else str(trainer.amp_dtype)[6:]
        said = [f"{len(trainer.items)} images, {trainer.num_classes} identities"
                + (f", {trainer.missing} missing images skipped" if trainer.missing else "")
                + f"; {cfg.arch} + {cfg.head} on {world} x {device} ({precision}); batch {cfg.batch_size} x "
                  f"{world} = {cfg.batch_size * world} per iteration; iterations {start}..{cfg.max_iter}"]
        if cfg.device == "auto" and device.type == "cpu":
            said.append("--device auto: PyTorch sees no GPU, so this trains on the CPU")
        if cfg.max_iter == 0:
            said.append("max_iter is 0: model.pt will be the network as initialised, untrained")
        for note in said:
            log.note(note)
            display.note(note)
    sampler = EpochBatches(len(trainer.items), cfg.batch_size, world, rank, cfg.seed, start, cfg.max_iter)
    data = iter(())  # a finished run that is resumed only re-exports its model
    if start < cfg.max_iter:
        # A cache file is made once, by rank 0, while the others wait at the barrier to open it.
        shared = bool(cfg.cache_file) and world > 1
        if shared and rank > 0:
            dist.barrier()
        data = batches(trainer.items, trainer.spec.size, sampler, cfg.workers, cfg.cache,
                       pin=device.type == "cuda", cache_file=cfg.cache_file, build=rank == 0)
        if shared and rank == 0:
            dist.barrier()
    trainer.model.train()
    try:
        with CtrlC() as ctrl_c, ctrl_c.hold():  # Ctrl-C ends the run at a saved checkpoint
            trainer.run(data, callbacks, lambda: ctrl_c.pressed)
    except Stopped as e:
        if main:
            log.note(f"stopped: {e}")
        raise
    finally:
        for cb in callbacks:
            cb.close()
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    if main:
        trainer.model_file().save(folder.model)
        return log.last
    return {}


def launch(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Start the processes `--gpus`/`--nproc` ask for with torchrun's launcher, or train here."""
    check_head(cfg.head, cfg.head_args)  # before any work, said once and not by every process
    if "LOCAL_RANK" in os.environ:  # already started by torchrun
        return train(cfg, resume, progress)
    nproc = len(check_gpus(cfg.gpus)) if cfg.gpus else cfg.nproc
    if cfg.gpus:
        if cfg.device == "cpu":
            raise UserError("`gpus` and `device` cpu contradict each other")
        os.environ["CUDA_VISIBLE_DEVICES"] = cfg.gpus
    if nproc <= 1:
        return train(cfg, resume, progress)
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", run_id=f"spherecli-{os.getpid()}",
                          max_restarts=0, monitor_interval=0.5)
    results = elastic_launch(config, _launched)(cfg, resume, progress)
    failed = next((r for _, r in sorted(results.items()) if "error" in r), None)
    if failed:
        raise {"Interrupted": Interrupted, "Stopped": Stopped}.get(failed["kind"], UserError)(failed["error"])
    return results[0]


def _launched(cfg: TrainConfig, resume: bool, progress: bool) -> dict:
    """train() in a process the launcher started: an expected failure comes back as a value,
    so that it is said once, by the launcher, and not as every process's traceback."""
    try:
        return train(cfg, resume, progress)
    except UserError as e:
        return {"error": str(e), "kind": type(e).__name__}
