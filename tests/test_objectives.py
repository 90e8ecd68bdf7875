"""Objective algebra: every link against hand computations, the exact equivalences the papers imply,
gradcheck for link x granularity, and independence of padding width and batch composition."""

from __future__ import annotations

import json
import math

import pytest
import torch

from prefkit.config import PrefConfig
from prefkit.errors import ConfigError
from prefkit.objectives import ObjectiveSpec, PairLogps, build_objective
from prefkit.objectives.granularity import assign_units
from prefkit.objectives.registry import LINKS, objectives_table_markdown
from prefkit.spec import resolve_run

BETA = 0.1
# two pairs, response-aligned; pair 0: |y_w| = 3, |y_l| = 2; pair 1: |y_w| = 2, |y_l| = 4
PW = [[-1.0, -2.0, -3.0], [-0.5, -1.0]]
RW = [[-1.5, -2.0, -2.0], [-1.0, -1.0]]
PL = [[-2.0, -1.0], [-1.0, -1.0, -1.0, -1.0]]
RL = [[-1.0, -1.0], [-1.0, -2.0, -1.0, -0.5]]


def _pad(rows, width=4):
    return torch.tensor([r + [0.0] * (width - len(r)) for r in rows], dtype=torch.float64)


def _mask(rows, width=4):
    return torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in rows])


def make_logps(pw=PW, rw=RW, pl=PL, rl=RL, width=4) -> PairLogps:
    return PairLogps(_pad(pw, width), _pad(pl, width), _mask(pw, width), _mask(pl, width), _pad(rw, width),
                     _pad(rl, width))


def spec(loss="sigmoid", **kw) -> ObjectiveSpec:
    return ObjectiveSpec(loss_type=(loss,), **{"beta": BETA, **kw})


def loss_of(s: ObjectiveSpec, logps: PairLogps | None = None) -> float:
    return build_objective(s)(logps or make_logps()).loss.item()


def ls(x: float) -> float:  # log σ(x), by hand
    return -math.log1p(math.exp(-x))


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# per-pair hand quantities: summed log-ratios and mean policy log-probs
LRW = [sum(p) - sum(r) for p, r in zip(PW, RW)]  # [-0.5, 0.5]
LRL = [sum(p) - sum(r) for p, r in zip(PL, RL)]  # [-1.0, 0.5]
H = [w - l for w, l in zip(LRW, LRL)]  # [0.5, 0.0]


def test_hand_quantities():
    assert LRW == [-0.5, 0.5] and LRL == [-1.0, 0.5] and H == [0.5, 0.0]


HAND = {
    "sigmoid": lambda i: -ls(BETA * H[i]),
    "hinge": lambda i: max(0.0, 1 - BETA * H[i]),
    "ipo": lambda i: (LRW[i] / len(PW[i]) - LRL[i] / len(PL[i]) - 1 / (2 * BETA)) ** 2,
    "nca_pair": lambda i: -ls(BETA * LRW[i]) - 0.5 * ls(-BETA * LRW[i]) - 0.5 * ls(-BETA * LRL[i]),
    "bco_pair": lambda i: -ls(BETA * LRW[i]) - ls(-BETA * LRL[i]),
    "sppo_hard": lambda i: (LRW[i] - 0.5 / BETA) ** 2 + (LRL[i] + 0.5 / BETA) ** 2,
    "apo_zero": lambda i: 1 - sig(BETA * LRW[i]) + sig(BETA * LRL[i]),
    "apo_down": lambda i: sig(BETA * LRW[i]) + 1 - sig(BETA * H[i]),
    "dpop": lambda i: -ls(BETA * (H[i] - 50.0 * max(0.0, -LRW[i]))),  # pair 0's chosen log-ratio is -0.5
    "discopop": lambda i: -ls(BETA * H[i]) * (1 - sig(BETA * H[i] / 0.05)) + math.exp(-BETA * H[i]) * sig(BETA * H[i] / 0.05),
    "simpo": lambda i: -ls(BETA * (sum(PW[i]) / len(PW[i]) - sum(PL[i]) / len(PL[i])) - 0.5),
    "cpo": lambda i: -ls(BETA * (sum(PW[i]) - sum(PL[i]))) + 1.0 * (-sum(PW[i]) / len(PW[i])),
    "exo_pair": lambda i: sig(BETA * H[i]) * (ls(BETA * H[i]) - math.log(1 - 1e-3))
    + sig(-BETA * H[i]) * (ls(-BETA * H[i]) - math.log(1e-3)),
}


