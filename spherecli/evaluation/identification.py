"""Identification among distractors: MegaFace's protocol, and NIST FRVT's open-set metrics.

MegaFace (Kemelmacher-Shlizerman et al., CVPR 2016), challenge 1: for each probe person,
each of their photos in turn joins a set of N distractor faces (people not among the
probes) as the gallery, and every other photo of theirs is searched against it; the rank
of a search is 1 + the distractors scoring at or above its mate (a tie goes against the
mate). Reported: rank-1 identification rate at N = 10, 100, 1,000, ... distractors (nested
random subsets), the CMC curve, and verification TAR at FAR 1e-6 over probe-probe genuine
pairs and probe-distractor impostor pairs. With `queries` (CFP's profile photos, say), the
photos searched are those, and the probes' photos only join the gallery.

NIST FRVT 1:N (Grother et al., NISTIR 8271): half the probe people are enrolled (their first
photo, among all the distractors); searches by the enrolled half are mated, by the other
half non-mated. FPIR(T): non-mated searches whose best score reaches T; FNIR(T): mated
searches whose mate is not first or scores under T. Reported: FNIR at FPIR 1e-2 and 1e-3.

Scores are cosines of unit features; queries are scored against the distractors in
chunks, so that memory stays at CHUNK x distractors.
"""

from __future__ import annotations

import json

import numpy as np

from spherecli.core.errors import UserError

CHUNK = 1 << 26  # scores held at once (256 MB of float32)
RANKS = 10
FARS = (1e-6, 1e-5, 1e-4)
FPIRS = (1e-2, 1e-3)


def distractor_sizes(n: int) -> list[int]:
    """MegaFace's 10, 100, 1,000, ... up to n, and n itself."""
    sizes, s = [], 10
    while s < n:
        sizes.append(s)
        s *= 10
    return sizes + [n]


def megaface(probes: np.ndarray, probe_labels, distractors: np.ndarray, *, queries: np.ndarray | None = None,
             query_labels=None, sizes: list[int] | None = None, seed: int = 0) -> dict:
    """Every number of the protocol for unit features: probes (P, D) with their people,
    distractors (N, D), and optionally queries (Q, D) with theirs."""
    probe_labels = np.asarray(probe_labels, dtype=str)
    same_set = queries is None
    queries, query_labels = (probes, probe_labels) if same_set else (queries, np.asarray(query_labels, str))
    order = np.random.default_rng(seed).permutation(len(distractors))
    distractors = np.ascontiguousarray(distractors[order], dtype=np.float32)
    sizes = sorted(set(sizes or distractor_sizes(len(distractors))))
    if not sizes or sizes[0] < 1 or sizes[-1] > len(distractors):
        raise UserError(f"`sizes`: distractor counts must lie in 1..{len(distractors)} (the distractors "
                        f"given), got {', '.join(map(str, sizes))}")
    others = np.arange(len(probes))
    mates = [np.flatnonzero((probe_labels == q) & ((others != j) if same_set else True))
             for j, q in enumerate(query_labels)]
    # counts[k, s]: distractors among the first sizes[s] scoring at or above the k-th mated pair
    impostors = len(queries) * len(distractors)
    counts, genuine, top = [], [], _TopScores(int(max(FARS) * impostors) + 1)
    best_distractor = np.empty(len(queries), np.float32)
    pq = queries.astype(np.float32) @ probes.astype(np.float32).T
    for start, block in _blocks(queries, distractors):
        for row, j in zip(block, range(start, start + len(block))):
            g = pq[j, mates[j]]
            above = row[None, :] >= g[:, None]
            counts.append(np.cumsum(above, axis=1)[:, np.array(sizes) - 1])
            genuine.append(g)
        top.add(block)
        best_distractor[start:start + len(block)] = block.max(axis=1)
    counts = np.concatenate(counts) if counts else np.zeros((0, len(sizes)), np.int64)
    genuine = np.concatenate(genuine) if genuine else np.zeros(0, np.float32)
    ranks = counts + 1
    return {
        "protocol": "megaface",
        "probe_people": int(len(set(probe_labels))), "probe_photos": int(len(probes)),
        "queries": "the probes' other photos" if same_set else f"{len(queries)} photos given as queries",
        "distractors": int(len(distractors)), "mated_searches": int(len(genuine)),
        "ties": "a distractor scoring equal to the mate ranks above it",
        "rank1": {str(n): float(np.mean(ranks[:, s] == 1)) if len(ranks) else None
                  for s, n in enumerate(sizes)},
        "cmc": {str(n): [float(np.mean(ranks[:, s] <= r)) for r in range(1, RANKS + 1)] if len(ranks) else []
                for s, n in enumerate(sizes)},
        "verification": {f"{far:g}": tar_at_far(genuine, top.largest(), far, impostors) for far in FARS},
        "open_set": open_set(probes, probe_labels, queries, query_labels, best_distractor, same_set),
    }


