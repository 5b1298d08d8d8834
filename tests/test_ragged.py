"""Ragged batches: a batch of sequences of different lengths gives exactly the sum of what its sequences
give one at a time (ELBO and gradients), and nothing past a sequence's end changes any number."""
import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from pyro_models.dmm import GUIDES, DMMConfig, build_dmm, step_mask
from pyro_models.dmm.chains import combiner_chain
from pyro_models.dmm.networks import reverse_padded

F64 = torch.float64
SMALL = dict(z_dim=3, transition_dim=8, emission_hidden=(8,), rnn_dim=8, conv_channels=(4,), flow_hidden=(8,))
LENGTHS = torch.tensor([6, 2, 4])
FRAME = (5,)
GAPS = torch.tensor([[True, False, True, True, True, False],
                     [False, True, True, True, True, True],
                     [True, True, False, True, True, True]])
ELBOS = {"meanfield": TraceMeanField_ELBO, "trace": Trace_ELBO}


def dmm(guide, num_flows=0):
    model, q = build_dmm(FRAME, DMMConfig(**dict(SMALL, guide=guide, num_flows=num_flows)))
    model.double(), q.double()
    with torch.no_grad():  # flows start as the identity; move them so every parameter matters
        for flow in q.flows:
            flow.nn.layers[-1].weight.normal_(0.0, 0.1)
    return model, q


def replayed(guide, z, name="z"):
    """``guide`` with its site ``name`` fixed to ``z`` (replayed as a draw, not observed)."""
    return replayed_sites(guide, {name: z})


def replayed_sites(guide, values):
    """``guide`` with each site of ``values`` (name -> value) replayed as a draw."""
    trace = poutine.Trace()
    for name, value in values.items():
        trace.add_node(name, name=name, type="sample", is_observed=False, value=value, infer={})
    return poutine.replay(guide, trace=trace)


def summed(results):
    """The sum of per-sequence ``(loss, grads)`` results; a gradient None (parameter unused) counts as 0."""
    total, grads = 0.0, None
    for loss, g in results:
        total = total + loss
        grads = g if grads is None else [b if c is None else (c if b is None else b + c) for b, c in zip(grads, g)]
    return total, grads


def assert_same(batch, parts, loss_tol, grad_rtol, grad_atol):
    """The batch's ``(loss, grads)`` equal the summed ``parts``: the loss to ``loss_tol``, every gradient to
    ``grad_rtol, grad_atol``; a gradient None (parameter unused) on one side is exactly 0 on the other."""
    (batch_loss, batch_grads), (total, grads) = batch, summed(parts)
    assert torch.allclose(batch_loss, total, rtol=loss_tol, atol=loss_tol)
    for b, c in zip(batch_grads, grads):
        if b is not None and c is not None:
            assert torch.allclose(b, c, rtol=grad_rtol, atol=grad_atol)
        else:
            assert (b is None or not b.abs().any()) and (c is None or not c.abs().any())


def loss_and_grads(model, guide, elbo, z, *args):
    params = list(model.parameters()) + list(guide.parameters())
    loss = elbo().differentiable_loss(model, replayed(guide, z), *args)
    return loss.detach(), torch.autograd.grad(loss, params, allow_unused=True)


def sequence_args(x, gaps, i, length):
    return x[i : i + 1, :length], None if gaps is None else gaps[i : i + 1, :length]


@pytest.mark.parametrize("elbo", list(ELBOS))
@pytest.mark.parametrize("with_gaps", [False, True])
@pytest.mark.parametrize("num_flows", [0, 1])
@pytest.mark.parametrize("guide_name", GUIDES)
def test_a_ragged_batch_is_the_sum_of_its_sequences(guide_name, num_flows, with_gaps, elbo):
    if num_flows and elbo == "meanfield":  # a replayed flow chain has no path for the KL estimate: MC
        pytest.skip("covered by the trace ELBO")
    pyro.set_rng_seed(0)
    model, guide = dmm(guide_name, num_flows)
    x = torch.rand(3, 6, *FRAME, dtype=F64)
    gaps = GAPS if with_gaps else None
    with torch.no_grad():
        z = guide(x, gaps, LENGTHS)  # (3, 6, Z): one draw of every chain
    batch = loss_and_grads(model, guide, ELBOS[elbo], z, x, gaps, LENGTHS)
    parts = [loss_and_grads(model, guide, ELBOS[elbo], z[i : i + 1, :length], *sequence_args(x, gaps, i, length))
             for i, length in enumerate(LENGTHS.tolist())]
    assert_same(batch, parts, loss_tol=1e-10, grad_rtol=1e-8, grad_atol=1e-10)


