"""The `sphereface` command: flags mapped onto the stage modules' calls, and the one
place (main) where an expected failure becomes a single `error:` line."""

from __future__ import annotations

import functools
import sys
from contextlib import nullcontext
from dataclasses import MISSING
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from spherecli.core.config import EVAL_FIELDS, EvalSettings, VideoSettings, field_type
from spherecli.core.errors import Interrupted, UserError, __version__
from spherecli.core.registry import (FEATURE_DTYPES, IMPORT_FORMATS, SEARCH_BY, LFW_PATTERN, NO_FACE_RULES,
                                     REFERENCES, SELECT_RULES)
from spherecli.core.validate import COSINE, COUNT, FRACTION, Range
from spherecli.recognition.search import AUTO_EXACT, INDEX_CHOICES

# Tables and notes: as wide as a terminal, or 200 columns into a file or pipe (not 80).
console = Console(stderr=True, soft_wrap=True, highlight=False, width=None if sys.stderr.isatty() else 200)


def stdout() -> Console:
    return Console(width=None if sys.stdout.isatty() else 200, highlight=False)


def show(title: str, summary: dict) -> None:
    """A stage summary as a two-column table."""
    console.print(f"[bold]{title}[/bold]")
    table = Table(show_header=False)
    for key, value in summary.items():
        table.add_row(key.replace("_", " "), str(value))
    console.print(table)


def as_flags(message: str) -> str:
    """The library names a setting in backquotes (`far`, `init_from`); here it is a flag
    (--far, --init-from). A backquoted word that no command declares stays as it is."""
    import re

    flags = declared_flags()
    return re.sub(r"`([a-z][a-z_]*)`", lambda m: flags.get(m.group(1), m.group(0)), message)


@functools.cache
def declared_flags() -> dict[str, str]:
    """Every command's long flags, by the setting name they stand for."""
    return {o[2:].replace("-", "_"): o for c in leaf_commands().values() for p in c.params
            for o in getattr(p, "opts", ()) if o.startswith("--")}


def leaf_commands(group=None, prefix: str = "") -> dict[str, click.Command]:
    """Every command that runs, by its words after `sphereface` ("evaluate", "gallery enrol")."""
    found = {}
    for name, command in sorted((group or cli).commands.items()):
        if isinstance(command, click.Group):
            found.update(leaf_commands(command, f"{prefix}{name} "))
        else:
            found[prefix + name] = command
    return found


def notes(lines) -> None:
    for line in lines:
        console.print(f"note: {as_flags(line)}")


class Number(click.ParamType):
    """A number inside a Range (spherecli.core.validate), or `count` of them comma-separated
    (0: any number of them); NaN and infinities never pass."""

    def __init__(self, range: Range, count: int | None = None):
        self.range, self.count = range, count
        self.name = range.describe()

    def get_metavar(self, param, ctx=None) -> str:
        """The value's form and range: N>=1, 0<X<1, X,X,X with 0<=X<=1."""
        r, v = self.range, "N" if self.range.integer else "X"
        lo = "" if r.lo is None else f"{r.lo:g}{'<' if r.lo_open else '<='}"
        hi = "" if r.hi is None else f"{'<' if r.hi_open else '<='}{r.hi:g}"
        form = lo + v + hi if lo or hi else v
        if lo and not hi:
            form = f"{v}{'>' if r.lo_open else '>='}{r.lo:g}"
        if self.count is None:
            return form
        return (",".join([v] * self.count) if self.count else f"{v},...") + f" ({form})"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        name = param.opts[0] if param is not None else "value"
        try:
            if self.count is None:
                return self.range.check(value, name)
            parts = [v for v in str(value).split(",") if v.strip()]
            if self.count and len(parts) != self.count:
                raise UserError(f"{name}: expected {self.count} comma-separated numbers, got {value!r}")
            return tuple(self.range.check(v, name) for v in parts)
        except UserError as e:
            self.fail(str(e).removeprefix(f"{name}: "), param, ctx)


class OutputPath(click.Path):
    """A path the command writes: a file of one of formats.KINDS, or a folder. The stage
    functions check it through spherecli.core.outputs; the declaration is what the tests
    generated from this file read."""

    def __init__(self, kind: str | None = None, folder: bool = False):
        # No kind and no folder: a file or a folder, as the command decides (identify --annotate).
        super().__init__(dir_okay=folder or kind is None, file_okay=not folder, path_type=Path)
        self.kind, self.folder = kind, folder


FILE = click.Path(dir_okay=False, path_type=Path)
EXISTING_FILE = click.Path(dir_okay=False, exists=True, path_type=Path)
EXISTING_FOLDER = click.Path(file_okay=False, exists=True, path_type=Path)
FOLDER_OR_FEATURES = click.Path(exists=True, path_type=Path)
quiet = click.option("-q", "--quiet", is_flag=True, help="No progress display.")
select = click.option("--select", type=click.Choice(SELECT_RULES), default="center",
                      help="Which face of a photo with several: nearest the centre (the original), "
                           "largest, most confident.")
model = click.option("--model", type=EXISTING_FILE, required=True,
                     help="model.pt from `sphereface train` or `sphereface import`, a checkpoint, or an ONNX "
                          "face network.")


