"""Preference dynamics: incentives vs the paper's closed forms, band maths, score gradient norms, and RC."""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from prefkit.accel.attention import register_segment_attention
from prefkit.data import PairCollator
from prefkit.data.types import PairBatch
from prefkit.dynamics import RewardCalibrator, band_edges, compute_incentives, score_grad_norms, select_params
from prefkit.dynamics.grad_norms import ScoreGradNorms
from prefkit.dynamics.incentives import Incentives
from prefkit.dynamics.monitor import DynamicsMonitor
from prefkit.logprobs import compute_pair_logps
from prefkit.objectives import ObjectiveSpec, build_objective
from tests.test_objectives import LRL, LRW, PL, PW, make_logps

BETA = 0.1


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def objective(loss="sigmoid", **kw):
    return build_objective(ObjectiveSpec(loss_type=(loss,), **{"beta": BETA, **kw}))


def test_dpo_incentives_closed_form():
    inc = compute_incentives(objective(), make_logps())
    for i in range(2):
        h = LRW[i] - LRL[i]
        assert inc.d_w[i].item() == pytest.approx(BETA * sig(-BETA * h), rel=1e-9)
        assert inc.d_l[i].item() == pytest.approx(BETA * sig(-BETA * h), rel=1e-9)


def test_ipo_simpo_hinge_cpo_incentives_closed_form():
    lp = make_logps()
    nw, nl = [len(p) for p in PW], [len(p) for p in PL]
    ipo = compute_incentives(objective("ipo"), lp)
    simpo = compute_incentives(objective("simpo"), lp)
    hinge = compute_incentives(objective("hinge"), lp)
    cpo = compute_incentives(objective("cpo"), lp)
    for i in range(2):
        # IPO on mean log-ratios (score z = mean): d = −2·(h̄ − 1/(2β))
        hbar = LRW[i] / nw[i] - LRL[i] / nl[i]
        assert ipo.d_w[i].item() == pytest.approx(-2 * (hbar - 1 / (2 * BETA)), rel=1e-9)
        assert ipo.d_l[i].item() == pytest.approx(-2 * (hbar - 1 / (2 * BETA)), rel=1e-9)
        # SimPO (mean policy log-prob): d = β·σ(−(β·Δz̄ − γ))
        dz = sum(PW[i]) / nw[i] - sum(PL[i]) / nl[i]
        assert simpo.d_w[i].item() == pytest.approx(BETA * sig(-(BETA * dz - 0.5)), rel=1e-9)
        # SLiC / hinge: β·1[1 − β·h > 0]
        assert hinge.d_w[i].item() == pytest.approx(BETA * (1 - BETA * (LRW[i] - LRL[i]) > 0), rel=1e-9)
        # CPO: sigmoid on summed policy log-probs plus the chosen NLL (mean over tokens → 1/T per token)
        d = BETA * sig(-BETA * (sum(PW[i]) - sum(PL[i])))
        assert cpo.d_l[i].item() == pytest.approx(d, rel=1e-9)
        assert cpo.d_w[i].item() == pytest.approx(d + 1.0 / nw[i], rel=1e-9)


def test_adpo_incentive_is_token_average():
    lp = make_logps()
    inc = compute_incentives(objective(granularity="token"), lp)
    # token-level DPO: each chosen token t contributes β·σ(−β·(lr_w,t − lr_l,t)); d_w = their mean
    pw, rw, pl, rl = lp.chosen[0], lp.ref_chosen[0], lp.rejected[0], lp.ref_rejected[0]
    terms = [BETA * sig(-BETA * ((pw[t] - rw[t]) - (pl[t] - rl[t] if t < 2 else 0.0)).item()) for t in range(3)]
    assert inc.d_w[0].item() == pytest.approx(sum(terms) / 3, rel=1e-9)


def test_band_edges_by_hand():
    assert band_edges(2.0, 1.0, 0.5) == pytest.approx((0.25, 1.0))
    assert band_edges(1.0, 1.0, -0.1) == (0.0, math.inf)


def _tiny_batch():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    ids = torch.randint(3, 64, (4, 9))
    batch = PairBatch(ids, torch.ones_like(ids), torch.tensor([3, 4, 3, 4]), torch.tensor([6, 5, 4, 5]),
                      torch.arange(2))
    return model, batch


