#!/usr/bin/env python
"""One benchmark script at two revisions of the library, alternately in one run: is a change slower?

    python benchmarks/revisions.py --base 8cdf0f0 --key median_s.step -- benchmarks/kvae_step.py --steps 10

Checks the base revision out into a temporary git worktree, then runs ``SCRIPT ARGS --out FILE`` from
the base tree and from this tree in turn (``--repeats`` times each, base and current alternating, each
tree's own code first on PYTHONPATH), reads the number at ``--key`` (a dotted path into the script's
JSON) and prints the medians and the ratio current / base; writes JSON. One thread per run unless
OMP_NUM_THREADS says otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from functools import reduce

from common import RESULTS, machine_info, write_json  # benchmarks/common.py (the script's own folder)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_once(tree: str, script: str, args, out: str) -> dict:
    env = {**os.environ, "PYTHONPATH": tree, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    subprocess.run([sys.executable, os.path.join(tree, script), *args, "--out", out], cwd=tree, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    with open(out) as f:
        return json.load(f)


def lookup(payload: dict, key: str) -> float:
    return float(reduce(lambda node, part: node[part], key.split("."), payload))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the git revision to compare against")
    p.add_argument("--key", required=True, help="dotted path of the number in the script's JSON (lower is better)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each revision")
    p.add_argument("--out", default=os.path.join(RESULTS, "revisions.json"))
    p.add_argument("script", help="the benchmark, relative to the repository root")
    p.add_argument("args", nargs=argparse.REMAINDER, help="its arguments (after --)")
    args = p.parse_args(argv)
    extra = [a for a in args.args if a != "--"]
    with tempfile.TemporaryDirectory() as scratch:
        base_tree = os.path.join(scratch, "base")
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", base_tree, args.base], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            values = {"base": [], "current": []}
            for i in range(args.repeats):
                for name, tree in (("base", base_tree), ("current", ROOT)):
                    payload = run_once(tree, args.script, extra, os.path.join(scratch, f"{name}{i}.json"))
                    values[name].append(lookup(payload, args.key))
                    print(f"{name} run {i + 1}: {args.key} = {values[name][-1]:.6g}")
        finally:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", base_tree], check=False)
    medians = {k: statistics.median(v) for k, v in values.items()}
    ratio = medians["current"] / medians["base"]
    print(f"median {args.key}: base {medians['base']:.6g}, current {medians['current']:.6g}; current / base = {ratio:.3f}")
    write_json(args.out, {"script": args.script, "args": extra, "base": args.base, "key": args.key, "values": values,
                          "medians": medians, "ratio_current_over_base": ratio, **machine_info()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