@pytest.mark.parametrize("guide_name", GUIDES)
def test_padding_never_changes_a_number(guide_name):
    model, guide = dmm(guide_name)
    x = torch.rand(3, 6, *FRAME, dtype=F64)
    changed = x.clone()
    for i, length in enumerate(LENGTHS.tolist()):
        changed[i, length:] = torch.rand_like(changed[i, length:])
    longer = torch.cat([changed, torch.rand(3, 3, *FRAME, dtype=F64)], dim=1)  # three more padded steps
    losses = []
    for data in (x, changed):  # the same draws: nothing past the ends is read
        pyro.set_rng_seed(3)
        losses.append(TraceMeanField_ELBO().differentiable_loss(model, guide, data, None, LENGTHS).detach())
    assert losses[0] == losses[1]
    with torch.no_grad():
        z = guide(x, None, LENGTHS)
    z_longer = torch.cat([z, torch.randn(3, 3, z.shape[-1], dtype=F64)], dim=1)  # anything past the ends
    short = TraceMeanField_ELBO().differentiable_loss(model, replayed(guide, z), x, None, LENGTHS)
    long = TraceMeanField_ELBO().differentiable_loss(model, replayed(guide, z_longer), longer, None, LENGTHS)
    assert torch.allclose(short, long, rtol=1e-12)


@pytest.mark.parametrize("lengths", [None, LENGTHS])
@pytest.mark.parametrize("particles", [(), (2,)])
@pytest.mark.parametrize("guide_name", ["st-r", "st-l", "st-lr"])
def test_the_fused_chain_has_autograds_values_and_gradients(guide_name, particles, lengths):
    # The structured chain's hand-written backward pass against autograd through every step, on the same
    # noise, with a loss that reads the draws, the locations and the scales of every step.
    model, guide = dmm(guide_name)
    x = torch.rand(3, 6, *FRAME, dtype=F64)
    context = guide.context(guide.features(x), lengths)  # (3, 6, n, H)
    noise = torch.randn(particles + (3, 6, 3), dtype=F64)
    valid = torch.ones(3, 6, 1, dtype=F64) if lengths is None else step_mask(lengths, 6).unsqueeze(-1).to(F64)
    weights = [valid * torch.randn(particles + (3, 6, 3), dtype=F64) for _ in range(3)]  # a loss of the real steps
    params = list(guide.parameters())

    def reference():
        z, out = guide.z_0.expand(particles + (3, 3)), []
        for t in range(6):
            loc, scale = guide.posterior(z, context[:, t])
            z = loc + scale * noise[..., t, :]
            out.append((z, loc, scale))
        return [torch.stack(o, dim=-2) for o in zip(*out)]

    fused = combiner_chain(context.sum(-2), noise, guide.z_0, guide.combiner, context.shape[-2], lengths)
    for name, values in (("reference", reference()), ("fused", fused)):
        loss = sum((w * v.sin()).sum() for w, v in zip(weights, values))
        grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
        if name == "reference":
            expected_values, expected = values, grads
    for a, b in zip(expected_values, fused):
        assert torch.allclose(a * valid, b * valid, rtol=1e-12, atol=1e-12)
    for p, a, b in zip(params, expected, grads):
        if a is None:
            assert b is None or not b.abs().any()
        else:
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("guide_name", GUIDES)
def test_the_draw_is_scored_as_a_replay_scores_it(guide_name):
    # The chain records its density while drawing; a replayed value is scored with all steps at once.
    model, guide = dmm(guide_name)
    x = torch.rand(3, 6, *FRAME, dtype=F64)
    pyro.set_rng_seed(1)
    trace = poutine.trace(guide).get_trace(x, None, LENGTHS)
    drawn = trace.log_prob_sum()
    again = poutine.trace(replayed(guide, trace.nodes["z"]["value"])).get_trace(x, None, LENGTHS)
    assert torch.allclose(drawn, again.log_prob_sum(), rtol=1e-12)
    pyro.set_rng_seed(1)
    direct = TraceMeanField_ELBO().differentiable_loss(model, guide, x, None, LENGTHS)
    replay = TraceMeanField_ELBO().differentiable_loss(model, replayed(guide, trace.nodes["z"]["value"]), x, None, LENGTHS)
    assert torch.allclose(direct, replay, rtol=1e-12)