LAYOUTS = {"two rows": {}, "shared prompt": {"share_prompt": True},
           "packed": {"share_prompt": True, "pack_pairs": True}}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_score_grad_norms_match_manual_gradients(layout):
    """‖s_w‖, ‖s_l‖, ρ against autograd on the two-rows layout, whatever layout the statistics are taken in
    (packed pairs are the command line's default, the shared prompt the Python API's)."""
    register_segment_attention()
    model, _ = _tiny_batch()
    ids = torch.randint(3, 64, (3, 12)).tolist()
    feats = [{"prompt_ids": r[:p], "chosen_ids": r[p : p + c], "rejected_ids": r[p + c : p + c + l], "row_id": i}
             for i, (r, p, c, l) in enumerate(zip(ids, (3, 1, 4), (5, 2, 4), (3, 6, 4)))]
    params = select_params(model, "last_block")
    assert params and all("layers.1." in n for n, p in model.named_parameters() if any(p is q for q in params))
    lp = compute_pair_logps(model, PairCollator(pad_token_id=0, **LAYOUTS[layout])(feats))
    st = score_grad_norms(lp, params, (lp.chosen_mask, lp.rejected_mask), "sum")
    lp = compute_pair_logps(model, PairCollator(pad_token_id=0)(feats))
    gw = torch.autograd.grad(lp.chosen.sum(1).mean(), params, retain_graph=True)
    gl = torch.autograd.grad(lp.rejected.sum(1).mean(), params)
    fw, fl = torch.cat([g.flatten() for g in gw]), torch.cat([g.flatten() for g in gl])
    assert st.norm_chosen == pytest.approx(fw.norm().item(), rel=1e-5)
    assert st.norm_rejected == pytest.approx(fl.norm().item(), rel=1e-5)
    assert st.cos == pytest.approx((fw @ fl / (fw.norm() * fl.norm())).item(), rel=1e-5)


@pytest.mark.parametrize("kw", [dict(), dict(granularity="adaptive", num_segments=2), dict(poet=True),
                                dict(loss="simpo"), dict(loss="ipo", granularity="static", window_size=2)])
def test_rc_keeps_loss_bit_for_bit_and_scales_gradients(kw):
    loss = kw.pop("loss", "sigmoid")
    obj = objective(loss, **kw)
    rc = RewardCalibrator(ema=0.9)
    rc.update_incentives(Incentives(torch.tensor([0.2]), torch.tensor([0.05])))
    rc.update_grad_norms(ScoreGradNorms(1.0, 2.0, 0.5))
    assert rc.alpha() == 1.0  # nothing committed yet
    rc.commit()
    alpha = rc.alpha()
    assert alpha == pytest.approx(math.sqrt(2.0 / 4.0))  # r* = 2, r = 4
    base = make_logps()
    pw = base.chosen.clone().requires_grad_(True)
    pl = base.rejected.clone().requires_grad_(True)
    raw = obj(base.replace(chosen=pw, rejected=pl)).loss
    gw, gl = torch.autograd.grad(raw, [pw, pl])
    cal = obj(rc.apply(base.replace(chosen=pw, rejected=pl))).loss
    assert torch.equal(cal, raw)  # forward value bit for bit
    cw, cl = torch.autograd.grad(cal, [pw, pl])
    torch.testing.assert_close(cw, alpha * gw)
    torch.testing.assert_close(cl, gl / alpha)


def test_rc_state_round_trip_gives_identical_alpha_sequence():
    def feed(rc, k):
        rc.update_incentives(Incentives(torch.tensor([0.1 + 0.01 * k]), torch.tensor([0.2])))
        rc.update_grad_norms(ScoreGradNorms(1.0 + 0.1 * k, 1.5, 0.9))
        rc.commit()
        return rc.alpha()

    a = RewardCalibrator(0.9)
    for k in range(3):
        feed(a, k)
    b = RewardCalibrator(0.9)
    b.load_state_dict(a.state_dict())
    assert [feed(a, k) for k in range(3, 6)] == [feed(b, k) for k in range(3, 6)]