threads = click.option("--threads", type=Number(COUNT), default=1, help="CPU threads (torch and "
                       "onnxruntime): one was as fast as two for photos on 2 idle cores, and 4x faster "
                       "while other work shares them (docs/benchmarks.md).")




def scoring(fn):
    fn = click.option("--threshold", type=Number(COSINE), help="Cosine threshold for 'same person'.  "
                      "[default: the calibration's best on LFW, else 0.2]")(fn)
    fn = click.option("--far", type=Number(FRACTION), help="Choose the threshold that accepts at most this "
                      "fraction of the calibration set's different-person pairs, e.g. 1e-3.")(fn)
    return click.option("--calibration", type=EXISTING_FILE, help="Evaluation result JSON whose mean "
                        "feature and threshold to use.  [default: MODEL.lfw.json]")(fn)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="sphereface")
def cli():
    """SphereFace (CVPR 2017) face recognition, stage by stage.

    \b
    detect    faces and 5 landmarks with MTCNN     -> landmark manifest (JSON Lines)
    align     similarity transform to 112x96        -> aligned image folder
    list      one `path label` line per image       -> training list
    train     SphereFace networks with A-Softmax    -> checkpoints and model.pt
    evaluate  LFW 10-fold verification              -> accuracy table and JSON

    \b
    verify    are two photos the same person?
    identify  name the faces of photos or a video from a gallery
    gallery   enrol known people once, search them many times
    megaface  identification among distractors (MegaFace's protocol)
    embed     features of a folder of photos         -> .npz
    export    the network to ONNX, torch.export or TorchScript
    import    a published model (Caffe SphereFace, sphere20a, MobileFaceNet)
    afs       angular Fisher score of a model on labelled faces
    report    compare training runs
    """


def field_option(f, type_=None, default=MISSING):
    """A settings dataclass field as a click option: its flag, default, help, and its range or
    choices as the option's type, so that both check the same way."""
    flag = "--" + f.name.replace("_", "-")
    default, meta = f.default if default is MISSING else default, f.metadata
    if isinstance(default, bool):
        return click.option(f"{flag}/--no-{flag[2:]}", f.name, default=default, help=meta["help"])
    if type_ is None:
        type_ = (click.Choice(meta["choices"]) if meta.get("choices")
                 else Number(meta["range"], len(default) if isinstance(default, tuple) else None)
                 if meta.get("range") else field_type(f))
    if isinstance(default, tuple):
        default = ",".join(map(str, default))
    if isinstance(type_, click.Path) and not default:
        default = None  # an empty path would be checked as one
    return click.option(flag, f.name, type=type_, default=default, show_default=default not in (None, ""),
                        help=meta["help"])


# Options that the recognition commands share with evaluate's settings.
device = field_option(EVAL_FIELDS["device"])
input_spec = field_option(EVAL_FIELDS["input_spec"])


def flip(default: str):
    return field_option(EVAL_FIELDS["flip"], default=default)


def settings_options(cls, types: dict | None = None):
    """One option per field of a settings dataclass (DetectSettings, TrainConfig)."""
    from dataclasses import fields

    def decorate(fn):
        for f in reversed([f for f in fields(cls) if "help" in f.metadata and f.name != "head_args"]):
            fn = field_option(f, (types or {}).get(f.name))(fn)
        return fn
    return decorate


def detect_settings(fn):
    from spherecli.core.config import DetectSettings

    return settings_options(DetectSettings)(fn)


@cli.command()
@click.argument("root", type=EXISTING_FOLDER)
@click.option("-o", "--output", type=OutputPath("manifest"), help="Manifest to write or resume.  "
              "[default: ROOT.landmarks.jsonl]")
@detect_settings
@device
@click.option("--batch-size", default=16, type=Number(COUNT), help="Same-sized images per MTCNN call.")
@click.option("--workers", type=Number(COUNT), help="Detector processes.  [default: cores on CPU, 2 on GPU]")
@click.option("--shard", help="K/N: process only the K-th of N deterministic parts of ROOT.")
@click.option("--strict", is_flag=True, help="Fail (exit 2) at the first unreadable image.")
@click.option("--retry-errors", is_flag=True, help="Try again images recorded as errors.")
@click.option("--max-pixels", default=100_000_000, type=Number(Range(1, integer=True)),
              help="Larger images are recorded as errors, not decoded (a tiny file can decode to gigabytes).")
@quiet
def detect(root, output, device, batch_size, workers, shard, strict, retry_errors, max_pixels, quiet,
           **settings):
    """Detect faces and landmarks in every image under ROOT.

    Writes one JSON record per image (docs/formats.md); re-running the same
    command resumes, skipping images already recorded.
    """
    from spherecli.core.config import DetectSettings
    from spherecli.preprocess.detect import detect_tree

    summary = detect_tree(root, output, DetectSettings(**settings), device=device, batch_size=batch_size,
                          workers=workers, shard=shard, strict=strict, retry_errors=retry_errors,
                          max_pixels=max_pixels, progress=not quiet)
    show(f"detect -> {summary.pop('manifest')}", summary)


@cli.command()
@click.argument("sources", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=OutputPath(folder=True),
              help="Folder of aligned faces.  [default: <image root>-112X96]")
@click.option("--root", type=click.Path(file_okay=False), help="Folder the image paths are relative to "
              "(needed for landmark text files; overrides the manifest's root).")
