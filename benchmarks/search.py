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

import numpy as np

from spherecli.recognition import search

# CFP frontal, published MobileFaceNet, centred unit features (256-d: a photo's with its
# mirror's): same-person and different-person cosines.
MATED_MEAN, NON_MATED_STD = 0.60, 0.075


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def fitted_targets(path):
    if path is None:
        return MATED_MEAN, NON_MATED_STD
    f = np.load(path)
    x, people = f["frontal"], np.array([n.split("/")[0] for n in f["frontal_names"]])
    s = x @ x.T
    same = people[:, None] == people[None, :]
    upper = np.triu(np.ones_like(same), 1)
    return float(s[same & upper].mean()), float(s[~same & upper].std())


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


def synthetic(n: int, d: int, mated: float, non_mated_std: float, queries: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    scale = spectrum(d, non_mated_std).astype(np.float32)
    people = n // 4
    centres = rng.standard_normal((people, d), dtype=np.float32) * scale
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    spread = np.float32(np.sqrt(max(1 / mated - 1, 0) / d))

    def photos(owners):
        x = centres[owners] + spread * rng.standard_normal((len(owners), d), dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    owners = np.repeat(np.arange(people), 4)[:n]
    gallery = np.empty((n, d), np.float32)
    for start in range(0, n, 100_000):
        gallery[start:start + 100_000] = photos(owners[start:start + 100_000])
    q_owners = rng.integers(0, people, queries)
    return gallery, owners, photos(q_owners), q_owners


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
    args = ap.parse_args()
    mated, non_mated = fitted_targets(args.fit)
    print(f"targets: mated cosine mean {mated:.3f}, non-mated cosine std {non_mated:.3f}")
    print("| vectors | dim | search | build s | memory MB | p50 ms | p99 ms | queries/s (batch) | "
          "x numpy (batch) | recall@1 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for d in map(int, args.dims.split(",")):
        for n in map(int, args.sizes.split(",")):
            one_size(n, d, mated, non_mated, args.kinds.split(","))


def one_size(n: int, d: int, mated: float, non_mated: float, kinds: list[str]) -> None:
    gallery, owners, queries, q_owners = synthetic(n, d, mated, non_mated, 1000)
    s = gallery[:2000] @ gallery[:2000].T
    same = owners[:2000, None] == owners[None, :2000]
    off = ~np.eye(2000, dtype=bool)
    print(f"<!-- n={n} d={d}: synthetic mated mean {s[same & off].mean():.3f}, non-mated std "
          f"{s[~same].std():.3f} -->")
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
        p50, p99, qps, top = measure(top1, top1, queries)
        print(f"| {n:,} | {d} | {kind} | {build:.1f} | {memory:,.0f} | {p50:.2f} | {p99:.2f} | "
              f"{qps:,.0f} | {qps / base_qps:.2f} | {np.mean(top == exact):.3f} |", flush=True)
    print(f"<!-- n={n} d={d}: exact rank-1 of the mated queries {np.mean(owners[exact] == q_owners):.3f} -->",
          flush=True)

if __name__ == "__main__":
    main()
