"""Gallery search: each FAISS index of spherecli.recognition.search against numpy brute force
(the baseline, measured in the same run), at 10k, 100k and 1M gallery vectors of 128 and
512 dimensions.

    .venv/bin/python benchmarks/search.py [--sizes 10000,100000,1000000] [--dims 128,512]
        [--fit out/i21/pub.feats.npz]

Real faces cannot fill a million-vector gallery here, so the gallery is synthetic: identity
centres drawn from an anisotropic Gaussian (its spectrum fitted so that two identities'
cosines have the spread measured on real features) and per-photo spread around them
(fitted to the measured mean mated cosine); four photos per identity. Queries are new
photos of gallery identities (mated searches, as a face search is). The targets are the
published MobileFaceNet's unit features of CFP's frontal photos (`--fit`, a .npz of
`frontal` features and `frontal_names`), or the numbers measured there by default.

Per index: build seconds, memory (resident growth), single-query latency p50/p99 (200
queries one at a time), batched queries per second (1,000 queries in one call) and
recall@1 against exact search (the same top-1 vector).
"""

import argparse
import gc
import os
import time

import faiss
import numpy as np

from spherecli.recognition import search

# CFP frontal, published MobileFaceNet, centred unit features (256-d: a photo's with its
# mirror's): same-person cosines' mean and spread, different-person cosines' spread.
MATED_MEAN, MATED_STD, NON_MATED_STD = 0.639, 0.141, 0.105


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def fitted_targets(path):
    if path is None:
        return MATED_MEAN, MATED_STD, NON_MATED_STD
    f = np.load(path)
    x, people = f["frontal"], np.array([n.split("/")[0] for n in f["frontal_names"]])
    s = x @ x.T
    same = people[:, None] == people[None, :]
    upper = np.triu(np.ones_like(same), 1)
    return float(s[same & upper].mean()), float(s[same & upper].std()), float(s[~same & upper].std())


def spectrum(d: int, std: float) -> np.ndarray:
    """Per-dimension scales whose isotropic-free Gaussian gives cosines of about this std
    between independent draws: (sum l^2) / (sum l)^2 = std^2, l_i = exp(-i / tau)."""
    lo, hi = 1e-3, 1e4
    for _ in range(60):
        tau = np.sqrt(lo * hi)
        lam = np.exp(-np.arange(d) / tau)
        ratio = (lam ** 2).sum() / lam.sum() ** 2
        lo, hi = (lo, tau) if ratio < std ** 2 else (tau, hi)
    return np.sqrt(lam)


def synthetic(n: int, d: int, targets, queries: int, seed: int = 0):
    """n gallery vectors (4 photos of each of n/4 identities) and mated queries. A photo is
    its identity's centre plus isotropic noise whose size varies from photo to photo
    (log-normal: image quality), so that mated cosines spread as real ones do."""
    mated, mated_std, non_mated_std = targets
    rng = np.random.default_rng(seed)
    scale = spectrum(d, non_mated_std).astype(np.float32)
    people = n // 4
    centres = rng.standard_normal((people, d), dtype=np.float32) * scale
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    size, sigma = fit_quality(d, mated, mated_std)

    def photos(owners):
        noise = size * np.exp(sigma * rng.standard_normal((len(owners), 1), dtype=np.float32))
        x = centres[owners] + noise * rng.standard_normal((len(owners), d), dtype=np.float32) / np.sqrt(d)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    owners = np.repeat(np.arange(people), 4)[:n]
    gallery = np.empty((n, d), np.float32)
    for start in range(0, n, 100_000):
        gallery[start:start + 100_000] = photos(owners[start:start + 100_000])
    q_owners = rng.integers(0, people, queries)
    return gallery, owners, photos(q_owners), q_owners