@click.option("--reference", type=click.Choice(list(REFERENCES)), default="sphereface",
              help="Reference points: the original's (112x96) or insightface's ArcFace points (112x112), "
                   "for networks aligned that way.")
@click.option("--size", help="Crop HEIGHTxWIDTH; reference points scale with the height and are centred "
              "horizontally (SphereFace's at 112x112 move 8 px right).  [default: the reference's own]")
@click.option("--jpeg-quality", default=95, type=Number(Range(1, 100, integer=True)),
              help="JPEG quality of the crops (Matlab's imwrite used 75).")
@click.option("--workers", type=Number(COUNT), help="Processes.  [default: number of cores]")
@click.option("--overwrite", is_flag=True, help="Redo crops that already exist.")
@click.option("--no-face", type=click.Choice(NO_FACE_RULES), default="skip",
              help="Images without a detected face: skip them (original), or crop them at the mean landmark "
                   "position of the manifest's other images (for test sets like LFW, where every image must "
                   "be scored).")
@quiet
def align(sources, output, root, reference, size, jpeg_quality, workers, overwrite, no_face, quiet):
    """Align the faces of one or more landmark manifests (or text files).

    A landmark text file has lines `relative/path.jpg x1 y1 x2 y2 ... x5 y5`
    (left eye, right eye, nose, left and right mouth corners).
    """
    from spherecli.preprocess.align import align_manifests, parse_size

    summary = align_manifests(sources, output, root=root, size=parse_size(size) if size else None,
                              reference=reference, jpeg_quality=jpeg_quality, workers=workers,
                              overwrite=overwrite, no_face=no_face, progress=not quiet)
    for line in summary.pop("errors"):
        console.print(f"[red]error[/red] {line}")
    show(f"align -> {summary.pop('output')}", summary)


@cli.command(name="list")
@click.argument("aligned_dirs", nargs=-1, required=True, type=EXISTING_FOLDER)
@click.option("-o", "--output", type=OutputPath("list"), help="List file.  [default: ALIGNED_DIR.txt]")
@click.option("--exclude", multiple=True, help="Identity to leave out: a name, comma-separated names, or a "
              "file of names; repeatable. `casia-lfw` stands for the three CASIA-WebFace identities that "
              "overlap LFW, which the original drops.")
@click.option("--min-images", default=1, type=Number(COUNT), help="Leave out identities with fewer images.")
@click.option("--relative", is_flag=True, help="Write paths relative to the list file's folder, not "
              "absolute.")
def list_(aligned_dirs, output, exclude, min_images, relative):
    """Write the training list: one `path label` line per aligned image.

    Labels are 0..C-1 over the sorted identity folder names. Counts and the
    label -> name table are written next to it, in LIST.txt.json.
    """
    from spherecli.preprocess.lists import build_list, read_exclusions

    summary = build_list(list(aligned_dirs), output, exclude=read_exclusions(exclude), min_images=min_images,
                         relative=relative)
    summary.pop("names")
    missing = summary.pop("exclusions_not_found")
    notes([f"--exclude: no identity folder {', '.join(missing)}"] if missing else [])
    show(f"list -> {summary['list']}", summary)


def config_options(fn):
    """One option per TrainConfig field and head setting: the CLI and the TOML file speak the same names."""
    from spherecli.core.config import HEAD_SETTINGS, TrainConfig

    for name, (kind, text, rng) in reversed(HEAD_SETTINGS.items()):
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            fn = click.option(flag + "/" + flag.replace("--", "--no-", 1), name, default=None, help=text)(fn)
            continue
        fn = click.option(flag, name, help=text,
                          type=click.Choice(kind) if isinstance(kind, tuple) else Number(rng) if rng
                          else kind)(fn)
    paths = {"list": EXISTING_FILE, "root": EXISTING_FOLDER, "init_from": EXISTING_FILE,
             "out": OutputPath(folder=True), "cache_file": OutputPath("image cache"),
             "lr_steps": Number(Range(0), count=0)}
    return settings_options(TrainConfig, paths)(fn)


@cli.command()
@click.option("--config", "config_file", type=EXISTING_FILE, help="TOML file of options (same names as the "
              "flags, with underscores; the head's under [head]); flags given here override it.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint (start it if "
              "there is none).")
@click.option("--list-archs", is_flag=True, help="List the networks with their sizes and exit.")
@quiet
@config_options
@click.pass_context
def train(ctx, config_file, resume, list_archs, quiet, **values):
    """Train a face network on a list from `sphereface list`.

    The defaults are the original recipe: SphereFace-20, A-Softmax m=4,
    SGD lr 0.1 (x0.1 at 16k and 24k), 28k iterations, batch 256 per GPU.
    The run folder gets config.toml, log.jsonl, checkpoint.pt (to resume)
    and, at the end, model.pt (the network alone).
    """
    if list_archs:
        from spherecli.models import describe

        table = Table("arch", "network", "feature", "parameters (112x96)")
        for row in describe():
            table.add_row(*row)
        stdout().print(table)
        return
    from spherecli.core.config import HEAD_SETTINGS, resolve
    from spherecli.training.train import launch

    # Only what was typed overrides the config file and a resumed run's settings.
    typed = {k: str(v) if isinstance(v, Path) else v for k, v in values.items()
             if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE}
    head = {k: typed.pop(k) for k in list(typed) if k in HEAD_SETTINGS}
    if "head" in typed:
        head["type"] = typed.pop("head")
    cfg, resuming = resolve(config_file, typed | ({"head": head} if head else {}), resume)
    summary = launch(cfg, resuming, progress=not quiet)
    if summary:  # under torchrun only rank 0 reports
        show(f"train -> {cfg.out}", summary)


