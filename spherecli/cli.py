"""The `sphereface` command: a thin click layer over the stage modules."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from spherecli import UserError, __version__
from spherecli.config import DEFAULT_THRESHOLD
from spherecli.registry import (AMP_MODES, BORDER_MODES, FLIP_MODES, IMPORT_FORMATS, LFW_PATTERN, REFERENCES,
                                SELECT_RULES)

console = Console(stderr=True, soft_wrap=True)


def stdout() -> Console:
    """Tables for standard output; wide when it is a file or a pipe, not 80 columns."""
    return Console(width=None if sys.stdout.isatty() else 200)


def show(title: str, summary: dict, keys: list[str] | None = None) -> None:
    """Print a stage summary as a two-column table."""
    console.print(f"[bold]{title}[/bold]", highlight=False, soft_wrap=True)
    table = Table(show_header=False)
    for key in keys or summary:
        if key in summary:
            table.add_row(key.replace("_", " "), str(summary[key]))
    console.print(table)


def parse_floats(text: str, n: int, what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != n:
        raise click.BadParameter(f"{what}: expected {n} comma-separated numbers, got {text!r}")
    return values


def parse_shard(text: str | None):
    if text is None:
        return None
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise click.BadParameter(f"expected K/N, e.g. 1/4, got {text!r}") from None
    if not 1 <= k <= n:
        raise click.BadParameter(f"K must be between 1 and N, got {text!r}")
    return k, n


def input_spec_option(fn):
    return click.option("--input-spec", help="For an ONNX model: the input it takes, as a preset "
                        "(insightface: 112x112 RGB, ArcFace points, (x - 127.5) / 127.5; sphereface), "
                        "a JSON file, or key=value pairs (size, reference, channels, mean, std).  "
                        "[default: MODEL.onnx.json]")(fn)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="sphereface")
def cli():
    """SphereFace (CVPR 2017) face recognition, stage by stage.

    \b
    detect    faces and 5 landmarks with MTCNN     -> landmark manifest (JSON Lines)
    align     similarity transform to 112x96        -> aligned image folder
    list      one `path label` line per image       -> training list
    train     SphereFace networks with A-Softmax    -> checkpoints
    evaluate  LFW 10-fold verification              -> accuracy table and JSON

    \b
    verify    are two photos the same person?
    identify  name the faces of photos or a video from a gallery
    embed     features of a folder of photos         -> .npz
    export    the network to ONNX, torch.export or TorchScript
    import    a published model (Caffe SphereFace, sphere20a, MobileFaceNet)
    afs       angular Fisher score of a model on labelled faces
    report    compare training runs
    """


# --------------------------------------------------------------------------- detect

@cli.command()
@click.argument("root", type=click.Path(file_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Manifest to write or resume.  [default: ROOT.landmarks.jsonl]")
@click.option("--min-face", default=20, help="Smallest face searched for, in pixels (original: 20).")
@click.option("--factor", default=0.85, help="Image pyramid scale factor (original: 0.85).")
@click.option("--thresholds", default="0.6,0.7,0.9", help="P-Net,R-Net,O-Net score thresholds.")
@click.option("--select", type=click.Choice(SELECT_RULES), default="center",
              help="Which face to keep when several are found (original: center).")
@click.option("--all-faces", is_flag=True, help="Also record every face found, under 'all'.")
@click.option("--exif/--no-exif", default=True, help="Apply the EXIF orientation tag.")
@click.option("--max-side", default=2000,
              help="Downscale larger images for detection; landmarks are mapped back.")
@click.option("--border", type=click.Choice(BORDER_MODES), default="redetect",
              help="Faces that fill the frame: detect again on a black-padded copy when a box "
                   "leaves the frame (redetect), always detect padded (pad), or as the original "
                   "(none), whose landmarks slide up such faces.")
@click.option("--device", default="cpu", help="cpu, cuda or cuda:N.")
@click.option("--batch-size", default=16, help="Same-sized images per MTCNN call.")
@click.option("--workers", type=int, help="Detector processes.  [default: cores on CPU, 2 on GPU]")
@click.option("--shard", help="K/N: process only the K-th of N deterministic parts of ROOT.")
@click.option("--strict", is_flag=True, help="Fail (exit 2) at the first unreadable image.")
@click.option("--retry-errors", is_flag=True, help="Try again images recorded as errors.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def detect(root, output, min_face, factor, thresholds, select, all_faces, exif, max_side, border, device,
           batch_size, workers, shard, strict, retry_errors, quiet):
    """Detect faces and landmarks in every image under ROOT.

    Writes one JSON record per image (docs/formats.md); re-running the same
    command resumes, skipping images already recorded.
    """
    from spherecli.detect import DetectSettings, detect_tree

    settings = DetectSettings(min_face=min_face, factor=factor, select=select, all_faces=all_faces,
                              thresholds=parse_floats(thresholds, 3, "--thresholds"),
                              exif=exif, max_side=max_side, border=border)
    output = output or Path(str(root).rstrip("/") + ".landmarks.jsonl")
    summary = detect_tree(root, output, settings, device=device, batch_size=batch_size,
                          workers=workers, shard=parse_shard(shard), strict=strict,
                          retry_errors=retry_errors, progress=not quiet)
    show(f"detect -> {output}", summary)


# --------------------------------------------------------------------------- align

@cli.command()
@click.argument("sources", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path),
              help="Folder of aligned faces.  [default: <manifest root>-112X96]")
@click.option("--root", type=click.Path(file_okay=False),
              help="Folder the image paths are relative to (needed for landmark text files; "
                   "overrides the manifest's root).")
@click.option("--reference", type=click.Choice(list(REFERENCES)), default="sphereface",
              help="Reference points: the original's (112x96) or insightface's ArcFace points "
                   "(112x112), for networks aligned that way.")
@click.option("--size", help="Crop HEIGHTxWIDTH; reference points scale with the height and are "
              "centred horizontally (SphereFace's at 112x112 move 8 px right).  "
              "[default: the reference's own size]")
@click.option("--jpeg-quality", default=95, type=click.IntRange(1, 100),
              help="JPEG quality of the crops (Matlab's imwrite used 75).")
@click.option("--workers", type=int, help="Processes.  [default: number of cores]")
@click.option("--overwrite", is_flag=True, help="Redo crops that already exist.")
@click.option("--no-face", type=click.Choice(["skip", "mean"]), default="skip",
              help="Images without a detected face: skip them (original), or crop them at the "
                   "mean landmark position of the other images (for test sets like LFW, where "
                   "every image must be scored).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def align(sources, output, root, reference, size, jpeg_quality, workers, overwrite, no_face, quiet):
    """Align the faces of one or more landmark manifests (or text files).

    A landmark text file has lines `relative/path.jpg x1 y1 x2 y2 ... x5 y5`
    (left eye, right eye, nose, left and right mouth corners).
    """
    from spherecli.align import align_manifests, parse_size
    from spherecli.formats import is_manifest, read_manifest

    hw = parse_size(size) if size else REFERENCES[reference][0]
    if output is None:
        if not sources[0].is_file() or not is_manifest(sources[0]):
            raise UserError("pass -o OUTPUT for landmark text files")
        base = root or read_manifest(sources[0])[0]["root"]
        output = Path(f"{str(base).rstrip('/')}-{hw[0]}X{hw[1]}")
    summary = align_manifests(sources, output, root=root, size=hw, reference=reference,
                              jpeg_quality=jpeg_quality,
                              workers=workers, overwrite=overwrite, no_face=no_face,
                              progress=not quiet)
    for line in summary.pop("errors"):
        console.print(f"[red]error[/red] {line}")
    show(f"align -> {output}", summary)


# --------------------------------------------------------------------------- list

@cli.command(name="list")
@click.argument("aligned_dirs", nargs=-1, required=True,
                type=click.Path(file_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="List file.  [default: ALIGNED_DIR.txt]")
@click.option("--exclude", multiple=True,
              help="Identity to leave out: a name, comma-separated names, or a file of names; "
                   "repeatable. `--exclude casia-lfw` drops the three CASIA-WebFace identities "
                   "that overlap LFW, as the original does.")
@click.option("--min-images", default=1, help="Leave out identities with fewer images.")
@click.option("--relative", is_flag=True,
              help="Write paths relative to the list file's folder instead of absolute.")
def list_(aligned_dirs, output, exclude, min_images, relative):
    """Write the training list: one `path label` line per aligned image.

    Labels are 0..C-1 over the sorted identity folder names. Counts and the
    label -> name table are written next to it, in LIST.json.
    """
    from spherecli.lists import CASIA_LFW_OVERLAP, build_list, read_exclusions

    names = read_exclusions([e for e in exclude if e != "casia-lfw"])
    if "casia-lfw" in exclude:
        names |= set(CASIA_LFW_OVERLAP)
    output = output or Path(str(aligned_dirs[0]).rstrip("/") + ".txt")
    summary = build_list(list(aligned_dirs), output, exclude=names, min_images=min_images,
                         relative=relative)
    summary.pop("names")
    show(f"list -> {output}", summary)


# --------------------------------------------------------------------------- train

def config_options(fn):
    """One option per TrainConfig field and head setting, so the CLI and the TOML file speak
    the same names."""
    from dataclasses import fields

    from spherecli.config import CHOICES, HEAD_SETTINGS, TrainConfig, field_type

    for name, (kind, text) in reversed(HEAD_SETTINGS.items()):
        flag = "--" + name.replace("_", "-")
        fn = click.option(flag, name, type=click.Choice(kind) if isinstance(kind, tuple) else kind,
                          help=text)(fn)
    for f in reversed(fields(TrainConfig)):
        if f.name == "head_args":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        if isinstance(default, bool):
            decl, kind = [f"{flag}/--no-{flag[2:]}"], None
        elif f.name in CHOICES:
            decl, kind = [flag], click.Choice(CHOICES[f.name])
        else:
            decl, kind = [flag], field_type(f) if f.name != "lr_steps" else str
        fn = click.option(*decl, f.name, type=kind, default=default,
                          show_default=default not in (None, ""), help=f.metadata["help"])(fn)
    return fn


@cli.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False, exists=True),
              help="TOML file of options (same names as the flags, with underscores); flags "
                   "given here override it.")
@click.option("--resume", is_flag=True,
              help="Continue the run in --out from its checkpoint (start it if there is none).")
@click.option("--list-archs", is_flag=True, help="List the networks with their sizes and exit.")
@click.option("-q", "--quiet", is_flag=True, help="No progress display (the log file still fills).")
@config_options
@click.pass_context
def train(ctx, config_file, resume, list_archs, quiet, **values):
    """Train a SphereFace network on a list from `sphereface list`.

    The defaults are the original recipe: SphereFace-20, A-Softmax m=4,
    SGD lr 0.1 (x0.1 at 16k and 24k), 28k iterations, batch 256 per GPU.
    The run folder gets config.toml, log.jsonl, checkpoint.pt (to resume)
    and, at the end, model.pt (the network alone).
    """
    if list_archs:
        from spherecli.models import count_parameters
        from spherecli.registry import NETWORKS

        table = Table("arch", "network", "feature", "parameters (112x96)")
        for name, build in NETWORKS.all().items():
            net = build()
            table.add_row(name, (build.__doc__ or "").strip().splitlines()[0], str(net.feature_dim),
                          f"{count_parameters(net):,}")
        stdout().print(table)
        return
    from spherecli.config import resolve
    from spherecli.train import launch

    from spherecli.config import HEAD_SETTINGS

    # Only what was typed overrides the config file and a resumed run's settings.
    typed = {k: v for k, v in values.items()
             if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE}
    head = {k: typed.pop(k) for k in list(typed) if k in HEAD_SETTINGS}
    if "head" in typed:
        head["type"] = typed.pop("head")
    if head:
        typed["head"] = head
    cfg, resuming = resolve(config_file, typed, resume)
    summary = launch(cfg, resuming, progress=not quiet)
    if summary:  # under torchrun only rank 0 reports
        show(f"train -> {cfg.out}", summary)


# --------------------------------------------------------------------------- evaluate

@cli.command()
@click.option("--pairs", type=click.Path(dir_okay=False, exists=True), required=True,
              help="Pair list in the LFW format (pairs.txt: header, then 'name i j' / 'name1 i name2 j').")
@click.option("--model", type=click.Path(dir_okay=False, exists=True),
              help="model.pt from `sphereface train` or `sphereface import`, a checkpoint, or an "
                   "ONNX face network.")
@click.option("--data", type=click.Path(file_okay=False, exists=True),
              help="Aligned images of the pair list (e.g. lfw-112X96).")
@click.option("--features", type=click.Path(dir_okay=False, exists=True),
              help="Evaluate features saved by --save-features instead of a model.")
@click.option("--save-features", type=click.Path(dir_okay=False),
              help="Write image names and features to this .npz.")
@click.option("--pattern", default=LFW_PATTERN,
              help="Image path of (name, number) under --data.")
@click.option("--flip", type=click.Choice(FLIP_MODES), default="concat",
              help="Feature of an image and its mirror: concatenated (original), summed, or no mirror.")
@click.option("--mean-subtract/--no-mean-subtract", default=True,
              help="Subtract the other folds' mean feature before the cosine (original: yes).")
@click.option("--skip-missing", is_flag=True, help="Score pairs with a missing image as failures.")
@click.option("--arch", help="Expected network; a checkpoint of another one is refused.")
@input_spec_option
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Result JSON.  [default: MODEL-or-FEATURES.lfw.json]")
@click.option("--roc", type=click.Path(dir_okay=False), help="Also draw the ROC curve into this PNG.")
@click.option("--scores", type=click.Path(dir_okay=False),
              help="Also write every pair's held-out score into this CSV.")
@click.option("--device", default="cpu", help="cpu, cuda or cuda:N.")
@click.option("--amp", type=click.Choice(AMP_MODES), default="none",
              help="Extract in reduced precision: faster, LFW within 0.1 points "
                   "(docs/benchmarks.md); none is fp32, as the original.")
@click.option("--batch-size", default=128, help="Images per forward pass.")
@click.option("--workers", default=2, help="DataLoader worker processes.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def evaluate(pairs, model, data, features, save_features, pattern, flip, mean_subtract, skip_missing,
             arch, input_spec, output, roc, scores, device, amp, batch_size, workers, quiet):
    """Verification accuracy on a pair list (LFW view 2), as the original evaluation.m.

    Prints the per-fold table and the mean; writes every number (folds,
    thresholds, ROC AUC, EER, TAR at FAR 1e-3 and 1e-2, best single
    threshold) to the result JSON.
    """
    import json

    from spherecli.evaluate import evaluate as run, fold_table, json_ready, std_text

    result = run(pairs, model=model, data=data, features=features, save_features=save_features,
                 pattern=pattern, flip=flip, mean_subtract=mean_subtract, skip_missing=skip_missing,
                 arch=arch, input_spec=input_spec, batch_size=batch_size, workers=workers,
                 device=device, amp=amp,
                 progress=not quiet)
    table = Table("fold", "ACC (%)")
    for fold, acc in fold_table(result):
        table.add_row(fold, acc)
    stdout().print(table)
    extra = (f"ROC AUC {result['roc_auc']:.4f}  EER {100 * result['eer']:.2f}%  "
             f"TAR@FAR=1e-3 {100 * result['tar_at_far_0.001']:.2f}%  "
             f"TAR@FAR=1e-2 {100 * result['tar_at_far_0.01']:.2f}%  "
             f"best-threshold accuracy {100 * result['best_accuracy']:.2f}%")
    stdout().print(f"LFW accuracy {std_text(result)}  ({result['images']} images, "
                    f"{result['missing']} missing)\n{extra}", highlight=False)
    output = output or str(Path(model or features).with_suffix("")) + ".lfw.json"
    Path(output).write_text(json.dumps(json_ready(result), indent=1) + "\n")
    if roc:
        from spherecli.plot import roc_chart

        roc_chart(roc, {f"AUC {result['roc_auc']:.4f}": (result["roc"]["far"], result["roc"]["tar"])})
    if scores:
        from spherecli.evaluate import read_pairs

        p = read_pairs(pairs, pattern)
        with open(scores, "w", encoding="utf-8") as f:
            f.write("left,right,same,score\n")
            for a, b, same, score in zip(p.left, p.right, p.same, result["scores"]):
                f.write(f"{a},{b},{int(same)},{score:.6f}\n")
    console.print(f"wrote {output}", highlight=False)


# --------------------------------------------------------------------------- using a model

def model_options(fn):
    """What every command that runs a model on photos takes."""
    fn = input_spec_option(fn)
    fn = click.option("--device", default="cpu", help="cpu, cuda or cuda:N.")(fn)
    fn = click.option("--select", type=click.Choice(SELECT_RULES),
                      default="center", help="Which face of a photo with several (as in detect).")(fn)
    fn = click.option("--model", type=click.Path(dir_okay=False, exists=True), required=True,
                      help="model.pt (or checkpoint.pt) from `sphereface train` or `sphereface "
                           "import`, or an ONNX face network.")(fn)
    return fn


def scoring_options(fn):
    fn = click.option("--threshold", type=float,
                      help="Cosine threshold for 'same person'.  [default: from the evaluation "
                           f"result, else {DEFAULT_THRESHOLD}]")(fn)
    fn = click.option("--calibration", type=click.Path(dir_okay=False, exists=True),
                      help="Evaluation result JSON whose mean feature and threshold to use.  "
                           "[default: MODEL.lfw.json when it exists]")(fn)
    return fn


def embedder(model, device, input_spec, calibration=None, threshold=None):
    from spherecli.recognize import Calibration, FaceEmbedder

    cal = Calibration.load(model, calibration, threshold)
    return FaceEmbedder(model, device=device, flip=cal.flip, input_spec=input_spec), cal


@cli.command()
@click.argument("photo_a", type=click.Path(dir_okay=False, exists=True))
@click.argument("photo_b", type=click.Path(dir_okay=False, exists=True))
@model_options
@scoring_options
def verify(photo_a, photo_b, model, select, device, input_spec, calibration, threshold):
    """Are the faces in two photos the same person?

    Detects, aligns and embeds the face of each photo, prints the cosine
    score and the decision at the threshold. Exit status 0 either way.
    """
    from spherecli.recognize import verify as run

    emb, cal = embedder(model, device, input_spec, calibration, threshold)
    result = run(emb, photo_a, photo_b, cal, select)
    for note in result["notes"]:
        console.print(f"note: {note}", highlight=False)
    decision = "same" if result["same"] else "different"
    click.echo(f"{decision}\tscore {result['score']:.4f}\tthreshold {result['threshold']:.4f} "
               f"({result['calibration']})")


@cli.command()
@click.option("--gallery", type=click.Path(file_okay=False, exists=True), required=True,
              help="One folder per known person, holding one or more photos of them.")
@click.option("--probe", type=click.Path(exists=True), required=True,
              help="A photo, a folder of photos, or a video file.")
@model_options
@scoring_options
@click.option("--every", default=1, help="For a video: look at every N-th frame.")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="CSV file for the results.  [default: standard output]")
@click.option("--annotate", type=click.Path(),
              help="Draw a box and name per face: a folder (for photos) or a video file.")
@click.option("--cache", type=click.Path(dir_okay=False),
              help="Gallery feature cache.  [default: GALLERY/.sphereface-gallery.npz]")
def identify(gallery, probe, model, select, device, input_spec, calibration, threshold, every, output,
             annotate, cache):
    """Name every face in the probe from a gallery of known people, or call it unknown.

    Several photos of a person are averaged into one template. A face
    takes the best-matching person when the cosine score clears the
    threshold. One CSV row per face: source, frame, x1, y1, x2, y2,
    identity, score, best_match.
    """
    import csv

    from spherecli.recognize import gallery as build, identify as run, templates

    emb, cal = embedder(model, device, input_spec, calibration, threshold)
    people, feats, notes = build(emb, gallery, model, cache=cache, select=select)
    for note in notes:
        console.print(f"note: {note}", highlight=False)
    names, tmpl = templates(people, feats, cal)
    console.print(f"gallery: {len(names)} people, {len(people)} photos; threshold "
                  f"{cal.threshold:.4f} ({cal.source})", highlight=False)
    sink = open(output, "w", newline="", encoding="utf-8") if output else sys.stdout
    try:
        writer = csv.writer(sink)
        writer.writerow(["source", "frame", "x1", "y1", "x2", "y2", "identity", "score", "best_match"])
        for row in run(emb, names, tmpl, probe, cal, every=every, annotate=annotate):
            if row.get("error"):
                console.print(f"note: {row['source']}: {row['error']}", highlight=False)
                continue
            writer.writerow([row["source"], "" if row["frame"] is None else row["frame"],
                             *(f"{v:.1f}" for v in row["box"]), row["identity"],
                             f"{row['score']:.4f}", row["best_match"]])
    finally:
        if output:
            sink.close()


@cli.command()
@click.argument("root", type=click.Path(file_okay=False, exists=True))
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True,
              help="The .npz to write: names (paths under ROOT) and features.")
@model_options
@click.option("--aligned", is_flag=True, help="The images are aligned crops already: no detection.")
@click.option("--flip", type=click.Choice(FLIP_MODES), default="concat",
              help="Add the mirror image's feature (as evaluate does).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def embed(root, output, model, select, device, input_spec, aligned, flip, quiet):
    """Features for every image under ROOT, for use in other tools."""
    import numpy as np

    from spherecli.recognize import FaceEmbedder, embed_folder

    emb = FaceEmbedder(model, device=device, flip=flip, input_spec=input_spec)
    names, feats, notes = embed_folder(emb, root, aligned=aligned, select=select, progress=not quiet)
    for note in notes:
        console.print(f"note: {note}", highlight=False)
    np.savez(output, names=np.array(names), features=feats.astype(np.float32), flip=flip)
    console.print(f"{len(names)} features of size {feats.shape[1]} -> {output}", highlight=False)


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False, exists=True))
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True,
              help="model.onnx (ONNX), model.pt2 (torch.export) or model.ts / model.pt "
                   "(TorchScript, for LibTorch).")
@click.option("--check", "check_dir", type=click.Path(file_okay=False, exists=True),
              help="Aligned faces to compare exported and PyTorch features on.")
@click.option("--opset", default=17, help="ONNX opset version.")
def export(model, output, check_dir, opset):
    """Export the feature network alone to ONNX, torch.export or TorchScript, checked
    against PyTorch.

    Input: float (N, 3, H, W) crops prepared as the model's input spec says
    (ours: BGR, (pixel - 127.5) / 128); output: (N, feature size). An ONNX
    export gets its input spec beside it, OUTPUT.json.
    """
    from spherecli.export import export as run

    result = run(model, output, check_dir=check_dir, opset=opset)
    show(f"export -> {output}", result)


@cli.command()
@click.argument("aligned_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--model", type=click.Path(dir_okay=False, exists=True), required=True,
              help="model.pt from `sphereface train` or `sphereface import`, or an ONNX network.")
@click.option("--device", default="cpu", help="cpu, cuda or cuda:N.")
@input_spec_option
@click.option("--flip", type=click.Choice(FLIP_MODES), default="none",
              help="Feature of each image: alone (default), or with its mirror's.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def afs(aligned_dir, model, device, input_spec, flip, quiet):
    """Angular Fisher score of a model on a labelled aligned folder (lower is better).

    The SphereFace appendix's measure, AFS = S_w / S_b: within-class
    angular spread over between-class spread, one class per folder.
    """
    from spherecli.recognize import FaceEmbedder, angular_fisher_score, embed_folder

    emb = FaceEmbedder(model, device=device, flip=flip, input_spec=input_spec)
    names, feats, _ = embed_folder(emb, aligned_dir, aligned=True, progress=not quiet)
    labels = [n.split("/")[0] for n in names]
    score = angular_fisher_score(feats, labels)
    click.echo(f"angular Fisher score {score:.4f}  ({len(names)} images, {len(set(labels))} classes)")


@cli.command(name="import")
@click.argument("source", type=click.Path(dir_okay=False, exists=True))
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True,
              help="The spherecli model file to write (model.pt).")
@click.option("--format", "fmt", type=click.Choice(IMPORT_FORMATS),
              help="What SOURCE is.  [default: from its name and contents]")
@click.option("--prototxt", type=click.Path(dir_okay=False, exists=True),
              help="The Caffe deploy .prototxt, for the network's input size.  [default: 112x96]")
@click.option("--input-spec", help="Override the input the network was trained with (a preset, a "
              "JSON file, or key=value pairs); each format knows its own.")
def import_(source, output, fmt, prototxt, input_spec):
    """Turn a published model into a spherecli model file.

    \b
    Caffe SphereFace (the original release): sphereface_model.caffemodel --prototxt sphereface_deploy.prototxt
    clcarwin/sphereface_pytorch:            sphere20a_20171020.pth
    Xiaoccer/MobileFaceNet_Pytorch:         068.ckpt
    Weights only: nothing in SOURCE is executed. ONNX networks need no import.
    """
    from spherecli.convert import import_model
    from spherecli.formats import parse_input_spec

    spec = parse_input_spec(input_spec) if input_spec else None
    show(f"import -> {output}", import_model(source, output, fmt=fmt, prototxt=prototxt, input_spec=spec))


@cli.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False, exists=True))
@click.option("--plot", type=click.Path(dir_okay=False), help="Draw the runs' curves into this PNG.")
@click.option("--key", default="loss", help="What to plot: loss, acc, feature_norm, lambda, lr.")
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as JSON lines.")
def report(runs, plot, key, as_json):
    """Compare training runs: final loss, accuracy, speed, LFW (when evaluated), curves."""
    import json

    from spherecli.report import curves, summarize

    rows = [summarize(r) for r in runs]
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
    else:
        table = Table("run", "arch", "head", "m", "iters", "min", "img/s", "loss", "train acc",
                      "|x|", "LFW")

        def num(v, form):
            return "" if v is None else form.format(v)
        for r in rows:
            lfw = f"{100 * r['lfw_mean']:.2f} +- {100 * r['lfw_std']:.2f}" if "lfw_mean" in r else ""
            table.add_row(r["run"], r["arch"] or "", r["head"] or "", num(r["margin"], "{:g}"),
                          str(r["iterations"]), str(r["wall_min"]), num(r["images_per_s"], "{}"),
                          num(r["final_loss"], "{:.3f}"), num(r["train_acc"], "{:.1%}"),
                          num(r["feature_norm"], "{:.1f}"), lfw)
        stdout().print(table)
    if plot:
        from spherecli.plot import line_chart

        line_chart(plot, curves(runs, key), title=key, xlabel="iteration", ylabel=key)


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("interrupted: finished work is saved; run the same command again to resume",
                   err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except UserError as e:
        click.secho("error: ", fg="red", bold=True, err=True, nl=False)
        click.echo(str(e), err=True)
        sys.exit(2)