def fit_quality(d: int, mated: float, mated_std: float) -> tuple[float, float]:
    """(noise size, its log-normal spread) whose mated cosines have this mean and spread,
    by a grid search on 2,000 simulated pairs."""
    rng = np.random.default_rng(1)
    c = rng.standard_normal((2000, d)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    z = rng.standard_normal((2, 2000, 1)).astype(np.float32)
    e = rng.standard_normal((2, 2000, d)).astype(np.float32) / np.sqrt(d)
    best = None
    for sigma in np.linspace(0.0, 1.2, 25):
        for size in np.linspace(0.3, 3.0, 55):
            x = c + size * np.exp(sigma * z) * e
            x /= np.linalg.norm(x, axis=2, keepdims=True)
            cos = (x[0] * x[1]).sum(axis=1)
            err = (cos.mean() - mated) ** 2 + (cos.std() - mated_std) ** 2
            if best is None or err < best[0]:
                best = (err, float(size), float(sigma))
    return best[1], best[2]


def measure(search_one, search_batch, queries):
    lat = []
    for q in queries[:200]:
        t = time.perf_counter()
        search_one(q[None])
        lat.append(time.perf_counter() - t)
    t = time.perf_counter()
    top = search_batch(queries)
    qps = len(queries) / (time.perf_counter() - t)
    return np.percentile(lat, 50) * 1e3, np.percentile(lat, 99) * 1e3, qps, top


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--dims", default="128,512")
    ap.add_argument("--kinds", default=",".join(search.INDEX_KINDS))
    ap.add_argument("--fit", help="features to fit the synthetic scores to (see the docstring)")
    ap.add_argument("--sweep", default="", help="search parameter values to try on each built index, e.g. "
                    "'hnsw=128,256,512;ivfpq=64,128,256' (default: the index kind's own value)")
    args = ap.parse_args()
    targets = fitted_targets(args.fit)
    sweep = {k: [int(v) for v in vs.split(",")] for k, vs in
             (part.split("=") for part in args.sweep.split(";") if part)}
    print("targets: mated cosine mean {:.3f} std {:.3f}, non-mated cosine std {:.3f}".format(*targets))
    print("| vectors | dim | search | build s | memory MB | p50 ms | p99 ms | queries/s (batch) | "
          "x numpy (batch) | recall@1 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for d in map(int, args.dims.split(",")):
        for n in map(int, args.sizes.split(",")):
            one_size(n, d, targets, args.kinds.split(","), sweep)


def one_size(n: int, d: int, targets, kinds: list[str], sweep: dict) -> None:
    gallery, owners, queries, q_owners = synthetic(n, d, targets, 1000)
    s = gallery[:2000] @ gallery[:2000].T
    same = owners[:2000, None] == owners[None, :2000]
    off = ~np.eye(2000, dtype=bool)
    print(f"<!-- n={n} d={d}: synthetic mated mean {s[same & off].mean():.3f} std "
          f"{s[same & off].std():.3f}, non-mated std {s[~same].std():.3f} -->")
    p50, p99, base_qps, exact = measure(lambda q: np.argmax(gallery @ q[0]),
                                        lambda q: np.argmax(q @ gallery.T, axis=1), queries)
    print(f"| {n:,} | {d} | numpy brute force | - | {gallery.nbytes / 2**20:,.0f} | {p50:.2f} | "
          f"{p99:.2f} | {base_qps:,.0f} | 1.00 | 1.000 |", flush=True)
    for kind in kinds:
        gc.collect()
        before, t = rss_mb(), time.perf_counter()
        index = search.build(gallery, np.arange(n), kind)
        build, memory = time.perf_counter() - t, rss_mb() - before

        def top1(q, index=index, kind=kind):
            return search.search(index, kind, q, 1, lambda ids: gallery[ids])[1][:, 0]
        spec = search.INDEX_KINDS[kind]
        for value in sweep.get(kind, [spec.search_value]):
            name = kind
            if spec.search_parameter:
                faiss.ParameterSpace().set_index_parameter(index, spec.search_parameter, value)
                name = f"{kind} ({spec.search_parameter} {value})"
            p50, p99, qps, top = measure(top1, top1, queries)
            print(f"| {n:,} | {d} | {name} | {build:.1f} | {memory:,.0f} | {p50:.2f} | {p99:.2f} | "
                  f"{qps:,.0f} | {qps / base_qps:.2f} | {np.mean(top == exact):.3f} |", flush=True)
    print(f"<!-- n={n} d={d}: exact rank-1 of the mated queries {np.mean(owners[exact] == q_owners):.3f} -->",
          flush=True)

if __name__ == "__main__":
    main()