@cli.command()
@click.option("--pairs", type=EXISTING_FILE,
              help="Pair list in the LFW format (pairs.txt: header, then 'name i j' / 'name1 i name2 j').")
@click.option("--benchmarks", "benchmarks_file", type=EXISTING_FILE, help="Instead of --pairs and --data: a "
              "TOML file naming benchmarks (LFW-format pairs, CFP's protocol, insightface .bin files) and "
              "their aligned crops; each gets MODEL.<name>.json and a line of one table (docs/formats.md).")
@click.option("--benchmark", "names", multiple=True, help="With --benchmarks: only this one; repeatable.")
@click.option("--model", type=EXISTING_FILE, help="model.pt from `sphereface train` or `sphereface "
              "import`, a checkpoint, or an ONNX face network.")
@click.option("--data", type=EXISTING_FOLDER, help="Aligned images of the pair list (e.g. lfw-112X96).")
@click.option("--features", type=EXISTING_FILE, help="Evaluate features saved by --save-features instead.")
@click.option("--save-features", type=OutputPath("features"), help="Write image names and features to this "
              ".npz.")
@click.option("--pattern", default=LFW_PATTERN, help="Image path of (name, number) under --data.")
@settings_options(EvalSettings)
@click.option("-o", "--output", type=OutputPath("result"), help="Result JSON.  [default: MODEL.lfw.json for "
              "LFW's own pairs "
              "(the calibration verify and identify use), MODEL.<pairs file name>.json for others]")
@click.option("--roc", type=OutputPath("png"), help="Also draw the ROC curve into this PNG.")
@click.option("--scores", type=OutputPath("scores"), help="Also write every pair's held-out score into this "
              "CSV.")
@quiet
def evaluate(pairs, benchmarks_file, names, model, data, features, save_features, pattern, output, roc,
             scores, quiet, **settings):
    """Verification accuracy on a pair list (LFW view 2), as the original evaluation.m, or
    on several benchmarks at once.

    Prints the per-fold table and the mean; writes every number (folds,
    thresholds, ROC AUC, EER, TAR at FAR 1e-3 and 1e-2, best single
    threshold, the calibration) to the result JSON.
    """
    from spherecli.evaluation.evaluate import evaluate as run, fold_table, summary_lines

    if benchmarks_file:
        from spherecli.evaluation.datasets import load_benchmarks
        from spherecli.evaluation.evaluate import SUMMARY_COLUMNS, evaluate_many, summary_row

        if model is None:
            raise UserError("--benchmarks needs --model")
        others = {"pairs": pairs, "data": data, "features": features, "output": output, "roc": roc,
                  "scores": scores, "save-features": save_features}
        given = [f"--{k}" for k, v in others.items() if v]
        if given:
            raise UserError(f"--benchmarks names each benchmark's pairs and crops, and writes "
                            f"MODEL.<name>.json for each; {', '.join(given)} cannot go with it")
        results = evaluate_many(load_benchmarks(benchmarks_file, list(names)), model,
                                EvalSettings(**settings), progress=not quiet)
        table = Table(*SUMMARY_COLUMNS)
        for result in results:
            table.add_row(*summary_row(result))
        stdout().print(table)
        console.print("wrote " + ", ".join(r["output"] for r in results))
        return
    if pairs is None:
        raise UserError("give --pairs (with --model and --data, or --features), or --benchmarks")
    result = run(pairs, model=model, data=data, features=features, settings=EvalSettings(**settings),
                 pattern=pattern, output=output, roc_png=roc, scores_csv=scores,
                 save_features_to=save_features, progress=not quiet)
    table = Table("fold", "ACC (%)")
    for row in fold_table(result):
        table.add_row(*row)
    stdout().print(table)
    stdout().print(summary_lines(result))
    console.print(f"wrote {result['output']}")


def load_model(model, device, input_spec, threads, select=None, calibration=None, threshold=None, far=None,
               flip=None):
    from spherecli.api import load

    return load(model, device=device, input_spec=input_spec, threads=threads, select=select,
                calibration=calibration, threshold=threshold, far=far, flip=flip)


@cli.command()
@click.argument("photo_a", type=EXISTING_FILE)
@click.argument("photo_b", type=EXISTING_FILE)
@model
@select
@device
@input_spec
@threads
@scoring
def verify(photo_a, photo_b, model, select, device, input_spec, threads, calibration, far, threshold):
    """Are the faces in two photos the same person?

    Detects, aligns and embeds the face of each photo, prints the cosine
    score and the decision at the threshold. Exit status 0 either way.
    """
    m = load_model(model, device, input_spec, threads, select, calibration, threshold, far)
    result = m.verify(photo_a, photo_b)
    notes(result.notes)
    click.echo(f"{'same' if result.same else 'different'}\tscore {result.score:.4f}\t"
               f"{m.calibration.describe()}")


