"""Benchmark: LGSSM log-likelihood forward+backward, parallel scan vs sequential Kalman filter.

Compares ``pyro_models.lgssm.log_marginal`` (parallel tree over time, O(log T) depth,
closed-form gradient) with a plain-PyTorch sequential Kalman-filter log-likelihood (a
python loop over T, batched over sequences), all in float64.  ``log_marginal`` is timed
with ``validate_args=False`` (the training hot path: shape checks only) and, for the cost
of the checks, with ``validate_args=True``.  Each measurement is one forward pass plus
``backward()`` w.r.t. all six parameter tensors and the observations.  The methods are
timed alternately inside each repeat (after a warm-up round, alternating their order)
and the median per method is reported; the log-likelihoods are checked to agree.

Single-threaded by default (``--threads 1``): every method then gets one core, and the
timings stay reproducible when other processes share the machine (with torch's default
intra-op threads and a concurrent process on a 2-core machine, OpenMP spinning made
both methods 10-40x slower and erratic).  ``--threads 0`` keeps torch's default.

    python benchmarks/lgssm.py                       # T = 20 200 2000, batch 32, Z=4, D=2
    python benchmarks/lgssm.py --T 5 10 --batch 2 --repeats 1 --out /tmp/x.json   # smoke
"""

import argparse
import math
import os
import statistics
import time

import torch


from common import RESULTS, machine_info, write_json  # benchmarks/common.py (the script's own folder)
from pyro_models.lgssm import LGSSM, log_marginal

F64 = torch.float64
LOG_2PI = math.log(2 * math.pi)


def sequential_kalman_loglik(p: LGSSM, obs: torch.Tensor) -> torch.Tensor:
    """Baseline: standard covariance-form Kalman filter log-likelihood, loop over time.

    Column-vector convention, ``trans_matrix[:, 0]`` unused, no mask, shapes
    ``(B, T, ...)``; returns ``(B,)``.
    """
    B, T, D = obs.shape
    m = p.init_loc.expand(B, -1)
    P = p.init_cov.expand(B, -1, -1)
    ll = obs.new_zeros(B)
    # unbind once: indexing [:, t] inside the loop would make the backward pass O(T^2)
    # (each slice's backward materialises a full-size zero gradient).
    As, Cs, ys = p.trans_matrix.unbind(1), p.obs_matrix.unbind(1), obs.unbind(1)
    for t in range(T):
        if t > 0:
            A = As[t]
            m = (A @ m.unsqueeze(-1)).squeeze(-1)
            P = A @ P @ A.transpose(-1, -2) + p.trans_cov
        C = Cs[t]
        CP = C @ P
        S = CP @ C.transpose(-1, -2) + p.obs_cov
        L = torch.linalg.cholesky(S)
        r = ys[t] - (C @ m.unsqueeze(-1)).squeeze(-1)
        w = torch.linalg.solve_triangular(L, r.unsqueeze(-1), upper=False).squeeze(-1)
        ll = ll - 0.5 * D * LOG_2PI - L.diagonal(dim1=-2, dim2=-1).log().sum(-1) - 0.5 * w.pow(2).sum(-1)
        Kt = torch.cholesky_solve(CP, L)  # (B, D, Z) = S^{-1} C P = K^T
        m = m + (Kt.transpose(-1, -2) @ r.unsqueeze(-1)).squeeze(-1)
        P = P - Kt.transpose(-1, -2) @ CP
    return ll


def make_problem(batch, T, Z, D, seed):
    g = torch.Generator().manual_seed(seed)

    def spd(n, s):
        X = torch.randn(n, n, generator=g, dtype=F64)
        return s * (X @ X.T / n + 0.5 * torch.eye(n, dtype=F64))

    A = 0.95 * torch.eye(Z, dtype=F64) + 0.05 * torch.randn(batch, T, Z, Z, generator=g, dtype=F64)
    C = torch.randn(batch, T, D, Z, generator=g, dtype=F64)
    params = LGSSM(torch.randn(Z, generator=g, dtype=F64), spd(Z, 1.0), A, spd(Z, 0.1), C, spd(D, 0.1))
    obs = torch.randn(batch, T, D, generator=g, dtype=F64)
    return params, obs