def test_reverse_padded_reverses_each_sequence_within_its_length():
    e = torch.arange(12.0).reshape(2, 6, 1)
    out = reverse_padded(e, torch.tensor([6, 3]))
    assert out[0, :, 0].tolist() == [5, 4, 3, 2, 1, 0]
    assert out[1, :, 0].tolist() == [8, 7, 6, 9, 10, 11]  # padding left in place
    assert torch.equal(reverse_padded(out, torch.tensor([6, 3])), e)


@pytest.mark.parametrize("lengths, message", [
    (torch.tensor([6, 0, 4]), r"lengths: expected values in \[1, T = 6\]"),
    (torch.tensor([6, 7, 4]), r"lengths: expected values in \[1, T = 6\]"),
    (torch.tensor([6.0, 2.0, 4.0]), r"lengths: expected an integer tensor of shape \(3,\)"),
    (torch.tensor([6, 2]), r"lengths: expected an integer tensor of shape \(3,\)"),
])
def test_bad_lengths_are_refused(lengths, message):
    model, guide = dmm("st-r")
    with pytest.raises(ValueError, match=message):
        guide(torch.rand(3, 6, *FRAME, dtype=F64), None, lengths)


@pytest.mark.parametrize("guide_name", ["st-r", "st-l", "st-lr"])
def test_the_fast_guide_is_the_autograd_guide_draw_for_draw(guide_name):
    # The same seed gives the same ELBO and gradients with the hand-written backward passes (fused chain,
    # Elman recurrences over the running rows) as with autograd through nn.RNN and every step.
    results = []
    for fast in (True, False):
        torch.manual_seed(0)
        model, guide = build_dmm(FRAME, DMMConfig(**dict(SMALL, guide=guide_name, fused_chain=fast)))
        model.double(), guide.double()
        x = torch.rand(3, 6, *FRAME, dtype=F64)
        pyro.set_rng_seed(5)
        if not fast:  # autograd through nn.RNN: the path torch.jit.trace takes
            from unittest import mock
            with mock.patch("torch.jit.is_tracing", return_value=True):
                loss = TraceMeanField_ELBO().differentiable_loss(model, guide, x, GAPS, LENGTHS)
        else:
            loss = TraceMeanField_ELBO().differentiable_loss(model, guide, x, GAPS, LENGTHS)
        params = list(model.parameters()) + list(guide.parameters())
        results.append((loss.detach(), torch.autograd.grad(loss, params, allow_unused=True)))
    (fast_loss, fast_grads), (loss, grads) = results
    assert torch.allclose(fast_loss, loss, rtol=1e-12)
    for a, b in zip(fast_grads, grads):
        if a is None or b is None:
            assert (a is None or not a.abs().any()) and (b is None or not b.abs().any())
        else:
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------------- the KVAE
def kvae(guide_name):
    from pyro_models.kvae import KVAEConfig, build_kvae

    torch.manual_seed(0)
    config = KVAEConfig(a_dim=2, state_dim=3, num_bases=2, lstm_hidden=8, mlp_hidden=(8,), guide=guide_name,
                        context_hidden=4)
    model, guide = build_kvae(FRAME, config)
    model.double(), guide.double()
    with torch.no_grad():  # the structured guide's correction starts at zero: make it matter
        for p in guide.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model, guide


@pytest.mark.parametrize("with_gaps", [False, True])
@pytest.mark.parametrize("guide_name", ["factorised", "structured"])
def test_a_ragged_kvae_batch_is_the_sum_of_its_sequences(guide_name, with_gaps):
    model, guide = kvae(guide_name)
    x = torch.rand(3, 6, *FRAME, dtype=F64)
    gaps = GAPS if with_gaps else None
    with torch.no_grad():
        a = guide(x, gaps, LENGTHS)
    params = list(model.parameters()) + list(guide.parameters())

    def loss_and_grads(a, *args):
        loss = Trace_ELBO().differentiable_loss(model, replayed(guide, a, "a"), *args)
        return loss.detach(), torch.autograd.grad(loss, params, allow_unused=True)

    batch = loss_and_grads(a, x, gaps, LENGTHS)
    parts = [loss_and_grads(a[i : i + 1, :length], *sequence_args(x, gaps, i, length))
             for i, length in enumerate(LENGTHS.tolist())]
    assert_same(batch, parts, loss_tol=1e-9, grad_rtol=1e-7, grad_atol=1e-9)


