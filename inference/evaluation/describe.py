"""A model or guide as math, read off the Pyro program itself: its sample sites in the order the program
visits them, each with the sites it depends on (``pyro.infer.inspect.get_dependencies``), time-indexed
sites ``name_t`` grouped into products over t when their dependencies repeat with t.

    >>> describe(model, guide, x).text
    'p(z) p(x | z)  ;  q(z | x)'

A site that holds a whole sequence (event ``(T, ...)``, e.g. the frames ``x`` of the DMM or the codes
``a`` and frames of the KVAE) is split into per-step factors when its log density is a sum over t
(an ``Independent`` over the time axis, or a chain whose distribution gives its per-step log densities,
``step_log_prob``, as the DMM's latent chain ``z`` does): which steps of its parents each step's log density depends on
is read off the gradients of the per-step log densities with respect to the parents' values (held
fixed, so that only direct dependencies count), and a pattern that repeats with t becomes a product,
e.g. ``prod_{t=1..T} p(x_t | z_t)``.

Where the dependency tracer cannot run a program (a distribution that needs its own ``rsample`` tensor,
as the HRSSM's relaxed boundaries), each site is conditioned on every site before it (the chain rule),
and the description says so.
"""
from __future__ import annotations

import re
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from pyro import poutine
from pyro.distributions import Independent
from pyro.infer.inspect import get_dependencies

JITTER = 1e-2  # noise added to the parameters by jitter()
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


def factors(program, *args, steps: Optional[int] = None, inputs: Sequence[str] = (), **kwargs) -> Tuple[List[Factor], bool]:
    """The sample sites of ``program(*args, **kwargs)`` with their parents; ``traced`` is False where the
    chain rule stands in for the dependency tracer. ``steps``: the sequences' length T, when the
    arguments are sequences (a site with an event of T steps may then split into per-step factors);
    ``inputs``: names of the leading arguments (a guide's ``x``), whose steps a factor may read."""
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
    probe = _Probe(program, args, kwargs, dict(sites), steps, inputs) if traced and steps else None
    result = []
    for index, (name, site) in enumerate(sites):
        if traced:
            parents = tuple(p for p in order if p in dependencies.get(name, {}) and p != name)
        else:
            parents = (PAST,) if index > 0 else ()
        factor = Factor(name, parents, bool(site["is_observed"]))
        result += probe.refine(factor) if probe is not None else [factor]
    return result, traced


def _time_axis(site) -> Tuple[int, int]:
    """``(axis, T)``: where a site's value has its first event axis, and its length (T = 0: no event axis)."""
    event = site["fn"].event_shape
    return (site["value"].dim() - len(event), event[0]) if len(event) else (0, 0)