def _orpo(i: int) -> float:
    mw, ml = sum(PW[i]) / len(PW[i]), sum(PL[i]) / len(PL[i])
    lo = (mw - math.log(1 - math.exp(mw))) - (ml - math.log(1 - math.exp(ml)))
    return -sum(PW[i]) / len(PW[i]) - BETA * ls(lo)


HAND["orpo"] = _orpo


@pytest.mark.parametrize("name", sorted(HAND))
def test_link_matches_hand_computation(name):
    expected = (HAND[name](0) + HAND[name](1)) / 2
    assert loss_of(spec(name)) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_dpop_is_dpo_without_its_penalty():
    """λ = 0, or every chosen log-ratio at or above 0, gives DPO's loss exactly (Pal et al. 2024, eq. 3)."""
    assert loss_of(spec("dpop", dpop_lambda=0.0)) == loss_of(spec("sigmoid"))
    above = make_logps(rw=[[r - 2.0 for r in row] for row in RW])  # reference below policy: ℓ_w > 0
    assert loss_of(spec("dpop"), above) == loss_of(spec("sigmoid"), above)
    assert loss_of(spec("dpop")) > loss_of(spec("sigmoid"))  # pair 0's chosen fell below its reference


def test_label_smoothing_links_by_hand():
    eps = 0.2
    cdpo = sum(-(1 - eps) * ls(BETA * h) - eps * ls(-BETA * h) for h in H) / 2
    robust = sum((-(1 - eps) * ls(BETA * h) + eps * ls(-BETA * h)) / (1 - 2 * eps) for h in H) / 2
    assert loss_of(spec("sigmoid", label_smoothing=eps)) == pytest.approx(cdpo, rel=1e-9)
    assert loss_of(spec("robust", label_smoothing=eps)) == pytest.approx(robust, rel=1e-9)


def test_aot_sorts_margins_across_the_batch():
    pol = sorted(sum(w) - sum(l) for w, l in zip(PW, PL))
    ref = sorted(sum(w) - sum(l) for w, l in zip(RW, RL))
    expected = sum(-ls(BETA * (p - r)) for p, r in zip(pol, ref)) / 2
    assert loss_of(spec("aot")) == pytest.approx(expected, rel=1e-9)


def test_adaptive_and_static_units_by_hand():
    lrw0, lrl0 = [0.5, 0.0, -1.0], [-1.0, 0.0]  # token log-ratios of pair 0
    # adaptive m=2, pair 0: chosen T=3 → pieces [0,1),[1,3); rejected T=2 → [0,1),[1,2)
    s_w, s_l = [lrw0[0], lrw0[1] + lrw0[2]], [lrl0[0], lrl0[1]]
    pair0 = sum(-ls(BETA * (w - l)) for w, l in zip(s_w, s_l))
    # pair 1: chosen T=2, rejected T=4 → m_eff = 2; chosen [0,1),[1,2); rejected [0,2),[2,4)
    lrw1, lrl1 = [0.5, 0.0], [0.0, 1.0, 0.0, -0.5]
    pair1 = -ls(BETA * (lrw1[0] - (lrl1[0] + lrl1[1]))) - ls(BETA * (lrw1[1] - (lrl1[2] + lrl1[3])))
    assert loss_of(spec(granularity="adaptive", num_segments=2)) == pytest.approx((pair0 + pair1) / 2, rel=1e-9)
    # static k=2 with zero padding: pair 1 windows [0,2) and [2,4); chosen has no tokens in the second
    p1 = -ls(BETA * (sum(lrw1) - (lrl1[0] + lrl1[1]))) - ls(BETA * (0.0 - (lrl1[2] + lrl1[3])))
    p0 = -ls(BETA * ((lrw0[0] + lrw0[1]) - sum(lrl0))) - ls(BETA * (lrw0[2] - 0.0))
    assert loss_of(spec(granularity="static", window_size=2)) == pytest.approx((p0 + p1) / 2, rel=1e-9)
    # mean over units instead of the paper's sum
    assert loss_of(spec(granularity="static", window_size=2, unit_reduction="mean")) == pytest.approx(
        (p0 / 2 + p1 / 2) / 2, rel=1e-9)


