"""Property-based tests (hypothesis) of feedback-unit assignment and pair packing, over random lengths: every kept
token is in exactly one existing unit, adaptive m=1 is the response level, packed equals unpacked. Few examples
and no deadline, so they stay fast and never flake on a busy machine."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prefkit.objectives.granularity import assign_units, unit_sums

FAST = settings(max_examples=40, deadline=None, derandomize=True)

lengths = st.lists(st.tuples(st.integers(1, 12), st.integers(1, 12)), min_size=1, max_size=4)
granularity = st.sampled_from([("response", {}), ("token", {}), ("static", {"window_size": 3}),
                               ("static", {"window_size": 5}), ("adaptive", {"num_segments": 1}),
                               ("adaptive", {"num_segments": 3}), ("adaptive", {"num_segments": 256})])


def _masks(pairs: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(max(w, l) for w, l in pairs) + 2  # padding columns past every response
    cols = torch.arange(width)[None, :]
    return (cols < torch.tensor([w for w, _ in pairs])[:, None], cols < torch.tensor([l for _, l in pairs])[:, None])


@FAST
@given(pairs=lengths, gran=granularity)
def test_every_kept_token_is_in_exactly_one_existing_unit(pairs, gran):
    name, kw = gran
    cm, rm = _masks(pairs)
    units = assign_units(cm, rm, name, **kw)
    for index, mask in ((units.chosen, cm), (units.rejected, rm)):
        kept = index[mask]
        assert bool((index[~mask] == units.num_units).all())  # padding only in the spill column
        rows = torch.arange(len(pairs))[:, None].expand_as(index)[mask]
        assert bool(units.valid[rows, kept].all())  # kept tokens only in units that exist for their pair
        # one-hot counts: each kept token counted once, so unit sums of ones give the kept-token count
        counts = unit_sums(mask.double(), index, units.num_units)
        assert torch.equal(counts.sum(1), mask.sum(1).double())
        assert bool((index[:, 1:] >= index[:, :-1]).all())  # units are contiguous runs in token order
    if name == "adaptive":  # every piece non-empty on both sides, m_eff = min(m, T_w, T_l)
        for i, (w, l) in enumerate(pairs):
            m = min(kw["num_segments"], w, l)
            assert int(units.mu_prime[i]) == m
            assert sorted(set(units.chosen[i, :w].tolist())) == sorted(set(units.rejected[i, :l].tolist())) == list(range(m))


@FAST
@given(pairs=lengths)
def test_adaptive_with_one_segment_is_the_response_level(pairs):
    cm, rm = _masks(pairs)
    a, r = assign_units(cm, rm, "adaptive", num_segments=1), assign_units(cm, rm, "response")
    assert torch.equal(a.chosen, r.chosen) and torch.equal(a.rejected, r.rejected)
    assert a.num_units == r.num_units == 1 and torch.equal(a.valid, r.valid)


_MODEL: list[torch.nn.Module] = []


def _tiny_model() -> torch.nn.Module:
    if not _MODEL:
        from transformers import LlamaConfig, LlamaForCausalLM

        from prefkit.accel.attention import register_segment_attention

        register_segment_attention()  # packed rows need it; the host layer registers it, not the core
        torch.manual_seed(0)
        _MODEL.append(LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                   num_hidden_layers=1, num_attention_heads=2,
                                                   num_key_value_heads=1, max_position_embeddings=128)).eval())
    return _MODEL[0]


@settings(max_examples=12, deadline=None, derandomize=True)
@given(spec=st.lists(st.tuples(st.integers(1, 6), st.integers(0, 5), st.integers(0, 5),
                               st.lists(st.integers(3, 63), min_size=16, max_size=16)), min_size=1, max_size=4))
def test_packed_equals_unpacked(spec):
    """One packed row (segment attention, restarted positions) gives the plain layout's per-token log-probs."""
    from prefkit.data import PairCollator
    from prefkit.logprobs import compute_pair_logps

    feats = [{"prompt_ids": toks[:p], "chosen_ids": toks[p : p + c] + [2], "rejected_ids": toks[p + c : p + c + r] + [2],
              "row_id": i} for i, (p, c, r, toks) in enumerate(spec)]
    model = _tiny_model()
    with torch.no_grad():
        plain = compute_pair_logps(model, PairCollator(pad_token_id=0)(feats))
        packed = compute_pair_logps(model, PairCollator(pad_token_id=0, share_prompt=True, pack_pairs=True)(feats))
    assert torch.equal(packed.chosen_mask, plain.chosen_mask) and torch.equal(packed.rejected_mask, plain.rejected_mask)
    torch.testing.assert_close(packed.chosen, plain.chosen, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed.rejected, plain.rejected, rtol=1e-5, atol=1e-5)