def timed(fn, params, obs):
    leaves = [x.detach().clone().requires_grad_(True) for x in params]
    o = obs.detach().clone().requires_grad_(True)
    t0 = time.perf_counter()
    out = fn(LGSSM(*leaves), o).sum()
    out.backward()
    return time.perf_counter() - t0, out.item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, nargs="+", default=[20, 200, 2000], help="sequence lengths")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--Z", type=int, default=4, help="latent dim")
    ap.add_argument("--D", type=int, default=2, help="observation dim")
    ap.add_argument("--repeats", type=int, default=7, help="timed repeats per method (median)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0 = leave torch's default)")
    ap.add_argument("--out", default=os.path.join(RESULTS, "lgssm.json"))
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    methods = {
        "parallel": lambda p, a: log_marginal(p, a, validate_args=False),
        "parallel_validated": lambda p, a: log_marginal(p, a, validate_args=True),
        "sequential": sequential_kalman_loglik,
    }
    rows = []
    for T in args.T:
        params, obs = make_problem(args.batch, T, args.Z, args.D, args.seed)
        times = {k: [] for k in methods}
        values = {}
        for _ in range(args.warmup):
            for k, fn in methods.items():
                timed(fn, params, obs)
        for r in range(args.repeats):
            order = list(methods)
            if r % 2:
                order.reverse()  # alternate the order to cancel drift
            for k in order:
                dt, val = timed(methods[k], params, obs)
                times[k].append(dt)
                values[k] = val
        med = {k: statistics.median(v) for k, v in times.items()}
        rel = abs(values["parallel"] - values["sequential"]) / max(1.0, abs(values["sequential"]))
        row = {
            "T": T,
            "parallel_ms": 1e3 * med["parallel"],
            "parallel_validated_ms": 1e3 * med["parallel_validated"],
            "sequential_ms": 1e3 * med["sequential"],
            "ratio_seq_over_par": med["sequential"] / med["parallel"],
            "ratio_seq_over_validated": med["sequential"] / med["parallel_validated"],
            "rel_diff_loglik": rel,
            "all_times_s": times,
        }
        rows.append(row)
        print(
            f"T={T:5d}  parallel {row['parallel_ms']:9.2f} ms  parallel(validated) "
            f"{row['parallel_validated_ms']:9.2f} ms  sequential {row['sequential_ms']:9.2f} ms  "
            f"seq/par {row['ratio_seq_over_par']:6.2f}x  (|d loglik| rel {rel:.1e})",
            flush=True,
        )

    print()
    print(f"batch={args.batch} Z={args.Z} D={args.D} float64, forward+backward, median of {args.repeats}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("|     T | parallel ms | parallel, validated ms | sequential ms | seq/par | seq/validated |")
    print("|------:|------------:|-----------------------:|--------------:|--------:|--------------:|")
    for r in rows:
        print(f"| {r['T']:5d} | {r['parallel_ms']:11.2f} | {r['parallel_validated_ms']:22.2f} | "
              f"{r['sequential_ms']:13.2f} | {r['ratio_seq_over_par']:6.2f}x | "
              f"{r['ratio_seq_over_validated']:12.2f}x |")

    out = {
        "benchmark": "lgssm log_marginal forward+backward: parallel scan vs sequential Kalman filter",
        "config": {k: getattr(args, k) for k in ("T", "batch", "Z", "D", "repeats", "warmup", "seed", "threads")},
        "dtype": "float64",
        **machine_info(),
        "results": rows,
    }
    write_json(args.out, out)
    return out


if __name__ == "__main__":
    main()