def test_adaptive_pieces_are_near_equal_contiguous_and_non_empty():
    mask = torch.ones(1, 10, dtype=torch.bool)
    units = assign_units(mask, mask, "adaptive", num_segments=4)
    assert units.chosen[0].tolist() == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]  # boundaries ⌊i·10/4⌋ = 0,2,5,7,10
    short = torch.tensor([[True, True, False, False]])
    assert assign_units(mask[:, :4], short, "adaptive", num_segments=256).mu_prime.tolist() == [2]


GRANS = [dict(granularity="response"), dict(granularity="static", window_size=2),
         dict(granularity="adaptive", num_segments=3), dict(granularity="token")]


def test_equivalences_with_dpo():
    dpo = loss_of(spec())
    assert loss_of(spec(granularity="adaptive", num_segments=1)) == pytest.approx(dpo, rel=1e-12)
    assert loss_of(spec(granularity="static", window_size=4)) == pytest.approx(dpo, rel=1e-12)
    assert loss_of(spec(granularity="static", window_size=100)) == pytest.approx(dpo, rel=1e-12)


def test_equal_length_token_static1_adaptiveT_and_poet_noop():
    torch.manual_seed(0)
    b, t = 3, 5
    pw, pl, rw, rl = (torch.randn(b, t, dtype=torch.float64) for _ in range(4))
    m = torch.ones(b, t, dtype=torch.bool)
    lp = PairLogps(pw, pl, m, m, rw, rl)
    token = loss_of(spec(granularity="token"), lp)
    assert loss_of(spec(granularity="static", window_size=1), lp) == pytest.approx(token, rel=1e-12)
    assert loss_of(spec(granularity="adaptive", num_segments=t), lp) == pytest.approx(token, rel=1e-12)
    for g in GRANS:
        for name in ("sigmoid", "simpo", "ipo"):
            assert loss_of(spec(name, poet=True, **g), lp) == loss_of(spec(name, **g), lp)


def test_poet_truncates_to_shorter_and_simpo_equals_simpo_on_truncated_pair():
    k = [min(len(w), len(l)) for w, l in zip(PW, PL)]  # [2, 2]
    trunc = make_logps([w[:n] for w, n in zip(PW, k)], [w[:n] for w, n in zip(RW, k)],
                       [r[:n] for r, n in zip(PL, k)], [r[:n] for r, n in zip(RL, k)])
    for name in ("simpo", "sigmoid", "ipo", "hinge"):
        assert loss_of(spec(name, poet=True)) == pytest.approx(loss_of(spec(name), trunc), rel=1e-12)
    for g in GRANS[1:]:
        assert loss_of(spec(poet=True, **g)) == pytest.approx(loss_of(spec(**g), trunc), rel=1e-12)


@pytest.mark.parametrize("name", [n for n, s in LINKS.items() if n != "aot"])
@pytest.mark.parametrize("gran", range(len(GRANS)))
def test_gradcheck_link_x_granularity(name, gran):
    g = GRANS[gran]
    if g["granularity"] != "response" and not LINKS[name].supports_granularity:
        pytest.skip("response-level link")
    base = make_logps()
    if name == "dpop":  # max(0, −ℓ_w) has a kink where a unit's chosen log-ratio is 0 (token 1 of pair 0 here)
        base = base.replace(chosen=base.chosen + 0.013 * base.chosen_mask)
    pw = base.chosen.clone().requires_grad_(True)
    pl = base.rejected.clone().requires_grad_(True)
    objective = build_objective(spec(name, label_smoothing=0.1 if name in ("robust", "exo_pair") else 0.0, **g))

    def f(pw, pl):
        return objective(base.replace(chosen=pw, rejected=pl)).loss

    assert torch.autograd.gradcheck(f, (pw, pl))