@cli.command()
@click.option("--gallery", type=EXISTING_FOLDER, required=True,
              help="An enrolled gallery (`sphereface gallery`), or a folder of one folder per known person "
                   "holding photos of them (enrolled into --cache and kept in step with the folder).")
@click.option("--probe", required=True, help="A photo, a folder of photos, a video file, a camera index (0) "
              "or a stream URL (rtsp://, http://).")
@model
@select
@device
@input_spec
@threads
@scoring
@click.option("--top-k", "k", default=1, type=Number(Range(1, 100, integer=True)),
              help="Candidates per face in the CSV's candidates column, best first.")
@click.option("--every", default=1, type=Number(COUNT), help="For a video: look at every N-th frame.")
@click.option("-o", "--output", type=OutputPath("identities"), help="CSV file for the results.  "
              "[default: standard output]")
@click.option("--annotate", type=OutputPath(),
              help="Draw a box and name per face: a folder (for photos) or a video file.")
@click.option("--cache", type=OutputPath(folder=True), help="Where a folder of photos is enrolled.  "
              "[default: GALLERY/.sphereface-gallery/<model key>]")
@click.option("--track/--no-track", default=True, help="Video: track faces and recognise each track once "
              "(again on a clearly better view), or detect and embed every face of every --every-th frame "
              "(the original's loop).")
@settings_options(VideoSettings)
@click.option("--live/--no-live", default=None, help="Read the source as live (keep only the newest "
              "frame, dropping the rest when slower than it): by default cameras and streams are, files "
              "are not (--live reads a file at its own rate, as a camera).")
@click.option("--show", is_flag=True, help="Tracked video: show the answers in a window (q or Esc ends).")
@click.option("--log", type=OutputPath("video log"), help="Tracked video: JSON Lines of every frame's "
              "tracked faces and, at the end, every track and the source's counts.")
@quiet
def identify(gallery, probe, model, select, device, input_spec, threads, calibration, far, threshold, k,
             every, output, annotate, cache, track, live, show, log, quiet, **video):
    """Name every face in the probe from a gallery of known people, or call it unknown.

    A face is searched against one template per person (the mean of
    their photos) unless the gallery searches by photo, and takes the best
    person when the cosine score clears the threshold. In a video, camera
    or stream, faces are tracked and each track is named from its best
    views. One CSV row per face (a probe without a face: one row, identity
    no_face): source, frame, track, x1, y1, x2, y2, identity, score,
    best_match, candidates.
    """
    from spherecli.recognition.identify import annotation_target, identify as run, is_video, write_csv
    from spherecli.recognition.video import VideoRun, check_display, is_stream
    from spherecli.core.outputs import Outputs

    stream = is_stream(probe)
    if show:
        check_display()
    if not stream and not Path(probe).exists():
        raise UserError(f"--probe {probe}: no such file or folder (nor a camera index or stream URL)")
    probe = probe if stream else Path(probe)
    tracked = stream or (track and is_video(probe))
    with Outputs([gallery, model, calibration] + ([] if stream else [probe])) as outputs:
        for path, kind in ((output, "identities"), (log, "video log")):
            if path:
                outputs.file(path, kind)
        if log and not tracked:
            raise UserError("--log is written for a tracked video (a video file, camera or stream, "
                            "without --no-track)")
        if cache:
            outputs.folder(cache)
        annotate = outputs.file(annotate, "video") if tracked and annotate else \
            annotation_target(outputs, probe, annotate)
        m = load_model(model, device, input_spec, threads, select, calibration, threshold, far)
        known = m.gallery(gallery, cache=cache, progress=not quiet)
        notes(known.notes)
        console.print(f"gallery: {len(known)} {'person' if len(known) == 1 else 'people'}, "
                      f"{known.photos} photos; {m.calibration.describe()}")
        notes(m.calibration.notes)
        with open(output, "w", newline="", encoding="utf-8") if output else nullcontext(sys.stdout) as sink:
            if not tracked:
                notes(write_csv(run(m, known, probe, every=every, annotate=annotate, k=k, progress=not quiet),
                                sink))
                return
            tracked_run = VideoRun(m, known, str(probe), VideoSettings(**video), live=live, annotate=annotate,
                                   show=show)
            summary = tracked_run.write(sink, log, progress=not quiet)
        s = summary[-1]
        console.print(f"{s['frames_done']} frames in {s['seconds']} s ({s['frames_per_second']} per second), "
                      f"{len(summary) - 1} tracks; {s['dropped']} dropped, {s['unreadable']} unreadable"
                      + (f"; {s['ended']}" if s["ended"] not in ("", "the source ended") else ""))
        if tracked_run.interrupted:
            raise Interrupted("interrupted: the annotated video, the CSV and the log hold every frame done, "
                              "and the log every track")


@cli.command()
@click.option("--probes", type=FOLDER_OR_FEATURES, required=True, help="Aligned faces of the probe people, "
              "PERSON/... (MegaFace: FaceScrub), or their features from `sphereface embed --aligned`; each "
              "photo joins the distractors in turn.")
@click.option("--distractors", type=FOLDER_OR_FEATURES, required=True, help="Aligned faces of people not "
              "among the probes (MegaFace: its million photos), or their features.")
