#!/usr/bin/env python
"""Print a registered model and each of its guides as math: the factorisation read off the Pyro
programs themselves (``inference/evaluation/describe.py``), as plain text and as LaTeX.

    python scripts/describe.py vae          # p(z) p(x | z); q(z | x)
    python scripts/describe.py dmm --graph runs/dmm.pdf

The programs are traced on the recipe's small example (its sizes do not change the factorisation).
``--graph PATH`` also writes ``pyro.render_model``'s graph where the Graphviz bindings are installed
(``pip install graphviz`` and the ``graphviz`` system package); without them a one-line note says so.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

from inference.cli.flags import HelpFormatter, OneLineParser
from inference.cli.command_line import main_guard
from inference.evaluation.describe import describe, jitter
from inference.recipes.registry import recipes

EXAMPLE_BATCH = 2


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineParser(prog="describe.py", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("model", choices=tuple(recipes()), help="the model to describe")
    p.add_argument("--graph", help="also write pyro.render_model's graph to this file (needs Graphviz)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def render_graph(model, x, path: str) -> str:
    """``pyro.render_model``'s graph of ``model`` written to exactly ``path``, in the format its extension
    names (pdf, png, svg, ...); a one-line note instead when Graphviz (bindings or ``dot``) is missing."""
    try:
        import graphviz  # optional extra
    except ImportError:
        return "graph: not written; install the Graphviz bindings (pip install graphviz) and the graphviz package"
    import pyro

    extension = os.path.splitext(path)[1].lstrip(".").lower()
    if extension not in graphviz.FORMATS:
        raise ValueError(f"graph: expected a file name ending in a Graphviz format (.pdf, .png, .svg, ...), got {path}")
    try:
        image = pyro.render_model(model, model_args=(x,)).pipe(format=extension)  # no source file beside it
    except graphviz.ExecutableNotFound:
        return "graph: not written; Graphviz's dot program is not installed (apt install graphviz)"
    with open(path, "wb") as f:
        f.write(image)
    return f"graph: wrote {path}"


def main(argv=None) -> int:
    args = parse_args(argv)
    recipe = recipes()[args.model]
    config, shape = recipe.example()
    x = torch.rand((EXAMPLE_BATCH,) + tuple(shape))
    steps = shape[0] if recipe.sequences else None  # sequences (T, *frame): sites over all T may split per step
    for index, guide_name in enumerate(recipe.guides):
        model, guide = recipe.build(tuple(shape), dataclasses.replace(config, guide=guide_name))
        jitter(model, guide)  # so that weights that start at zero hide no dependence
        if index == 0:
            p = describe(model, x, steps=steps)
            print(f"model {args.model}:\n  {p.text}\n  LaTeX: {p.latex}")
            if args.graph:
                print(render_graph(model, x, args.graph))
        q = describe(guide, x, letter="q", given=("x",), steps=steps)
        print(f"guide {guide_name}:\n  {q.text}\n  LaTeX: {q.latex}")
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main))