@pytest.mark.parametrize("gran", range(len(GRANS)))
def test_padding_width_and_batch_composition_do_not_matter(gran):
    s = spec(**GRANS[gran])
    wide = make_logps(width=9)
    assert loss_of(s, wide) == pytest.approx(loss_of(s), rel=1e-12)
    alone = [loss_of(s, make_logps([PW[i]], [RW[i]], [PL[i]], [RL[i]])) for i in range(2)]
    assert loss_of(s) == pytest.approx(sum(alone) / 2, rel=1e-12)


def test_token_weights_scale_rejected_log_ratios():
    lp = make_logps()
    w = torch.full_like(lp.rejected, 0.5)
    weighted = build_objective(spec())(lp.replace(rejected_weights=w)).loss.item()
    expected = sum(-ls(BETA * (lw - 0.5 * ll)) for lw, ll in zip(LRW, LRL)) / 2
    assert weighted == pytest.approx(expected, rel=1e-9)


def test_rpo_and_loss_weights_combine():
    nll = -sum(sum(p) for p in PW) / sum(len(p) for p in PW)  # token mean over the batch, as TRL's sft
    combo = ObjectiveSpec(loss_type=("sigmoid", "hinge"), loss_weights=(0.3, 0.7), beta=BETA,
                          rpo_alpha=0.5)
    expected = 0.3 * loss_of(spec()) + 0.7 * loss_of(spec("hinge")) + 0.5 * nll
    assert loss_of(combo) == pytest.approx(expected, rel=1e-9)


def test_stats_follow_trl_conventions():
    out = build_objective(spec())(make_logps())
    assert out.stats.rewards_chosen.tolist() == pytest.approx([BETA * x for x in LRW])
    assert out.stats.logps_chosen.tolist() == pytest.approx([sum(p) for p in PW])
    m = out.stats.metrics()
    assert m["rewards/margins"] == pytest.approx(BETA * sum(H) / 2)
    assert m["rewards/accuracies"] == 0.5


@pytest.mark.parametrize("option, value, match", [
    ("loss_type", ["sigmod"], "did you mean 'sigmoid'"),
    ("beta", -1.0, "--beta"),
    ("num_segments", 0, "--num_segments"),
    ("window_size", 0, "--window_size"),
    ("granularity", "sentence", "--granularity"),
    ("label_smoothing", 0.5, "--label_smoothing"),
])
def test_invalid_options_rejected_at_startup(tmp_path, option, value, match):
    cfg = PrefConfig(output_dir=str(tmp_path), **{option: value})
    with pytest.raises(ConfigError, match=match):
        resolve_run(cfg)


def test_granularity_rejected_for_response_level_links(tmp_path):
    cfg = PrefConfig(output_dir=str(tmp_path), loss_type=["orpo"], granularity="adaptive")
    with pytest.raises(ConfigError, match="--granularity response"):
        resolve_run(cfg)


def test_docs_table_is_generated_from_the_registry():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "objectives.md").read_text()
    assert objectives_table_markdown() in doc


@pytest.mark.parametrize("gran", range(len(GRANS)))
def test_at_policy_equal_reference_adpo_gradient_equals_dpo(gran):
    """Where π = π_ref every unit's margin is 0 and σ(0) = 1/2, so ADPO (sum over units, sigmoid link) has
    DPO's gradient −β/2·∇(log π_w − log π_l) per pair for any granularity; they part only as margins grow
    (the consequence shows in benchmarks/RESULTS.md, section A)."""

    def grads(s, logps):
        pw = logps.chosen.clone().requires_grad_(True)
        pl = logps.rejected.clone().requires_grad_(True)
        build_objective(s)(logps.replace(chosen=pw, rejected=pl)).loss.backward()
        return pw.grad, pl.grad

    base = make_logps()
    at_ref = base.replace(ref_chosen=base.chosen.clone(), ref_rejected=base.rejected.clone())
    dw, dl = grads(spec(), at_ref)
    assert torch.allclose(dw, -BETA / 2 / 2 * base.chosen_mask.double())  # mean over the 2 pairs
    assert torch.allclose(dl, BETA / 2 / 2 * base.rejected_mask.double())
    gw, gl = grads(spec(**GRANS[gran]), at_ref)
    assert torch.allclose(gw, dw) and torch.allclose(gl, dl)
    if GRANS[gran]["granularity"] != "response":  # away from π_ref the gradients differ
        assert not torch.allclose(grads(spec(**GRANS[gran]), base)[0], grads(spec(), base)[0])