@click.option("--queries", type=FOLDER_OR_FEATURES, help="Aligned faces (or features) searched instead of "
              "the probes' other photos, PERSON/... with the probes' names (CFP's profile photos against its "
              "frontal ones).")
@click.option("--probe-glob", help="Only probe photos whose path under --probes matches, e.g. '*/frontal/*'.")
@click.option("--query-glob", help="Only query photos whose path under --queries matches.")
@click.option("--distractor-glob", help="Only distractor photos whose path under --distractors matches.")
@model
@device
@input_spec
@threads
@click.option("--calibration", type=EXISTING_FILE, help="Evaluation result JSON whose mean feature and flip "
              "to use.  [default: MODEL.lfw.json]")
@click.option("--sizes", type=Number(COUNT, count=0), help="Distractor counts to report.  [default: 10, "
              "100, 1000, ... and all of them]")
@click.option("--clean", is_flag=True, help="Leave out distractor identities (first folders) with a photo "
              "that scores against a probe person's template above any probe photo's score against another "
              "probe person's: likely the same people.  [default: MegaFace's protocol as it is]")
@click.option("-o", "--output", type=OutputPath("identification"), help="Result JSON.  "
              "[default: MODEL.megaface.json]")
@click.option("--cmc", type=OutputPath("png"), help="Also draw the CMC curves into this PNG.")
@click.option("--devkit-features", type=OutputPath(folder=True), help="Also write every feature in the "
              "MegaFace devkit's layout: DIR/probes/<path>_<algorithm>.bin and DIR/distractors/...")
@click.option("--algorithm", default="sphereface", help="The devkit's file ending (its <algorithm> name).")
@quiet
def megaface(probes, distractors, queries, probe_glob, query_glob, distractor_glob, model, device, input_spec,
             threads, calibration, sizes, clean, output, cmc, devkit_features, algorithm, quiet):
    """Identification among distractors by MegaFace's protocol, and NIST's open-set rates.

    Prints rank-1 identification at 10, 100, ... distractors, TAR at FAR
    1e-6, 1e-5, 1e-4 (probe pairs against probe-distractor pairs) and
    FNIR at FPIR 1e-2 and 1e-3 (half the probe people enrolled); writes
    them with the CMC curves to the result JSON.
    """
    from spherecli.evaluation.identification import run

    m = load_model(model, device, input_spec, threads, calibration=calibration)
    globs = {k: v for k, v in (("probes", probe_glob), ("queries", query_glob),
                               ("distractors", distractor_glob)) if v}
    r = run(m, probes, distractors, queries=queries, globs=globs, sizes=list(sizes) if sizes else None,
            clean=clean, output=output, cmc_png=cmc, devkit=devkit_features, algorithm=algorithm,
            progress=not quiet)
    notes(r["notes"][:10] + ([f"... and {len(r['notes']) - 10} more"] if len(r["notes"]) > 10 else []))
    if r["cleaned"]:
        c = r["cleaned"]
        console.print(f"cleaned: {c['identities_removed']} distractor identities ({c['photos_removed']} "
                      f"photos) score {c['threshold']:.3f} or more against a probe person's template")
    table = Table("distractors", "rank-1 (%)", "rank-10 (%)")
    for n, rate in r["rank1"].items():
        table.add_row(f"{int(n):,}", f"{100 * rate:.2f}", f"{100 * r['cmc'][n][-1]:.2f}")
    stdout().print(table)
    for far, v in r["verification"].items():
        stdout().print(f"TAR at FAR {far}: {100 * v['tar']:.2f}%" + ("" if v["resolvable"] else
                       f" (only {v['impostors']:,} impostor pairs: not resolved)"))
    for fpir, v in r["open_set"].get("fnir_at_fpir", {}).items():
        stdout().print(f"FNIR at FPIR {fpir}: {100 * v['fnir']:.2f}%" + ("" if v["resolvable"] else
                       " (too few non-mated searches to resolve it)"))
    console.print(f"wrote {r['output']}")


@cli.group()
def gallery():
    """Enrol known people once and search them many times (identify --gallery).

    \b
    create   a new gallery for a model
    enrol    photos: PERSON/photo.jpg folders, or photos of one person (--name)
    remove   people or photos
    list     the people enrolled and their photo counts
    info     the model, calibration, counts and search index of a gallery
    """


GALLERY = click.argument("gallery_dir", metavar="GALLERY", type=click.Path(file_okay=False, path_type=Path))


@gallery.command()
@GALLERY
@model
@device
@input_spec
@click.option("--calibration", type=EXISTING_FILE, help="Evaluation result JSON whose mean feature to "
              "centre features with.  [default: MODEL.lfw.json]")
@click.option("--index", type=click.Choice(INDEX_CHOICES), default="auto", help="FAISS index: exact "
              "(flat), or approximate (hnsw in memory, ivfpq compressed); auto is exact up to "
              f"{AUTO_EXACT:,} vectors, then hnsw.")
@click.option("--by", type=click.Choice(SEARCH_BY), default="template", help="Search one template per "
              "person (the mean of their photos), or every photo (a person scores their best photo).")
@click.option("--dtype", type=click.Choice(FEATURE_DTYPES), default="float32", help="How features are "
              "stored.")
