"""Ragged batches: a batch of sequences of different lengths gives exactly the sum of what its sequences
give one at a time (ELBO and gradients), and nothing past a sequence's end changes any number."""
import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from pyro_models.dmm import GUIDES, DMMConfig, build_dmm
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


def replayed(guide, z):
    """``guide`` with its chain ``z`` fixed (replayed as a draw, not observed)."""
    trace = poutine.Trace()
    trace.add_node("z", name="z", type="sample", is_observed=False, value=z, infer={})
    return poutine.replay(guide, trace=trace)


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
    batch_loss, batch_grads = loss_and_grads(model, guide, ELBOS[elbo], z, x, gaps, LENGTHS)
    total, grads = 0.0, None
    for i, length in enumerate(LENGTHS.tolist()):
        loss, g = loss_and_grads(model, guide, ELBOS[elbo], z[i : i + 1, :length], *sequence_args(x, gaps, i, length))
        total = total + loss
        grads = g if grads is None else [a if b is None else (b if a is None else a + b) for a, b in zip(grads, g)]
    assert torch.allclose(batch_loss, total, rtol=1e-10, atol=1e-10)
    for a, b in zip(batch_grads, grads):
        assert (a is None) == (b is None) or torch.allclose(a if a is not None else torch.zeros_like(b),
                                                            b if b is not None else torch.zeros_like(a), atol=1e-10)
        if a is not None and b is not None:
            assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("guide_name", GUIDES)
def test_padding_never_changes_a_number(guide_name):
    model, guide = dmm(guide_name)
    x = torch.rand(3, 6, *FRAME, dtype=F64)
    longer = torch.cat([x, torch.rand(3, 3, *FRAME, dtype=F64)], dim=1)  # three more padded steps
    changed = x.clone()
    for i, length in enumerate(LENGTHS.tolist()):
        changed[i, length:] = torch.rand_like(changed[i, length:])
    losses = []
    for data in (x, changed, longer):
        pyro.set_rng_seed(3)
        losses.append(TraceMeanField_ELBO().differentiable_loss(model, guide, data, None, LENGTHS).detach())
    assert losses[0] == losses[1]
    assert torch.allclose(losses[0], losses[2], rtol=1e-12)  # the draws of the first six steps are the same


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