def test_rc_alpha_is_one_before_statistics():
    assert RewardCalibrator().alpha() == 1.0


def test_rc_commit_averages_micro_batches():
    rc = RewardCalibrator(0.5)
    rc.update_incentives(Incentives(torch.tensor([0.1, 0.3]), torch.tensor([0.2])))
    rc.update_incentives(Incentives(torch.tensor([0.6]), torch.tensor([0.2])))
    rc.update_grad_norms(ScoreGradNorms(1.0, 4.0, 0.9))
    rc.commit()
    # r = mean(0.2, 0.6) / 0.2 = 2, r* = 4 → α = sqrt(4 / 2)
    assert rc.alpha() == pytest.approx(math.sqrt(2.0))


def _rc_step(rc: RewardCalibrator, *micro: tuple[float, float, float, float, float]) -> None:
    """One optimizer step: per micro-batch (d_w, d_l, ‖s_w‖, ‖s_l‖, ρ), then the commit."""
    for d_w, d_l, n_w, n_l, cos in micro:
        rc.update_incentives(Incentives(torch.tensor([d_w]), torch.tensor([d_l])))
        rc.update_grad_norms(ScoreGradNorms(n_w, n_l, cos))
    rc.commit()


# the finite measurement of each step repeats step 1's values, which leave an EMA exactly where it was
@pytest.mark.parametrize("bad", [(math.inf, 3.0, 1.0, 4.0, 0.9), (0.2, 0.1, math.inf, 3.0, 0.5),
                                 (0.2, 0.1, 1.0, 3.0, math.nan), (math.nan, 3.0, math.nan, 3.0, math.nan)])
def test_rc_a_non_finite_measurement_leaves_every_ema_untouched(bad):
    """Incentives or score gradient norms that are not finite change no EMA: not even the finite half of the
    measurement (a d_l without its d_w would move the ratio r)."""
    rc = RewardCalibrator(0.5, target="band")
    _rc_step(rc, (0.2, 0.1, 1.0, 4.0, 0.9))
    before = dict(rc.state)
    _rc_step(rc, bad)
    assert rc.state == before
    # r = 0.2 / 0.1 = 2, r* = 4 / 1, band [0.9·4, 4/0.9] → α = sqrt(3.6 / 2)
    assert rc.alpha() == pytest.approx(math.sqrt(1.8))


def test_rc_a_non_finite_micro_batch_drops_only_itself():
    """The step's other micro-batches still count (as their gradients do): the same EMAs as without it."""
    with_nan, alone = RewardCalibrator(0.5), RewardCalibrator(0.5)
    _rc_step(with_nan, (0.2, 0.1, 1.0, 4.0, 0.9), (math.nan, 0.1, math.nan, 4.0, math.nan))
    _rc_step(alone, (0.2, 0.1, 1.0, 4.0, 0.9))
    assert with_nan.state == alone.state and with_nan.state["log_d_w"] == pytest.approx(math.log(0.2))


def _probe_warnings(chosen_sums: list[float], caplog, patience: int = 2) -> list[str]:
    """Feed the probe's chosen log-prob sums (one per log) to a DynamicsMonitor; the warnings it logged."""
    cfg = SimpleNamespace(dynamics_steps=1, reward_calibration=False, rc_norm_steps=1, rc_scores="mean",
                          dynamics_params="trainable", displacement_patience=patience)
    values = iter(chosen_sums)

    def logps_fn(model, batch):
        v = next(values)
        return make_logps().replace(chosen=torch.tensor([[v]]), rejected=torch.tensor([[-5.0]]))

    model = torch.nn.Linear(2, 2)
    monitor = DynamicsMonitor(cfg, objective(), model, probe_batch=object(), logps_fn=logps_fn)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="prefkit"):
        deltas = [monitor._probe(model, step)["logps/chosen_delta"] for step in range(1, len(chosen_sums) + 1)]
    assert deltas == pytest.approx([v - chosen_sums[0] for v in chosen_sums])
    return [r.getMessage() for r in caplog.records if "displacement" in r.getMessage()]