# ---- hand computations that kill the mutants `make mutmut` found surviving (docs/testing.md) -----------------


def test_mean_scores_of_one_token_units_by_hand():
    """Token granularity: every unit holds one token, so a mean score is that token's log-prob (a unit the
    shorter response does not reach scores 0 on that side)."""
    def z(rows, i, t):
        return rows[i][t] if t < len(rows[i]) else 0.0

    expected = sum(-ls(BETA * (z(PW, i, t) - z(PL, i, t)) - 0.5)
                   for i in range(2) for t in range(max(len(PW[i]), len(PL[i])))) / 2
    assert loss_of(spec("simpo", granularity="token")) == pytest.approx(expected, rel=1e-12)


def test_sft_of_a_single_token_batch_is_that_tokens_nll():
    one = make_logps([[-0.7]], [[-1.0]], [[-2.0, -1.0]], [[-1.0, -1.0]])
    assert loss_of(spec("sft"), one) == pytest.approx(0.7, rel=1e-12)


def test_token_weights_and_ld_alpha_multiply():
    """Token weights (2 on chosen, 0.5 on rejected) times LD-DPO's (α on the longer response's tail)."""
    a = 0.3
    lp = make_logps()
    lw = [2 * (sum(PW[0][:2]) - sum(RW[0][:2]) + a * (PW[0][2] - RW[0][2])), 2 * LRW[1]]
    ll = [0.5 * LRL[0], 0.5 * (sum(PL[1][:2]) - sum(RL[1][:2])) + 0.5 * a * (sum(PL[1][2:]) - sum(RL[1][2:]))]
    expected = sum(-ls(BETA * (w - l)) for w, l in zip(lw, ll)) / 2
    got = build_objective(spec(ld_alpha=a))(lp.replace(chosen_weights=torch.full_like(lp.chosen, 2.0),
                                                      rejected_weights=torch.full_like(lp.rejected, 0.5)))
    assert got.loss.item() == pytest.approx(expected, rel=1e-12)


def test_metrics_carry_trls_names():
    m = build_objective(spec())(make_logps()).stats.metrics()
    assert set(m) == {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                      "logps/rejected", "objective/num_units", "nll_loss", "adpo/response_weight"}
    assert m["logps/rejected"] == pytest.approx(sum(sum(p) for p in PL) / 2) and m["objective/num_units"] == 1.0


def test_spec_from_config_maps_every_option(tmp_path):
    cfg = PrefConfig(output_dir=str(tmp_path), loss_type=["ipo", "sft"], loss_weights=[0.8, 0.2], beta=0.3,
                     label_smoothing=0.1, simpo_gamma=0.7, discopop_tau=0.2, f_divergence_type="forward_kl",
                     f_alpha_divergence_coef=0.4, granularity="static", window_size=3, num_segments=5,
                     unit_reduction="mean", poet=True, cpo_alpha=0.6, rpo_alpha=0.9, ld_alpha=None, use_weighting=True)
    assert ObjectiveSpec.from_config(cfg) == ObjectiveSpec(
        loss_type=("ipo", "sft"), loss_weights=(0.8, 0.2),
        beta=0.3, label_smoothing=0.1, simpo_gamma=0.7, discopop_tau=0.2, f_divergence_type="forward_kl",
        f_alpha_divergence_coef=0.4, granularity="static", window_size=3,
        num_segments=5, unit_reduction="mean", poet=True, cpo_alpha=0.6, rpo_alpha=0.9, ld_alpha=None,
        use_weighting=True)
    assert ObjectiveSpec.from_config(PrefConfig(output_dir=str(tmp_path), ld_alpha=0.25)).ld_alpha == 0.25