# ------------------------------------------------------------------------------------------------ the HRSSM
def hrssm():
    from inference.recipes.registry import get_recipe

    config, _ = get_recipe("hrssm").example()
    torch.manual_seed(0)
    model, guide = get_recipe("hrssm").build((6,) + FRAME, config)
    model.double(), guide.double()
    model.eval(), guide.eval()  # batch norm on running statistics: a frame's features are its own
    return model, guide


def detached(value):
    """``value`` out of the graph that drew it, with the relaxed logit a boundary draw carries."""
    out = value.detach().clone()
    if hasattr(value, "_relaxed_logit"):
        out._relaxed_logit = value._relaxed_logit.detach()
    return out


def sliced(value, i):
    """Row ``i`` of a site value, keeping the relaxed logit a boundary draw carries."""
    part = value[i : i + 1]
    logit = getattr(value, "_relaxed_logit", None)
    if logit is not None:
        part = part.clone()
        part._relaxed_logit = logit[i : i + 1]
    return part


@pytest.mark.parametrize("with_gaps", [False, True])
def test_a_ragged_hrssm_batch_is_the_sum_of_its_sequences(with_gaps):
    model, guide = hrssm()
    x = torch.rand(3, 6, *FRAME, dtype=F64)
    gaps = GAPS if with_gaps else None
    pyro.set_rng_seed(0)
    trace = poutine.trace(guide).get_trace(x, gaps, LENGTHS)
    params = list(model.parameters()) + list(guide.parameters())

    def loss_and_grads(nodes, *args):
        loss = Trace_ELBO().differentiable_loss(model, replayed_sites(guide, nodes), *args)
        return loss.detach(), torch.autograd.grad(loss, params, allow_unused=True)

    latent = {n: detached(s["value"]) for n, s in trace.nodes.items() if s["type"] == "sample"
              and not s["is_observed"] and n.split("_")[0] in ("z", "s", "m")}
    batch = loss_and_grads(latent, x, gaps, LENGTHS)
    parts = []
    for i, length in enumerate(LENGTHS.tolist()):  # the sites of its own steps (boundaries m_t for t < L)
        mine = {n: sliced(v, i) for n, v in latent.items() if int(n.split("_")[1]) <= (length if n[0] != "m" else length - 1)}
        parts.append(loss_and_grads(mine, *sequence_args(x, gaps, i, length)))
    assert_same(batch, parts, loss_tol=1e-9, grad_rtol=1e-7, grad_atol=1e-9)


@pytest.mark.parametrize("guide_name", ["st-r", "st-lr"])
def test_a_batch_sorted_longest_first_takes_the_no_reorder_path_with_the_same_numbers(guide_name, monkeypatch):
    """The trainer hands the DMM batches longest first, where no rows are gathered and scattered back
    (``longest_first`` is None); the ELBO and every gradient equal those of the reordering path."""
    from pyro_models.dmm import DMMConfig, build_dmm
    from pyro_models.dmm import chains, networks

    lengths = torch.tensor([9, 7, 7, 4, 2])
    assert chains.longest_first(lengths) is None and chains.longest_first(lengths.flip(0)) is not None
    x = torch.bernoulli(torch.full((5, 9, 6), 0.3))

    def run():
        pyro.clear_param_store()
        torch.manual_seed(0)
        model, guide = build_dmm((6,), DMMConfig(z_dim=3, transition_dim=8, emission_hidden=(8,), rnn_dim=8, guide=guide_name))
        torch.manual_seed(1)
        loss = pyro.infer.TraceMeanField_ELBO().differentiable_loss(model, guide, x, None, lengths)
        params = list(guide.parameters()) + list(model.parameters())
        return loss, torch.autograd.grad(loss, params, allow_unused=True)

    fast = run()
    always = lambda lengths: torch.argsort(lengths, descending=True, stable=True)  # noqa: E731
    monkeypatch.setattr(chains, "longest_first", always)
    monkeypatch.setattr(networks, "longest_first", always)
    reordered = run()
    assert torch.equal(fast[0], reordered[0])
    for a, b in zip(fast[1], reordered[1]):
        assert (a is None and b is None) or torch.equal(a, b)