def create(gallery_dir, model, device, input_spec, calibration, index, by, dtype):
    """Create an empty gallery in a new folder for a model."""
    from spherecli.recognition.gallery import Gallery

    m = load_model(model, device, input_spec, 1, calibration=calibration)
    with Gallery.create(gallery_dir, m, index=index, by=by, dtype=dtype) as g:
        show(f"gallery -> {gallery_dir}", g.info())


def gallery_model(g, model, device, input_spec, threads, select):
    """The model a gallery was made with (or the one given, checked against it)."""
    m = load_model(model or g.meta["model"], device, input_spec, threads, select,
                   calibration=None if g.meta["calibration"] == "default" else g.meta["calibration"])
    g.check(m)
    return m


@gallery.command()
@GALLERY
@click.argument("sources", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--name", help="The person all the SOURCES show (photos, or folders of their photos).  "
              "[default: each photo's first folder under SOURCE]")
@click.option("--model", type=EXISTING_FILE, help="The gallery's model, where it has moved.  "
              "[default: the one it was created with]")
@select
@device
@input_spec
@threads
@quiet
def enrol(gallery_dir, sources, name, model, select, device, input_spec, threads, quiet):
    """Enrol photos into a gallery: only new or changed ones are embedded; a killed
    enrolment keeps what it committed, and the same command resumes."""
    from spherecli.recognition.gallery import Gallery

    with Gallery.open(gallery_dir) as g:
        m = gallery_model(g, model, device, input_spec, threads, select)
        summary = g.enrol(m, list(sources), name, progress=not quiet)
        notes(g.notes)
    show(f"enrol -> {gallery_dir}", summary)


@gallery.command()
@GALLERY
@click.option("--person", "people", multiple=True, help="A person to remove with all their photos; "
              "repeatable.")
@click.option("--photo", "photos", multiple=True, type=click.Path(path_type=Path),
              help="An enrolled photo to remove; repeatable.")
def remove(gallery_dir, people, photos):
    """Remove people or photos from a gallery (nothing is removed if one is not enrolled)."""
    from spherecli.recognition.gallery import Gallery

    if not people and not photos:
        raise UserError("give --person or --photo")
    with Gallery.open(gallery_dir) as g:
        n = g.remove(people, [str(p) for p in photos])
        console.print(f"removed {n} photo{'s' * (n != 1)}; {len(g)} people, {g.photos} photos remain")


@gallery.command(name="list")
@GALLERY
def list_people(gallery_dir):
    """The people of a gallery: photos with a face, and photos where none was found."""
    from spherecli.recognition.gallery import Gallery

    with Gallery.open(gallery_dir) as g:
        table = Table("person", "photos", "no face")
        for name, found, missed in g.people():
            table.add_row(name, str(found), str(missed))
        stdout().print(table)


@gallery.command()
@GALLERY
def info(gallery_dir):
    """What a gallery holds and how it is searched."""
    from spherecli.recognition.gallery import Gallery

    with Gallery.open(gallery_dir) as g:
        show(f"gallery {gallery_dir}", g.info())


@cli.command()
@click.argument("root", type=EXISTING_FOLDER)
@click.option("-o", "--output", type=OutputPath("features"), required=True, help="The .npz to write: names "
              "(paths under ROOT), features, and how they were made.")
@model
@select
@device
@input_spec
@threads
@click.option("--aligned", is_flag=True, help="The images are aligned crops already: no detection.")
@flip("concat")
@quiet
def embed(root, output, model, select, device, input_spec, threads, aligned, flip, quiet):
    """Features for every image under ROOT, for use in other tools."""
    from spherecli.core.formats import save_features
    from spherecli.core.outputs import Outputs
    from spherecli.recognition.recognize import embed_folder

    with Outputs([root, model]) as outputs:
        outputs.file(output, "features")
        m = load_model(model, device, input_spec, threads, flip=flip)
        names, feats, found = embed_folder(m.embedder, root, aligned=aligned, select=select,
                                           progress=not quiet)
        notes(found)
        save_features(output, names, feats, flip=flip, network=m.identity["network"])
    console.print(f"{len(names)} features of size {feats.shape[1]} -> {output}")


@cli.command()
@click.argument("model", type=EXISTING_FILE)
@click.option("-o", "--output", type=OutputPath("export"), required=True, help="model.onnx (ONNX), model.pt2 "
              "(torch.export) or model.ts (TorchScript, for LibTorch).")
@click.option("--check", "check_dir", type=EXISTING_FOLDER,
              help="Aligned faces to compare exported and PyTorch features on.")
@click.option("--opset", default=17, type=Number(Range(9, 20, integer=True)), help="ONNX opset version.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists (never MODEL itself).")
def export(model, output, check_dir, opset, overwrite):
    """Export the feature network alone to ONNX, torch.export or TorchScript, checked against PyTorch.

    Input: float (N, 3, H, W) crops prepared as the model's input spec says
    (ours: BGR, (pixel - 127.5) / 128); output: (N, feature size). An ONNX
    export gets its input spec beside it, OUTPUT.json.
    """
    from spherecli.models.export import export as run

    show(f"export -> {output}", run(model, output, check_dir=check_dir, opset=opset, overwrite=overwrite))