# Validation at the edges: every boundary value that is valid passes, every first invalid one is refused with its
# exact message (lists of two or more loss types, so a changed separator shows).
VALID_EDGES = [dict(beta=1e-9), dict(granularity="static", window_size=1), dict(granularity="adaptive", num_segments=1),
               dict(unit_reduction="mean"), dict(granularity="static", static_padding="eos"),
               dict(loss_type=["discopop"], discopop_tau=1e-9), dict(loss_type=["nca_pair", "orpo"]),
               dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]), dict(ld_alpha=0.0), dict(ld_alpha=1.0),
               dict(sync_ref_model=True, ref_model_mixup_alpha=0.0, ref_model_sync_steps=1),
               dict(sync_ref_model=True, ref_model_mixup_alpha=1.0)]


@pytest.mark.parametrize("options", VALID_EDGES)
def test_objective_options_at_their_valid_edges_pass(tmp_path, options):
    resolve_run(PrefConfig(output_dir=str(tmp_path), **options))


def _among(flag: str) -> str:
    return ", ".join(n for n, s in LINKS.items() if getattr(s, flag))


REFUSED = [
    (dict(loss_type=["zzzz"]), f"--loss_type: unknown value 'zzzz' Valid: {', '.join(LINKS)}"),
    (dict(loss_type=["sigmod"]), f"--loss_type: unknown value 'sigmod'; did you mean 'sigmoid'? Valid: {', '.join(LINKS)}"),
    (dict(loss_type=[]), "--loss_type: give at least one loss type"),
    (dict(loss_weights=[1.0, 2.0]), "--loss_weights: 2 weights for 1 loss types"),
    (dict(beta=0.0), "--beta: must be positive, got 0.0"),
    (dict(window_size=0), "--window_size: must be at least 1, got 0"),
    (dict(num_segments=0), "--num_segments: must be at least 1, got 0"),
    (dict(unit_reduction="median"), "--unit_reduction: must be sum or mean, got 'median'"),
    (dict(static_padding="pad"), "--static_padding: must be zero or eos, got 'pad'"),
    (dict(discopop_tau=0.0), "--discopop_tau: must be positive, got 0.0"),
    (dict(dpop_lambda=-1.0), "--dpop_lambda: must be at least 0, got -1.0"),
    (dict(granularity="word"), "--granularity: must be one of response, static, adaptive, token, got 'word'"),
    (dict(granularity="token", loss_type=["nca_pair", "bco_pair"]),
     "--granularity token: loss_type nca_pair, bco_pair has no per-unit margin; use --granularity response, or a "
     f"loss_type among {_among('supports_granularity')}"),
    (dict(f_divergence_type="kl"),
     "--f_divergence_type: must be one of reverse_kl, forward_kl, js_divergence, alpha_divergence, got 'kl'"),
    (dict(f_divergence_type="forward_kl", loss_type=["simpo", "cpo"]),
     "--f_divergence_type forward_kl: loss_type simpo, cpo does not score pairs by f′(π/π_ref); use a loss_type "
     f"among {_among('f_divergence')}"),
    (dict(ld_alpha=1.5), "--ld_alpha: must be in [0, 1], got 1.5"),
    (dict(ld_alpha=0.5, poet=True), "--ld_alpha with --poet true: POET drops the tail that LD-DPO down-weights "
                                    "(POET is --ld_alpha 0 for summed scores); pick one"),
    (dict(use_weighting=True, loss_type=["aot", "sft"]), "--use_weighting: WPO weights pairs, and loss_type aot, "
     "sft does not have independent per-pair losses; drop --use_weighting or that loss_type"),
    (dict(sync_ref_model=True, use_peft=True), "--sync_ref_model: with --use_peft the reference is the base model "
     "without adapters, which cannot be mixed into; drop one of the two (as TRL)"),
    (dict(sync_ref_model=True, ref_model_mixup_alpha=1.5), "--ref_model_mixup_alpha: must be in [0, 1], got 1.5"),
    (dict(sync_ref_model=True, ref_model_mixup_alpha=-0.5), "--ref_model_mixup_alpha: must be in [0, 1], got -0.5"),
    (dict(sync_ref_model=True, ref_model_sync_steps=0), "--ref_model_sync_steps: must be at least 1, got 0"),
]