class _Probe:
    """Which steps of the sequences each factor reads, from gradients: the program is run again with
    every sample site held at its traced value as a leaf tensor (so that only direct dependencies
    count) and its sequence inputs ``(batch, T, ...)`` as leaves too; a factor reads a parent's step
    when its log density has a nonzero gradient for it. Parameters that start at zero can hide a
    dependence: describe programs with jittered weights (``scripts/describe.py`` does)."""

    def __init__(self, program, args, kwargs, sites, steps: int, inputs: Sequence[str]):
        self.sites, self.steps = sites, steps
        self.leaves = {name: site["value"].detach().clone().requires_grad_() for name, site in sites.items()
                       if torch.is_floating_point(site["value"])}
        self.inputs = {name: arg.detach().clone().requires_grad_() for name, arg in zip(inputs, args)
                       if torch.is_tensor(arg) and torch.is_floating_point(arg) and arg.dim() > 1 and arg.shape[1] == steps}
        call_args = tuple(self.inputs.get(name, arg) for name, arg in zip(list(inputs) + [None] * len(args), args))
        with torch.enable_grad():
            self.trace = poutine.trace(poutine.condition(program, data=self.leaves)).get_trace(*call_args, **kwargs)

    def refine(self, factor: Factor) -> List[Factor]:
        """``factor`` split into per-step factors ``site_t`` when its site holds all T steps in an
        ``Independent`` log density; else ``factor`` with the input steps it reads added to its parents."""
        site = self.trace.nodes[factor.site]
        axis, steps = _time_axis(site)
        step_log_prob = getattr(site["fn"], "step_log_prob", None)  # a chain over its T steps (the DMM's z)
        with torch.enable_grad():
            if steps == self.steps >= 2 and _split(factor.site)[1] is None and step_log_prob is not None:
                log_density = step_log_prob(site["value"])  # (..., T): each step given the steps before it
                own = factor._replace(parents=factor.parents + (factor.site,))
                return [Factor(f"{factor.site}_{t + 1}", self._reads(log_density[..., t].sum(), own, skip=f"{factor.site}_{t + 1}"),
                               factor.observed) for t in range(steps)]
            if steps == self.steps >= 2 and _split(factor.site)[1] is None and isinstance(site["fn"], Independent):
                base = site["fn"]
                while isinstance(base, Independent):
                    base = base.base_dist
                log_density = base.log_prob(site["value"])  # (..., T, rest of the event)
                log_density = log_density.reshape(log_density.shape[: axis + 1] + (-1,)).sum(-1)  # (..., T)
                if log_density.dim() == axis + 1 and log_density.shape[axis] == steps:
                    return [Factor(f"{factor.site}_{t + 1}", self._reads(log_density[..., t].sum(), factor), factor.observed)
                            for t in range(steps)]
            if not self.inputs:
                return [factor]
            reads = self._reads(site["fn"].log_prob(site["value"]).sum(), factor, inputs_only=True)
            return [factor._replace(parents=factor.parents + reads)]

    def _reads(self, log_density: torch.Tensor, factor: Factor, inputs_only: bool = False,
               skip: Optional[str] = None) -> Tuple[str, ...]:
        """The steps of the factor's parents (or of the inputs alone) that ``log_density`` depends on, but
        ``skip`` (a chain step's own value)."""
        sources = {} if inputs_only else {p: self.leaves[p] for p in factor.parents if p in self.leaves}
        sources.update(self.inputs)
        grads = torch.autograd.grad(log_density, list(sources.values()), allow_unused=True, retain_graph=True)
        parents: List[str] = [] if inputs_only else [p for p in factor.parents if p not in self.leaves]
        for (name, leaf), grad in zip(sources.items(), grads):
            if grad is None or not bool((grad != 0).any()):
                continue
            axis, steps = _time_axis(self.sites[name]) if name in self.sites else (1, leaf.shape[1])
            if steps != self.steps or _split(name)[1] is not None:  # no time axis, or a step itself (z_t)
                parents.append(name)
                continue
            per_step = (grad != 0).movedim(axis, 0).reshape(steps, -1).any(-1)  # (T,)
            parents += [f"{name}_{u + 1}" for u in range(steps) if per_step[u] and f"{name}_{u + 1}" != skip]
        return tuple(parents)


def _split(name: str) -> Tuple[str, Optional[int]]:
    match = TIME_INDEXED.match(name)
    return (match["stem"], int(match["t"])) if match else (name, None)


def _signature(factor: Factor, t: int, all_times: Dict[str, List[int]], spans: bool) -> Tuple:
    """Parents relative to time t: ``(stem, offset)`` for time-indexed ones, ``(stem, "1:T")`` for a whole
    family (every step of it), with ``spans`` also ``(stem, "t:T")`` / ``(stem, "1:t")`` for the steps from
    or up to t, ``(name, "")`` otherwise."""
    plain, by_stem = _by_stem(factor.parents)
    out = [(name, "") for name in plain]
    for stem, times in by_stem.items():
        span = _span(sorted(times), all_times.get(stem), t if spans else None)
        out += [(stem, span)] if span else [(stem, f"{u - t:+d}") for u in times]
    return tuple(sorted(out))


def _by_stem(parents: Sequence[str]) -> Tuple[List[str], Dict[str, List[int]]]:
    """Parents split into those without a time index, in order, and the steps of each time-indexed stem
    (``z_1, z_3`` -> ``{"z": [1, 3]}``)."""
    plain: List[str] = []
    by_stem: Dict[str, List[int]] = {}
    for parent in parents:
        stem, u = _split(parent)
        if u is None:
            plain.append(parent)
        else:
            by_stem.setdefault(stem, []).append(u)
    return plain, by_stem


def _span(times: List[int], family: Optional[List[int]], t: Optional[int]) -> Optional[str]:
    """A run of steps as a range: ``1:T`` (all of a family of several), and relative to ``t`` (when
    given) ``t:T`` (t on) or ``1:t`` (up to t); None for anything else."""
    if not family:
        return None
    if t is not None and times == [u for u in family if u >= t]:  # relative spans first, so that
        return "t:T"  # x_{1:t} at t = T still groups with the steps before it
    if t is not None and times == [u for u in family if u <= t]:
        return "1:t"
    if times == family and len(times) > 1:
        return "1:T"
    return None


