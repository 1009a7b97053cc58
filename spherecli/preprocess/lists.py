"""Stage 3: the training list, one `path label` line per aligned image."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from spherecli.core.errors import UserError
from spherecli.core.formats import summary_path, write_list, write_text_atomic
from spherecli.core.images import identity_of, walk_images
from spherecli.core.outputs import Outputs

# CASIA-WebFace identities that are also in LFW; the original drops them so
# that LFW stays unseen.
CASIA_LFW_OVERLAP = ("0166921", "1056413", "1193098")
CASIA_LFW = "casia-lfw"


def read_exclusions(values: list[str]) -> set[str]:
    """Identity names, given directly, comma-separated, or as files of names (one per line);
    the token casia-lfw stands for the CASIA-WebFace identities that overlap LFW."""
    names = set()
    for value in values:
        if os.path.isfile(value):
            try:
                with open(value, encoding="utf-8") as f:
                    names.update(line.strip() for line in f if line.strip() and not line.startswith("#"))
            except (OSError, UnicodeDecodeError) as e:
                raise UserError(f"`exclude` {value}: cannot read it as a file of names ({e})") from None
        else:
            names.update(v.strip() for v in value.split(",") if v.strip())
    if CASIA_LFW in names:
        names = (names - {CASIA_LFW}) | set(CASIA_LFW_OVERLAP)
    return names


def build_list(aligned_dirs: list[str | Path], output: str | Path | None = None, *,
               exclude: set[str] = frozenset(), min_images: int = 1, relative: bool = False) -> dict:
    """Write the list for the identity folders under aligned_dirs; return its counts.

    Labels are 0..C-1 over the sorted identity names, so the same folders
    always give the same labels. Several folders (e.g. shards aligned
    separately) merge by identity name. Paths are absolute unless relative
    is set, in which case they are relative to the list file's folder,
    where `train` resolves them.
    """
    output = Path(output or str(aligned_dirs[0]).rstrip("/") + ".txt")
    for directory in aligned_dirs:
        if not Path(directory).is_dir():
            raise UserError(f"{directory}: no such directory")
    with Outputs(aligned_dirs) as outputs:
        outputs.file(output, "list")
        summary_file = outputs.file(summary_path(output), "list summary")
        return _build(aligned_dirs, Path(os.path.abspath(output)), summary_file, exclude, min_images,
                      relative)


def _build(aligned_dirs, output: Path, summary_file: Path, exclude, min_images, relative) -> dict:
    per_identity: dict[str, list[str]] = {}
    excluded, unreadable = set(), 0
    for directory in aligned_dirs:
        for rel in walk_images(directory):
            if "\n" in rel or "\r" in rel:
                raise UserError(f"{str(Path(directory) / rel)!r}: a file name with a line break cannot be "
                                "a line of the list; rename it")
            identity = identity_of(rel)
            if identity in exclude:
                excluded.add(identity)
            if identity is None or identity in exclude:
                continue
            # Links keep their own names (abspath, not resolve): a link is listed as what it
            # is called, and one that leads nowhere is not listed.
            path = os.path.abspath(os.path.join(directory, rel))
            if not os.path.isfile(path):
                unreadable += 1
                continue
            per_identity.setdefault(identity, []).append(
                os.path.relpath(path, output.parent) if relative else path)
    kept = {k: v for k, v in per_identity.items() if len(v) >= min_images}
    if not kept:
        raise UserError(f"no identity folder with at least {min_images} images under "
                        f"{', '.join(map(str, aligned_dirs))}")
    names = sorted(kept)
    try:
        write_list(output, ((p, label) for label, name in enumerate(names) for p in kept[name]))
    except OSError as e:
        raise UserError(f"cannot write {output}: {e.strerror or e}") from None
    sizes = np.array([len(kept[n]) for n in names])
    summary = {"list": str(output), "identities": len(names), "images": int(sizes.sum()),
               "per_identity_min": int(sizes.min()), "per_identity_median": float(np.median(sizes)),
               "per_identity_max": int(sizes.max()),
               "dropped_identities": len(per_identity) - len(kept), "not_files": unreadable,
               "excluded": sorted(excluded),
               "exclusions_not_found": sorted(set(exclude) - excluded),
               "names": names}
    write_text_atomic(summary_file, json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    return summary