@cli.command(name="import")
@click.argument("source", type=EXISTING_FILE)
@click.option("-o", "--output", type=OutputPath("model"), required=True, help="The spherecli model file to "
              "write (model.pt).")
@click.option("--format", "fmt", type=click.Choice(IMPORT_FORMATS),
              help="What SOURCE is.  [default: from its name and contents]")
@click.option("--prototxt", type=EXISTING_FILE, help="The Caffe deploy .prototxt, for the network's input "
              "size.  [default: 112x96]")
@click.option("--input-spec", help="Override the input the network was trained with (a preset, a JSON file, "
              "or key=value pairs); each format knows its own.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists (never SOURCE itself).")
def import_(source, output, fmt, prototxt, input_spec, overwrite):
    """Turn a published model into a spherecli model file.

    \b
    Caffe SphereFace (the original release): sphereface_model.caffemodel --prototxt sphereface_deploy.prototxt
    clcarwin/sphereface_pytorch:            sphere20a_20171020.pth
    Xiaoccer/MobileFaceNet_Pytorch:         068.ckpt
    Weights only: nothing in SOURCE is executed. ONNX networks need no import.
    """
    from spherecli.models.convert import import_model

    summary = import_model(source, output, fmt=fmt, prototxt=prototxt, input_spec=input_spec,
                           overwrite=overwrite)
    show(f"import -> {output}", summary)


@cli.command()
@click.argument("aligned_dir", type=EXISTING_FOLDER)
@model
@device
@input_spec
@threads
@flip("none")
@quiet
def afs(aligned_dir, model, device, input_spec, threads, flip, quiet):
    """Angular Fisher score of a model on a labelled aligned folder (lower is better).

    The SphereFace appendix's measure, AFS = S_w / S_b: within-class
    angular spread over between-class spread, one class per folder.
    """
    from spherecli.evaluation.metrics import angular_fisher_score
    from spherecli.recognition.recognize import embed_folder

    emb = load_model(model, device, input_spec, threads, flip=flip).embedder
    names, feats, _ = embed_folder(emb, aligned_dir, aligned=True, progress=not quiet, desc="afs")
    labels = [n.split("/")[0] for n in names]
    score = angular_fisher_score(feats, labels)
    click.echo(f"angular Fisher score {score:.4f}  ({len(names)} images, {len(set(labels))} classes)")


@cli.command()
@click.argument("runs", nargs=-1, required=True, type=EXISTING_FOLDER)
@click.option("--plot", type=OutputPath("png"), help="Draw the runs' curves of --key into this PNG.")
@click.option("--key", default="loss", help="What to plot: loss, acc, feature_norm, lambda, lr.")
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as JSON lines.")
@click.option("--benchmark", "benchmarks", multiple=True, default=("lfw",), show_default=True,
              help="A benchmark whose result (MODEL.<name>.json from `evaluate`) gets a column; repeatable.")
@click.option("--baseline", type=EXISTING_FOLDER, help="A run to compare with: each benchmark's accuracy "
              "difference fold by fold (mean +- standard error, folds better).")
def report(runs, plot, key, as_json, benchmarks, baseline):
    """Compare training runs: final loss, accuracy, speed, benchmarks (when evaluated), each
    against a baseline run fold by fold, curves."""
    import json

    from spherecli.core.outputs import Outputs
    from spherecli.evaluation.report import against, columns, curves, summarize, table_row

    with Outputs(runs + ((baseline,) if baseline else ())) as outputs:
        if plot:
            outputs.file(plot, "png")
        rows = [summarize(r, benchmarks) for r in runs]
        if baseline:
            against(rows, summarize(baseline, benchmarks), benchmarks)
        series = curves(runs, key, drawing=bool(plot))  # a bad --key fails before anything is printed
        if as_json:
            for row in rows:
                click.echo(json.dumps(row))
        else:
            table = Table(*columns(benchmarks, baseline and Path(baseline).name))
            for row in rows:
                table.add_row(*table_row(row, benchmarks, bool(baseline)))
            stdout().print(table)
        if plot:
            from spherecli.evaluation.plot import line_chart

            line_chart(plot, series, title=key, xlabel="iteration", ylabel=key)


def main() -> None:
    """The error boundary: an expected failure is one `error:` line and exit status 2 (an
    interruption: 130); under torchrun only rank 0 says it. Anything else is a bug and
    keeps its traceback."""
    import os

    quiet_rank = os.environ.get("RANK", "0") != "0"
    try:
        cli.main(standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt, Interrupted) as e:
        if not quiet_rank:
            click.echo(as_flags(str(e)) if isinstance(e, Interrupted) else
                       "interrupted: finished work is saved; run the same command again to resume", err=True)
        sys.exit(130)
    except click.ClickException as e:  # a bad flag or value, found while the command line is read
        message = e.format_message()
        if isinstance(e, click.UsageError) and e.ctx is not None:
            message += f" (see {e.ctx.command_path} --help)"
        say_error(message, quiet_rank)
        sys.exit(e.exit_code)
    except UserError as e:
        say_error(as_flags(str(e)), quiet_rank)
        sys.exit(2)


def say_error(message: str, quiet: bool) -> None:
    if not quiet:
        click.secho("error: ", fg="red", bold=True, err=True, nl=False)
        click.echo(message, err=True)
