"""A model or guide as math, read off the Pyro program itself: its sample sites in the order the program
visits them, each with the sites it depends on (``pyro.infer.inspect.get_dependencies``), time-indexed
sites ``name_t`` grouped into products over t when their dependencies repeat with t.

    >>> describe(model, guide, x).text
    'p(z) p(x | z)  ;  q(z | x)'

Where the dependency tracer cannot run a program (a distribution that needs its own ``rsample`` tensor,
as the HRSSM's relaxed boundaries), each site is conditioned on every site before it (the chain rule),
and the description says so.
"""
from __future__ import annotations

import re
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

from pyro import poutine
from pyro.infer.inspect import get_dependencies

TIME_INDEXED = re.compile(r"^(?P<stem>.+?)_(?P<t>\d+)$")
PAST = "past"  # the parents of a site when dependencies could not be traced: every site visited before it


class Factor(NamedTuple):
    """One sample site: its name, the sites it depends on (in visit order), whether it is observed."""

    site: str
    parents: Tuple[str, ...]
    observed: bool


class Description(NamedTuple):
    """The factorisation as plain text and as LaTeX, and whether dependencies were traced (else the chain rule)."""

    text: str
    latex: str
    traced: bool


def factors(program, *args, **kwargs) -> Tuple[List[Factor], bool]:
    """The sample sites of ``program(*args, **kwargs)`` with their parents; ``traced`` is False where the
    chain rule stands in for the dependency tracer."""
    trace = poutine.trace(program).get_trace(*args, **kwargs)
    sites = [(name, site) for name, site in trace.nodes.items()
             if site["type"] == "sample" and not site["infer"].get("_deterministic")
             and type(site["fn"]).__name__ != "_Subsample"]  # plates record themselves as sites
    order = [name for name, _ in sites]
    try:
        dependencies = get_dependencies(program, args, kwargs)["prior_dependencies"]
        traced = True
    except Exception:  # noqa: BLE001 - any failure of the tracer falls back on the chain rule
        dependencies, traced = {}, False
    result = []
    for index, (name, site) in enumerate(sites):
        if traced:
            parents = tuple(p for p in order if p in dependencies.get(name, {}) and p != name)
        else:
            parents = (PAST,) if index > 0 else ()
        result.append(Factor(name, parents, bool(site["is_observed"])))
    return result, traced


def _split(name: str) -> Tuple[str, Optional[int]]:
    match = TIME_INDEXED.match(name)
    return (match["stem"], int(match["t"])) if match else (name, None)


def _signature(factor: Factor, t: int) -> Tuple:
    """Parents relative to time t: ``(stem, offset)`` for time-indexed ones, ``(name, None)`` otherwise."""
    return tuple(sorted((s, None if u is None else u - t) for s, u in map(_split, factor.parents)))


def _parent_text(parents: Sequence[str], all_times: Dict[str, List[int]], t_symbol: Optional[str], t: Optional[int]):
    """Parents as text pieces: a whole time-indexed family as ``z_{1:T}``, others by name or offset."""
    by_stem: Dict[str, List[int]] = {}
    pieces = []
    for parent in parents:
        stem, u = _split(parent)
        if u is None:
            pieces.append(parent)
        else:
            by_stem.setdefault(stem, []).append(u)
    for stem, times in by_stem.items():
        if sorted(times) == all_times.get(stem) and len(times) > 1:
            pieces.append(f"{stem}_{{1:T}}")
        elif t_symbol is not None:
            pieces += [f"{stem}_{t_symbol}" if u == t else f"{stem}_{{{t_symbol}{u - t:+d}}}" for u in sorted(times)]
        else:
            pieces += [f"{stem}_{u}" for u in sorted(times)]
    return pieces


def _term(letter: str, head: str, parents: List[str], latex: bool) -> str:
    bar = r" \mid " if latex else " | "
    return f"{letter}({head}{bar + ', '.join(parents) if parents else ''})"


def render(items: List[Factor], letter: str, given: Sequence[str] = (), latex: bool = False) -> str:
    """The product of the factors, time-indexed families grouped into products over t; ``given``: names
    every factor is conditioned on as well (a guide's inputs)."""
    times: Dict[str, List[int]] = {}
    for f in items:
        stem, t = _split(f.site)
        if t is not None:
            times.setdefault(stem, []).append(t)
    times = {k: sorted(v) for k, v in times.items()}

    def term(head: str, factor: Factor, t_symbol: Optional[str] = None, t: Optional[int] = None) -> str:
        return _term(letter, head, _parent_text(factor.parents, times, t_symbol, t) + list(given), latex)

    terms, done = [], set()
    for f in items:
        stem, t = _split(f.site)
        if f.site in done:
            continue
        if t is None or len(times[stem]) == 1:
            terms.append(term(f.site, f))
            done.add(f.site)
            continue
        family = [g for g in items if _split(g.site)[0] == stem]
        signatures = [_signature(g, _split(g.site)[1]) for g in family]
        start = 0 if len(set(signatures)) == 1 else 1
        if len(set(signatures[start:])) != 1:  # no repeating pattern: every factor on its own
            terms += [term(g.site, g) for g in family]
            done.update(g.site for g in family)
            continue
        if start == 1:
            terms.append(term(f"{stem}_1", family[0]))
        inner = term(f"{stem}_t", family[start], "t", _split(family[start].site)[1])
        low, last = times[stem][start], max(max(v) for v in times.values())
        high = "T" if times[stem][-1] == last else f"T{times[stem][-1] - last:+d}"  # e.g. m_t up to T-1
        product = rf"\prod_{{t={low}}}^{{{high}}} " if latex else f"prod_{{t={low}..{high}}} "
        terms.append(product + inner)
        done.update(g.site for g in family)
    separator = r" \, " if latex else " "
    return separator.join(terms)


def describe(program, *args, letter: str = "p", given: Sequence[str] = (), **kwargs) -> Description:
    """The factorisation of ``program`` (a model with ``letter="p"``, a guide with ``letter="q"`` and
    ``given`` its inputs, e.g. ``("x",)``) at ``args``."""
    items, traced = factors(program, *args, **kwargs)
    latent = [f for f in items if not f.observed] if letter == "q" else items
    text, latex = render(latent, letter, given), render(latent, letter, given, latex=True)
    if not traced:
        note = "  (dependencies not traced: past = every site visited before)"
        text, latex = text + note, latex + r" \quad \text{(past: every site visited before)}"
    return Description(text, latex, traced)