def suspected_probes(probes: np.ndarray, probe_labels, distractors: np.ndarray, distractor_ids) -> dict:
    """Distractor identities that look like probe people: those with a photo scoring, against
    a probe person's template (the normalised mean of their probe photos), at or above the
    highest score any probe photo reaches against another probe person's template. With
    unnamed distractors (CelebA publishes no names) overlap cannot be checked by name.
    Returns the threshold and the mask of distractors kept."""
    probe_labels = np.asarray(probe_labels, dtype=str)
    people, owner = np.unique(probe_labels, return_inverse=True)
    t = np.zeros((len(people), probes.shape[1]), np.float64)
    np.add.at(t, owner, probes)
    t = (t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)).astype(np.float32)
    own = probes.astype(np.float32) @ t.T
    own[np.arange(len(probes)), owner] = -np.inf
    threshold = float(own.max()) if len(people) > 1 else 1.0
    best = np.concatenate([block.max(axis=1) for _, block in _blocks(distractors, t)]) \
        if len(distractors) else np.zeros(0)
    ids = np.asarray(distractor_ids, dtype=str)
    suspected = set(ids[best >= threshold])
    keep = ~np.isin(ids, list(suspected))
    return {"threshold": threshold, "identities_removed": len(suspected),
            "photos_removed": int((~keep).sum()), "keep": keep}


def threshold_at_rate(largest: np.ndarray, rate: float, total: int) -> float:
    """The lowest threshold (accepting score >= it) that accepts at most rate x total of
    `total` negative scores, from the largest of them sorted descending (at least rate x
    total + 1 of them, or all): just above the first one it must reject."""
    allowed = int(np.floor(rate * total + 1e-9))
    return float(np.nextafter(largest[allowed], np.inf)) if allowed < len(largest) else -1.0


def tar_at_far(genuine: np.ndarray, top_impostors: np.ndarray, far: float, impostors: int) -> dict:
    """TAR at the lowest threshold accepting at most far of the impostors, from the largest
    impostor scores (sorted descending)."""
    threshold = threshold_at_rate(top_impostors, far, impostors)
    return {"tar": float(np.mean(genuine >= threshold)) if len(genuine) else None, "threshold": threshold,
            "impostors": impostors, "resolvable": bool(far * impostors >= 1)}


def open_set(probes, probe_labels, queries, query_labels, best_distractor, same_set: bool,
             fpirs=FPIRS) -> dict:
    """FNIR at FPIR with the even-numbered probe people (sorted) enrolled, one photo each."""
    people = sorted(set(probe_labels))
    enrolled = set(people[::2])
    first = {}
    for i, p in enumerate(probe_labels):
        if p in enrolled:
            first.setdefault(p, i)
    gallery = np.array(sorted(first.values()))
    if not len(gallery):
        return {}
    scores = queries.astype(np.float32) @ probes[gallery].astype(np.float32).T
    owner = probe_labels[gallery]
    mated_ok, mated_score, non_mated = [], [], []
    enrolled_photos = set(first.values()) if same_set else set()
    for j, q in enumerate(query_labels):
        row = scores[j]
        if j in enrolled_photos:
            continue  # the enrolled photo itself is not searched
        best_other = max(best_distractor[j], row[owner != q].max(initial=-np.inf))
        if q in enrolled:
            mate = row[owner == q][0]
            mated_score.append(mate)
            mated_ok.append(mate > best_other)
        else:
            non_mated.append(max(best_other, row.max(initial=-np.inf)))
    mated_ok, mated_score = np.array(mated_ok, bool), np.array(mated_score)
    non_mated = np.sort(np.array(non_mated))[::-1]
    out = {"enrolled_people": len(enrolled), "mated_searches": int(len(mated_ok)),
           "non_mated_searches": int(len(non_mated)), "fnir_at_fpir": {}}
    for fpir in fpirs:
        threshold = threshold_at_rate(non_mated, fpir, len(non_mated))
        fnir = float(np.mean(~(mated_ok & (mated_score >= threshold)))) if len(mated_ok) else None
        out["fnir_at_fpir"][f"{fpir:g}"] = {"fnir": fnir, "threshold": threshold,
                                            "resolvable": bool(fpir * len(non_mated) >= 1)}
    return out