def _parent_text(parents: Sequence[str], all_times: Dict[str, List[int]], t_symbol: Optional[str], t: Optional[int],
                 spans: bool = False):
    """Parents as text pieces: a whole time-indexed family as ``z_{1:T}`` (with ``spans`` also ``x_{t:T}``
    and ``x_{1:t}``), others by name or offset."""
    pieces, by_stem = _by_stem(parents)
    for stem, times in by_stem.items():
        span = _span(sorted(times), all_times.get(stem), t if spans and t_symbol is not None else None)
        if span:
            pieces.append(f"{stem}_{{{span}}}")
        elif t_symbol is not None:
            pieces += [f"{stem}_{t_symbol}" if u == t else f"{stem}_{{{t_symbol}{u - t:+d}}}" for u in sorted(times)]
        else:
            pieces += [f"{stem}_{u}" for u in sorted(times)]
    return pieces


def _term(letter: str, head: str, parents: List[str], latex: bool) -> str:
    bar = r" \mid " if latex else " | "
    return f"{letter}({head}{bar + ', '.join(parents) if parents else ''})"


def render(items: List[Factor], letter: str, given: Sequence[str] = (), latex: bool = False,
           steps: Optional[int] = None) -> str:
    """The product of the factors, time-indexed families grouped into products over t; ``given``: names
    every factor is conditioned on as well (a guide's inputs), unless it reads their steps itself
    (``x_t``; ``steps``: their length T)."""
    times: Dict[str, List[int]] = {name: list(range(1, steps + 1)) for name in given} if steps else {}
    for f in items:
        stem, t = _split(f.site)
        if t is not None:
            times.setdefault(stem, []).append(t)
    times = {k: sorted(v) for k, v in times.items()}

    def term(head: str, factor: Factor, t_symbol: Optional[str] = None, t: Optional[int] = None, spans: bool = False) -> str:
        read = {_split(p)[0] for p in factor.parents}
        parents = _parent_text(factor.parents, times, t_symbol, t, spans) + [g for g in given if g not in read]
        return _term(letter, head, parents, latex)

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
        pattern = _repeating(family, times)
        if pattern is None:  # no repeating pattern: every factor on its own
            terms += [term(g.site, g) for g in family]
            done.update(g.site for g in family)
            continue
        start, spans = pattern
        if start == 1:
            terms.append(term(f"{stem}_1", family[0]))
        inner = term(f"{stem}_t", family[start], "t", _split(family[start].site)[1], spans)
        low, last = times[stem][start], max(max(v) for v in times.values())
        high = "T" if times[stem][-1] == last else f"T{times[stem][-1] - last:+d}"  # e.g. m_t up to T-1
        product = rf"\prod_{{t={low}}}^{{{high}}} " if latex else f"prod_{{t={low}..{high}}} "
        terms.append(product + inner)
        done.update(g.site for g in family)
    separator = r" \, " if latex else " "
    return separator.join(terms)


def _repeating(family: List[Factor], times: Dict[str, List[int]]) -> Optional[Tuple[int, bool]]:
    """Whether the factors of a time-indexed family repeat with t, as ``(start, spans)``: from which
    factor on (0, or 1 when the first differs) and whether as offsets (``z_{t-1}``; tried first) or as
    spans (``x_{t:T}``); None when neither repeats."""
    for spans in (False, True):
        signatures = [_signature(g, _split(g.site)[1], times, spans) for g in family]
        for start in (0, 1):
            if len(set(signatures[start:])) == 1:
                return start, spans
    return None


def describe(program, *args, letter: str = "p", given: Sequence[str] = (), steps: Optional[int] = None,
             **kwargs) -> Description:
    """The factorisation of ``program`` (a model with ``letter="p"``, a guide with ``letter="q"`` and
    ``given`` its inputs, e.g. ``("x",)``) at ``args``; ``steps``: the length T of sequence arguments
    (sites holding whole sequences then split into per-step factors where their densities do)."""
    items, traced = factors(program, *args, steps=steps, inputs=given, **kwargs)
    latent = [f for f in items if not f.observed] if letter == "q" else items
    text, latex = render(latent, letter, given, steps=steps), render(latent, letter, given, latex=True, steps=steps)
    if not traced:
        note = "  (dependencies not traced: past = every site visited before)"
        text, latex = text + note, latex + r" \quad \text{(past: every site visited before)}"
    return Description(text, latex, traced)


def jitter(*modules: torch.nn.Module, scale: float = JITTER) -> None:
    """Add small noise to every parameter of ``modules``, so that a dependence the program has is not
    hidden by weights that start at zero (the structured KVAE guide's correction starts at zero): a
    description is of the program, not of its initial values."""
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                p.add_(scale * torch.randn_like(p))