@pytest.mark.parametrize("options, message", REFUSED)
def test_objective_options_past_their_edges_are_refused_with_one_message(tmp_path, options, message):
    with pytest.raises(ConfigError) as refused:  # the objective's own checks and those across sub-specs
        resolve_run(PrefConfig(output_dir=str(tmp_path), **options))
    assert str(refused.value) == message


@pytest.mark.parametrize("loss_types, needs_reference, score_reduction", [
    (("sigmoid",), True, "sum"), (("simpo",), False, "mean"), (("simpo", "cpo"), False, "mean"),
    (("cpo",), False, "sum"), (("sigmoid", "ipo"), True, "mean"), (("orpo", "sft"), False, "mean"),
])
def test_what_an_objective_tells_the_trainer(loss_types, needs_reference, score_reduction):
    """Whether a reference forward is needed, and the scores (summed or mean log-probs) dynamics and RC use."""
    obj = build_objective(ObjectiveSpec(loss_type=loss_types))
    assert obj.needs_reference is needs_reference and obj.score_reduction == score_reduction


def test_masks_and_weights_stay_on_the_masks_device():
    """POET and LD-DPO build their column index on the masks' device (the "meta" device stands in for a GPU: any
    tensor left on the CPU makes the comparison fail)."""
    from prefkit.objectives.masks import ld_weights, poet_masks

    lp = make_logps()
    mw, ml = lp.chosen_mask.to("meta"), lp.rejected_mask.to("meta")
    assert all(t.device.type == "meta" for t in (*poet_masks(mw, ml), *ld_weights(mw, ml, 0.5)))


def test_reference_free_rewards_by_hand():
    # SimPO's implicit reward is β times the mean token log-prob; CPO's is β times the sum, even when reference
    # log-probs are at hand (make_logps carries them): only reference-based links subtract the reference
    simpo = build_objective(spec("simpo"))(make_logps()).stats
    assert simpo.rewards_chosen.tolist() == pytest.approx([BETA * sum(p) / len(p) for p in PW], rel=1e-12)
    assert simpo.rewards_rejected.tolist() == pytest.approx([BETA * sum(p) / len(p) for p in PL], rel=1e-12)
    cpo = build_objective(spec("cpo"))(make_logps()).stats
    assert cpo.rewards_chosen.tolist() == pytest.approx([BETA * sum(p) for p in PW], rel=1e-12)
    assert cpo.rewards_rejected.tolist() == pytest.approx([BETA * sum(p) for p in PL], rel=1e-12)


def test_cpo_alpha_weights_the_nll_and_adds_to_other_nll_terms():
    nll = sum(-sum(p) / len(p) for p in PW) / len(PW)  # per-pair mean token NLL of the chosen, batch mean
    link = sum(-ls(BETA * (sum(w) - sum(l))) for w, l in zip(PW, PL)) / len(PW)  # −log σ(β(z_w − z_l))
    assert loss_of(spec("cpo", cpo_alpha=0.6)) == pytest.approx(link + 0.6 * nll, rel=1e-9)
    # with ORPO (NLL weight 1) beside it, the NLL weights add, in either order: 0.7·0.6 + 0.3·1
    for order in ((0, 1), (1, 0)):
        names, weights = ("cpo", "orpo"), (0.7, 0.3)
        combo = ObjectiveSpec(loss_type=tuple(names[i] for i in order), loss_weights=tuple(weights[i] for i in order),
                              beta=BETA, cpo_alpha=0.6)
        expected = 0.3 * loss_of(spec("orpo")) + 0.7 * (link + 0.6 * nll)
        assert loss_of(combo) == pytest.approx(expected, rel=1e-9)


def test_a_batch_level_link_does_not_end_the_sum_over_links():
    combo = ObjectiveSpec(loss_type=("sft", "sigmoid"), loss_weights=(0.5, 0.5), beta=BETA)
    assert loss_of(combo) == pytest.approx(0.5 * loss_of(spec("sft")) + 0.5 * loss_of(spec()), rel=1e-9)