def test_displacement_warning_after_patience_falls_in_a_row_once_per_run_of_falls(caplog):
    # falls at logs 2, 3 (warn: 2 in a row), 4 (same run: no repeat); a rise resets; falls at 6, 7 warn again
    warned = _probe_warnings([-10.0, -11.0, -12.5, -13.0, -12.0, -12.25, -14.0], caplog)
    assert warned == [
        "likelihood displacement: the chosen log-prob on the probe batch has fallen for 2 logs in a row (step 3, "
        "-2.50 since start). Consider --reward_calibration true or a smaller --learning_rate",
        "likelihood displacement: the chosen log-prob on the probe batch has fallen for 2 logs in a row (step 7, "
        "-4.00 since start). Consider --reward_calibration true or a smaller --learning_rate",
    ]


def test_no_displacement_warning_without_patience_falls_in_a_row(caplog):
    # every fall is followed by a rise or a flat log (which is not a fall), so no two falls are consecutive
    assert _probe_warnings([-10.0, -11.0, -10.5, -11.0, -11.0, -12.0, -11.5, -20.0], caplog) == []
    # the same sequence with patience 1 warns at the first fall of each run
    assert len(_probe_warnings([-10.0, -11.0, -10.5, -11.0, -11.0, -12.0, -11.5, -20.0], caplog, patience=1)) == 4


def test_monitor_logs_band_and_score_grad_metrics_under_new_and_deprecated_names():
    """The diagnostics' values under ``band/*`` and ``score_grad/*``, and the same values under the deprecated
    ``db/*`` and ``score/*`` names (docs/dynamics.md); the band edges by hand from the logged norms."""
    model, batch = _tiny_batch()
    cfg = SimpleNamespace(dynamics_steps=1, reward_calibration=False, rc_norm_steps=1, rc_scores="mean",
                          dynamics_params="last_block", displacement_patience=3)
    monitor = DynamicsMonitor(cfg, objective(), model, probe_batch=None, logps_fn=compute_pair_logps)
    lp = compute_pair_logps(model, batch)
    lp = lp.replace(ref_chosen=lp.chosen.detach() - 0.1, ref_rejected=lp.rejected.detach() + 0.2)
    m = monitor.observe(1, model, lp, objective()(lp))
    want = score_grad_norms(lp, select_params(model, "last_block"), (lp.chosen_mask, lp.rejected_mask), "sum")
    assert m["score_grad/norm_chosen"] == pytest.approx(want.norm_chosen)
    assert m["score_grad/norm_rejected"] == pytest.approx(want.norm_rejected)
    assert m["score_grad/cos"] == pytest.approx(want.cos)
    r_star, rho = want.norm_rejected / want.norm_chosen, want.cos
    assert rho > 0
    assert m["band/lower"] == pytest.approx(rho * r_star)
    assert m["band/upper"] == pytest.approx(r_star / rho)
    assert 0.0 <= m["band/in_band"] <= 1.0
    for new, old in [("band/lower", "db/lower"), ("band/upper", "db/upper"), ("band/in_band", "db/in_band"),
                     ("score_grad/norm_chosen", "score/norm_chosen"),
                     ("score_grad/norm_rejected", "score/norm_rejected"), ("score_grad/cos", "score/cos")]:
        assert m[old] == m[new], old


def test_readers_take_the_new_metric_name_and_fall_back_to_the_deprecated_one(tmp_path):
    """plot's reader and the bench's in-band summary read ``band/in_band``; a run logged before the rename
    (``db/in_band`` only) reads the same; where both are logged the new name wins."""
    import json

    from prefkit.bench.runner import _dynamics_summary
    from prefkit.plot import read_metrics

    logs = {"old": [{"step": 1, "db/in_band": 0.25}, {"step": 2, "db/in_band": 0.75}],
            "new": [{"step": 1, "band/in_band": 0.25}, {"step": 2, "band/in_band": 0.75}],
            "both": [{"step": 1, "band/in_band": 0.25, "db/in_band": 9.0}, {"step": 2, "band/in_band": 0.75}]}
    for name, records in logs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        assert [r["band/in_band"] for r in read_metrics(str(tmp_path / name))] == [0.25, 0.75], name
        assert _dynamics_summary(tmp_path / name)[0] == pytest.approx(0.5), name
