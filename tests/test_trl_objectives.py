"""TRL 1.16's losses and options prefkit added (sft, sigmoid_norm, aot_unpaired, LD-DPO, f-DPO, WPO, TR-DPO, RPO as
sft): each against a hand computation on the small tensors of test_objectives, the equivalences the papers
imply, and the combinations the registry refuses."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from prefkit.config import PrefConfig
from prefkit.errors import ConfigError
from prefkit.objectives import ObjectiveSpec, build_objective
from prefkit.objectives.objective import wpo_weights
from prefkit.reference import mix_into_reference
from prefkit.spec import resolve_run
from tests.test_objectives import BETA, LRL, LRW, PL, PW, RL, RW, loss_of, ls, make_logps, spec


def test_sigmoid_norm_by_hand():
    expected = sum(-ls(BETA * (LRW[i] / len(PW[i]) - LRL[i] / len(PL[i]))) for i in range(2)) / 2
    assert loss_of(spec("sigmoid_norm")) == pytest.approx(expected, rel=1e-12)


def test_aot_unpaired_sorts_chosen_and_rejected_log_ratios_separately():
    expected = sum(-ls(BETA * (w - l)) for w, l in zip(sorted(LRW), sorted(LRL))) / 2
    assert loss_of(spec("aot_unpaired")) == pytest.approx(expected, rel=1e-12)
    # LRW = [-0.5, 0.5], LRL = [-1.0, 0.5] are both sorted already, so pair it with a case where sorting matters
    swapped = make_logps(pw=PW, rw=RW, pl=PL[::-1], rl=RL[::-1])
    lrl = sorted(sum(p) - sum(r) for p, r in zip(PL[::-1], RL[::-1]))
    assert loss_of(spec("aot_unpaired"), swapped) == pytest.approx(
        sum(-ls(BETA * (w - l)) for w, l in zip(sorted(LRW), lrl)) / 2, rel=1e-12)


def test_sft_is_the_batch_token_mean_nll_of_chosen():
    nll = -sum(sum(p) for p in PW) / sum(len(p) for p in PW)  # 7.5 / 5
    assert nll == 1.5 and loss_of(spec("sft")) == pytest.approx(nll, rel=1e-12)
    # granularity does not change a batch-level term
    assert loss_of(spec("sft", granularity="token")) == pytest.approx(nll, rel=1e-12)


def test_rpo_alpha_is_sigmoid_plus_weighted_sft():
    rpo = ObjectiveSpec(beta=BETA, rpo_alpha=0.7)
    trl_116 = ObjectiveSpec(loss_type=("sigmoid", "sft"), loss_weights=(1.0, 0.7), beta=BETA)
    lp = make_logps()
    assert build_objective(rpo)(lp).loss.item() == build_objective(trl_116)(lp).loss.item()
    assert loss_of(rpo) == pytest.approx(loss_of(spec()) + 0.7 * 1.5, rel=1e-12)


def test_ld_alpha_by_hand_and_its_limits():
    a = 0.3
    # pair 0: |y_w| = 3 > |y_l| = 2 → chosen token 3 weighted a; pair 1: |y_l| = 4 > |y_w| = 2 → rejected 3, 4
    lw = [sum(PW[0][:2]) - sum(RW[0][:2]) + a * (PW[0][2] - RW[0][2]), LRW[1]]
    ll = [LRL[0], sum(PL[1][:2]) - sum(RL[1][:2]) + a * (sum(PL[1][2:]) - sum(RL[1][2:]))]
    expected = sum(-ls(BETA * (w - l)) for w, l in zip(lw, ll)) / 2
    assert loss_of(spec(ld_alpha=a)) == pytest.approx(expected, rel=1e-12)
    assert loss_of(spec(ld_alpha=1.0)) == pytest.approx(loss_of(spec()), rel=1e-12)  # α = 1: DPO
    assert loss_of(spec(ld_alpha=0.0)) == pytest.approx(loss_of(spec(poet=True)), rel=1e-12)  # α = 0: POET
    # mean-score links divide by the full token count (TRL's), not by the weighted one
    ipo = sum((lw[i] / len(PW[i]) - ll[i] / len(PL[i]) - 1 / (2 * BETA)) ** 2 for i in range(2)) / 2
    assert loss_of(spec("ipo", ld_alpha=a)) == pytest.approx(ipo, rel=1e-12)


@pytest.mark.parametrize("kind, f", [
    ("forward_kl", lambda x: 1 - math.exp(-x)),
    ("js_divergence", lambda x: math.log(2) + ls(x)),
    ("alpha_divergence", lambda x: (math.exp(-0.5 * x) - 1) / -0.5),  # α = 0.5
])
def test_f_divergence_scores_by_hand(kind, f):
    s = ObjectiveSpec(beta=BETA, f_divergence_type=kind, f_alpha_divergence_coef=0.5)
    expected = sum(-ls(BETA * (f(w) - f(l))) for w, l in zip(LRW, LRL)) / 2
    assert loss_of(s) == pytest.approx(expected, rel=1e-12)


def test_alpha_divergence_at_one_is_reverse_kl():
    s = ObjectiveSpec(beta=BETA, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0)
    assert loss_of(s) == pytest.approx(loss_of(spec()), rel=1e-12)


def test_wpo_weights_by_hand():
    lp = make_logps()
    cs, rs = torch.full_like(lp.chosen, -0.4), torch.full_like(lp.rejected, -0.2)
    lp = lp.replace(chosen_sq=cs, rejected_sq=rs)
    weights = [math.exp(sum(PW[i]) / len(PW[i]) + 0.4 + sum(PL[i]) / len(PL[i]) + 0.2) for i in range(2)]
    expected = sum(w * -ls(BETA * (LRW[i] - LRL[i])) for i, w in enumerate(weights)) / 2
    out = build_objective(ObjectiveSpec(beta=BETA, use_weighting=True))(lp)
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)


def test_log_sum_sq_probs_from_the_fused_head():
    from prefkit.logprobs import token_logprobs_and_sq

    torch.manual_seed(0)
    head = nn.Linear(8, 11, bias=False).double()
    hidden, targets = torch.randn(5, 8, dtype=torch.float64), torch.randint(0, 11, (5,))
    lp, sq = token_logprobs_and_sq(hidden, head, targets, want_sq=True)
    probs = torch.softmax(head(hidden), dim=1)
    torch.testing.assert_close(sq, probs.pow(2).sum(1).log())
    torch.testing.assert_close(lp, probs.log().gather(1, targets[:, None]).squeeze(1))


def test_tr_dpo_soft_update():
    torch.manual_seed(0)
    policy, ref = nn.Linear(3, 2), nn.Linear(3, 2)
    before = [p.clone() for p in ref.parameters()]
    mix_into_reference(policy, ref, 0.6)
    for b, p, r in zip(before, policy.parameters(), ref.parameters()):
        torch.testing.assert_close(r, 0.6 * p + 0.4 * b)


@pytest.mark.parametrize("options, match", [
    (dict(loss_type=["nca_pair"], f_divergence_type="forward_kl"), "does not score pairs by f′"),
    (dict(f_divergence_type="kl"), "--f_divergence_type: must be one of"),
    (dict(ld_alpha=1.5), "--ld_alpha: must be in [0, 1]"),
    (dict(ld_alpha=0.5, poet=True), "POET drops the tail"),
    (dict(loss_type=["aot"], use_weighting=True), "--use_weighting"),
    (dict(loss_type=["sigmoid", "sft"], use_weighting=True), "loss_type sft"),
    (dict(sync_ref_model=True, use_peft=True), "--sync_ref_model"),
    (dict(sync_ref_model=True, precompute_ref_log_probs=True), "cannot be precomputed"),
])
def test_non_composable_combinations_are_refused(tmp_path, options, match):
    with pytest.raises(ConfigError, match=None) as e:
        resolve_run(PrefConfig(output_dir=str(tmp_path), **options))
    assert match in str(e.value)


def test_wpo_weights_of_a_one_token_response_and_without_log_sum_sq():
    lp = make_logps([[-0.7], PW[1]], [[-1.0], RW[1]], PL, RL)
    lp = lp.replace(chosen_sq=torch.full_like(lp.chosen, -0.4), rejected_sq=torch.full_like(lp.rejected, -0.2))
    w0 = math.exp(-0.7 + 0.4 + sum(PL[0]) / len(PL[0]) + 0.2)  # the one-token chosen response's mean is itself
    assert wpo_weights(lp, lp.chosen_mask, lp.rejected_mask)[0].item() == pytest.approx(w0, rel=1e-12)
    with pytest.raises(ValueError, match=r"^--use_weighting needs log Σ p² per token: compute the log-probs with "
                                         r"want_sq=True$"):
        wpo_weights(lp.replace(rejected_sq=None), lp.chosen_mask, lp.rejected_mask)