def test_static_windows_count_by_ceiling_division():
    # k = 3: pair 0 spans 3 tokens → μ′ = 1; pair 1 spans 4 → μ′ = 2 (windows [0,3) and [3,4))
    units = assign_units(_mask(PW), _mask(PL), "static", window_size=3)
    assert units.mu_prime.dtype == torch.long and units.mu_prime.tolist() == [1, 2]
    assert units.valid.tolist() == [[True, False], [True, True]]
    lrw1, lrl1 = [0.5, 0.0], [0.0, 1.0, 0.0, -0.5]  # token log-ratios of pair 1
    p0 = -ls(BETA * H[0])
    p1 = -ls(BETA * (sum(lrw1) - sum(lrl1[:3]))) - ls(BETA * (0.0 - lrl1[3]))
    assert loss_of(spec(granularity="static", window_size=3)) == pytest.approx((p0 + p1) / 2, rel=1e-9)


def test_unit_weights_are_dpos_and_adpos_gradient_weights_by_hand():
    """σ(−β·ΣΔ) per pair (mean over pairs) and σ(−β·Δ_u) over the valid units, at token granularity: pair 0's
    token margins (chosen log-ratios [0.5, 0, −1] minus rejected [−1, 0]) are [1.5, 0, −1]; pair 1's ([0.5, 0]
    minus [0, 1, 0, −0.5]) are [0.5, −1, 0, 0.5]: seven valid units."""
    m = build_objective(spec(granularity="static", window_size=1))(make_logps()).stats.metrics()
    assert m["adpo/response_weight"] == pytest.approx((sig(-BETA * H[0]) + sig(-BETA * H[1])) / 2, rel=1e-6)
    w = [sig(-BETA * d) for d in (1.5, 0.0, -1.0, 0.5, -1.0, 0.0, 0.5)]
    mean = sum(w) / 7
    assert m["adpo/unit_weight_mean"] == pytest.approx(mean, rel=1e-6)
    assert m["adpo/unit_weight_std"] == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in w) / 7), rel=1e-6)
    response = build_objective(spec())(make_logps()).stats.metrics()
    assert response["adpo/response_weight"] == pytest.approx(m["adpo/response_weight"], rel=1e-12)
    assert "adpo/unit_weight_mean" not in response and "adpo/unit_weight_std" not in response
    # reference-free or another link: σ(−β·ΣΔ) is not its weight, so nothing is logged
    assert not any(k.startswith("adpo/") for k in build_objective(spec("simpo", beta=2.0))(make_logps()).stats.metrics())
    assert not any(k.startswith("adpo/") for k in build_objective(spec("ipo"))(make_logps()).stats.metrics())


def test_unit_weights_reach_metrics_jsonl(tmp_path, tiny_tokenizer):
    """A real two-step ADPO run logs the three weights at every logging step."""
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM

    from prefkit import PrefConfig, PrefTrainer
    from tests.conftest import _small
    from tests.test_train_e2e import write_pairs

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**_small(len(tiny_tokenizer))))
    rows = [json.loads(ln) for ln in write_pairs(tmp_path / "p.jsonl", 8).read_text().splitlines()]
    args = PrefConfig(output_dir=str(tmp_path / "o"), per_device_train_batch_size=4, max_steps=2, logging_steps=1,
                      use_cpu=True, bf16=False, report_to="none", max_length=64, dynamics_steps=0,
                      save_strategy="no", granularity="adaptive", num_segments=2)
    PrefTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer).train()
    recs = [json.loads(ln) for ln in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    assert len(steps) == 2
    for r in steps:
        assert 0 < r["adpo/response_weight"] < 1 and 0 < r["adpo/unit_weight_mean"] < 1
        assert r["adpo/unit_weight_std"] >= 0


def test_adaptive_runs_log_their_effective_m():
    stats = build_objective(spec(granularity="adaptive", num_segments=3))(make_logps()).stats
    # m_eff = min(m, shorter response): pair 0 (3, 2) → 2; pair 1 (2, 4) → 2
    assert stats.extra["objective/effective_m"].tolist() == [2, 2]
    assert "objective/effective_m" not in build_objective(spec(granularity="static", window_size=2))(
        make_logps()).stats.extra