def _blocks(queries: np.ndarray, distractors: np.ndarray):
    """(first query, its block of scores against every distractor), CHUNK scores at a time."""
    step = max(1, CHUNK // max(1, len(distractors)))
    q = queries.astype(np.float32)
    for start in range(0, len(q), step):
        yield start, q[start:start + step] @ distractors.T


class _TopScores:
    """The k largest of all the scores added, kept without holding them all."""

    def __init__(self, k: int):
        self.k, self.kept = k, np.zeros(0, np.float32)

    def add(self, block: np.ndarray) -> None:
        v = np.concatenate([self.kept, block.ravel()])
        self.kept = v if len(v) <= self.k else np.partition(v, len(v) - self.k)[-self.k:]

    def largest(self) -> np.ndarray:
        return np.sort(self.kept)[::-1]


def run(model, probes, distractors, *, queries=None, globs: dict | None = None, sizes=None, clean=False,
        output=None, cmc_png=None, devkit=None, algorithm: str = "sphereface",
        progress: bool = False) -> dict:
    """`sphereface megaface`: embed the aligned faces of the probes, distractors (and queries)
    with a model (an `api.Model`: its flip and calibration mean), score the protocol, write
    the result JSON (default MODEL.megaface.json), the CMC chart and the devkit's feature
    files. globs: "probes", "queries", "distractors" -> a glob their paths must match; clean:
    leave out the distractor identities (first folders) that `suspected_probes` finds."""
    from pathlib import Path

    from spherecli.core.formats import result_path, write_devkit_feature, write_text_atomic
    from spherecli.core.outputs import Outputs
    from spherecli.recognition.recognize import embed_folder

    globs = globs or {}
    with Outputs([model.path, probes, distractors, queries]) as outputs:
        output = outputs.file(output or result_path(model.path, "megaface"), "identification")
        if cmc_png:
            outputs.file(cmc_png, "png")
        if devkit:
            outputs.folder(devkit)
        sets = {}
        for role, source in (("probes", probes), ("queries", queries), ("distractors", distractors)):
            if source is None:
                continue
            if Path(source).is_dir():
                names, feats, notes = embed_folder(model.embedder, source, aligned=True, progress=progress,
                                                   desc=role, include=globs.get(role))
            else:
                names, feats, notes = _stored(source, model, globs.get(role))
            if not names:
                raise UserError(f"{source}: no readable aligned faces ({'; '.join(notes[:3])})")
            sets[role] = (names, model.calibration.unit(feats).astype(np.float32), notes)
        people = {role: [n.split("/")[0] for n in sets[role][0]]
                  for role in ("probes", "queries") if role in sets}
        if "queries" in sets and not set(people["queries"]) & set(people["probes"]):
            raise UserError(f"{queries}: none of its people (first folder names) is among the probes' "
                            f"people of {probes}")
        cleaned = None
        if clean:
            names, feats, found = sets["distractors"]
            cleaned = suspected_probes(sets["probes"][1], people["probes"], feats,
                                       [n.split("/")[0] for n in names])
            keep = cleaned.pop("keep")
            sets["distractors"] = ([n for n, k in zip(names, keep) if k], feats[keep], found)
        result = megaface(sets["probes"][1], people["probes"], sets["distractors"][1],
                          queries=sets.get("queries", (None, None))[1], query_labels=people.get("queries"),
                          sizes=sizes)
        result.update({"model": str(model.path), "calibration": model.calibration.source,
                       "probes": str(probes), "distractors_folder": str(distractors),
                       "queries_folder": None if queries is None else str(queries), "globs": globs,
                       "cleaned": cleaned,
                       "notes": [n for role in sets for n in sets[role][2]]})
        write_text_atomic(output, json.dumps(result, indent=1) + "\n")
        if cmc_png:
            from spherecli.evaluation.plot import line_chart

            line_chart(cmc_png, {f"{int(n):,} distractors": (list(range(1, RANKS + 1)), c)
                                 for n, c in result["cmc"].items()},
                       title="CMC (MegaFace protocol)", xlabel="rank", ylabel="identification rate")
        if devkit:
            for role in ("probes", "distractors"):
                names, feats, _ = sets[role]
                for name, f in zip(names, feats):
                    write_devkit_feature(Path(devkit) / role / f"{name}_{algorithm}.bin", f)
    result["output"] = str(output)
    return result


def _stored(path, model, include: str | None):
    """The features of a `sphereface embed` file, refused unless this model's network and flip
    made them; names filtered by the glob include."""
    import fnmatch

    from spherecli.core.formats import load_features

    names, feats, made = load_features(path)
    network, flip = model.identity["network"], model.embedder.flip
    if made.get("network") != network or made.get("flip") != flip:
        raise UserError(f"{path}: made with network {made.get('network') or 'unrecorded'} and flip "
                        f"{made.get('flip')!r}; {model.path} is {network} with flip {flip!r}: embed again "
                        "with this model (`sphereface embed --aligned`)")
    keep = [i for i, n in enumerate(names) if include is None or fnmatch.fnmatchcase(n, include)]
    if not keep:
        raise UserError(f"{path}: no features whose name matches {include!r}")
    return [names[i] for i in keep], feats[keep], []
