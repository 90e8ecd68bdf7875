"""RC as its authors run it (issue 21 §2): --rc_scores, --rc_target, --rc_norm_steps, by hand and end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prefkit.cli import main
from prefkit.config import PrefConfig
from prefkit.dynamics import RewardCalibrator, compute_incentives, score_grad_norms, select_params
from prefkit.dynamics.grad_norms import ScoreGradNorms
from prefkit.dynamics.incentives import Incentives
from prefkit.errors import ConfigError
from prefkit.logprobs import compute_pair_logps
from prefkit.metrics import MetricMeans, Weighted
from prefkit.spec import resolve_run
from tests.test_dynamics import BETA, _tiny_batch, objective, sig
from tests.test_objectives import LRL, LRW, PL, PW, make_logps
from tests.test_train_e2e import write_pairs


def _logged(rc: RewardCalibrator) -> dict[str, float]:
    """RC's metrics of one micro-step as the trainer logs them (through MetricMeans, in float32)."""
    means = MetricMeans()
    means.add("train", rc.metrics())
    return means.pop("train")


def _calibrator(target: str, d_w: float, d_l: float, norm_w: float, norm_l: float, cos: float) -> RewardCalibrator:
    rc = RewardCalibrator(ema=0.9, target=target)
    rc.update_incentives(Incentives(torch.tensor([d_w], dtype=torch.float64), torch.tensor([d_l], dtype=torch.float64)))
    rc.update_grad_norms(ScoreGradNorms(norm_w, norm_l, cos))
    rc.commit()
    return rc


# r* = ‖s_l‖/‖s_w‖ = 2 and ρ = 0.5 throughout, so the band is [1, 4]; r = d_w/d_l varies
@pytest.mark.parametrize("d_w, d_l, centre, band", [
    (0.2, 0.1, math.sqrt(2 / 2), 1.0),    # r = 2, at the centre: both leave it
    (0.3, 0.1, math.sqrt(2 / 3), 1.0),    # r = 3, inside: band leaves it, centre moves it to 2
    (0.8, 0.1, math.sqrt(2 / 8), math.sqrt(4 / 8)),    # r = 8, above: band moves it to the upper edge 4
    (0.05, 0.1, math.sqrt(2 / 0.5), math.sqrt(1 / 0.5)),  # r = 0.5, below: band moves it to the lower edge 1
])
def test_alpha_centre_and_band_by_hand(d_w, d_l, centre, band):
    c = _calibrator("centre", d_w, d_l, 1.0, 2.0, 0.5)
    b = _calibrator("band", d_w, d_l, 1.0, 2.0, 0.5)
    assert c.alpha() == pytest.approx(centre, rel=1e-12)
    assert b.alpha() == pytest.approx(band, rel=1e-12)
    r = d_w / d_l
    assert b.alpha() ** 2 * r == pytest.approx(min(max(r, 1.0), 4.0))  # calibrated ratio: r clamped to the band
    m = _logged(b)
    assert m["rc/alpha"] == pytest.approx(b.alpha(), rel=1e-7) and m["rc/ratio"] == pytest.approx(r) and m["rc/target"] == pytest.approx(2.0)
    assert m["rc/in_band"] == float(1.0 <= r <= 4.0)


def test_fixed_alpha_applies_exactly_that_alpha_while_statistics_update():
    # same statistics as the r = 8 row above: RC's own α would be sqrt(2/8) = 0.5; the fixed one is 3
    rc = RewardCalibrator(ema=0.9, fixed_alpha=3.0)
    rc.update_incentives(Incentives(torch.tensor([0.8], dtype=torch.float64), torch.tensor([0.1], dtype=torch.float64)))
    rc.update_grad_norms(ScoreGradNorms(1.0, 2.0, 0.5))
    rc.commit()
    assert rc.alpha() == 3.0
    m = _logged(rc)
    assert m["rc/alpha"] == 3.0 and m["rc/ratio"] == pytest.approx(8.0) and m["rc/target"] == pytest.approx(2.0)
    assert m["rc/in_band"] == 0.0
    rc.update_incentives(Incentives(torch.tensor([0.2], dtype=torch.float64), torch.tensor([0.1], dtype=torch.float64)))
    rc.commit()
    # log r = 0.9·log 8 + 0.1·log 2: the EMA still moves under a fixed α
    ema = 0.9 * math.log(8) + 0.1 * math.log(2)
    assert rc.state["log_d_w"] - rc.state["log_d_l"] == pytest.approx(ema, rel=1e-12)
    assert _logged(rc)["rc/ratio"] == pytest.approx(math.exp(ema), rel=1e-7)  # logged in float32
    # applied as RC applies α: forward values unchanged, gradient ×3 on chosen and ×1/3 on rejected
    chosen = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    rejected = torch.tensor([[-0.5, -1.5]], requires_grad=True)
    lp = make_logps().replace(chosen=chosen, rejected=rejected)
    out = rc.apply(lp)
    assert torch.equal(out.chosen, chosen) and torch.equal(out.rejected, rejected)
    (out.chosen.sum() + out.rejected.sum()).backward()
    assert torch.allclose(chosen.grad, torch.full((1, 2), 3.0))
    assert torch.allclose(rejected.grad, torch.full((1, 2), 1 / 3))


def test_rc_metrics_are_logged_once_their_statistics_are_known():
    """Before a commit only rc/alpha is logged; after one whose incentives cannot give a log ratio (d_l = 0), ratio,
    target and in_band are left out of the log (not logged as 0 or NaN); a valid step brings them."""
    rc = RewardCalibrator(ema=0.9)
    assert _logged(rc) == {"rc/alpha": 1.0}
    rc.update_incentives(Incentives(torch.tensor([0.2]), torch.tensor([0.0])))
    rc.update_grad_norms(ScoreGradNorms(1.0, 2.0, 0.5))
    rc.commit()
    assert _logged(rc) == {"rc/alpha": 1.0}
    rc.update_incentives(Incentives(torch.tensor([0.2]), torch.tensor([0.1])))
    rc.commit()
    assert _logged(rc) == pytest.approx({"rc/alpha": 1.0, "rc/ratio": 2.0, "rc/target": 2.0, "rc/in_band": 1.0})


def test_a_weighted_metric_logs_the_mean_of_the_batches_that_know_it():
    means = MetricMeans()
    means.add("train", {"m": Weighted(torch.tensor(math.nan), torch.tensor(False)), "n": 1.0})
    means.add("train", {"m": Weighted(torch.tensor(3.0), torch.tensor(True)), "n": torch.tensor(2.0)})
    means.add("train", {"m": Weighted(torch.tensor(5.0), torch.tensor(True)), "n": 3.0})
    assert means.pop("train") == {"m": 4.0, "n": 2.0}
    assert means.pop("train") == {}


def test_a_micro_step_that_was_not_finite_adds_no_rc_statistics():
    """``ok`` false (the trainer's loss-and-gradient check of that micro-step) leaves its row out, as a non-finite
    value does; the step's other micro-steps still count."""
    rc, alone = RewardCalibrator(ema=0.5), RewardCalibrator(ema=0.5)
    for calibrator, rows in ((rc, [(0.2, True), (0.9, False)]), (alone, [(0.2, True)])):
        for d_w, ok in rows:
            calibrator.update_incentives(Incentives(torch.tensor([d_w]), torch.tensor([0.1])), torch.tensor(ok))
            calibrator.update_grad_norms(ScoreGradNorms(1.0, 4.0, 0.5), torch.tensor(ok))
        calibrator.commit()
    assert rc.state == alone.state and rc.state["log_d_w"] == pytest.approx(math.log(0.2))


@pytest.mark.parametrize("value", [0.0, -1.0, math.inf, math.nan])
def test_bad_fixed_alpha_rejected(tmp_path, value):
    cfg = PrefConfig(output_dir=str(tmp_path), reward_calibration=True, rc_fixed_alpha=value)
    with pytest.raises(ConfigError, match="^--rc_fixed_alpha: must be a finite number > 0"):
        resolve_run(cfg)
    with pytest.raises(ValueError, match="finite and > 0"):
        RewardCalibrator(fixed_alpha=value)


def test_band_with_non_positive_cosine_never_calibrates():
    # ρ ≤ 0: every ratio is inside the band (0, ∞); the centre target does not look at ρ
    assert _calibrator("band", 0.8, 0.1, 1.0, 2.0, -0.2).alpha() == 1.0
    assert _calibrator("centre", 0.8, 0.1, 1.0, 2.0, -0.2).alpha() == pytest.approx(math.sqrt(2 / 8))


def test_band_uses_the_ema_of_the_cosine():
    rc = _calibrator("band", 0.8, 0.1, 1.0, 2.0, 0.5)
    rc.update_grad_norms(ScoreGradNorms(1.0, 2.0, 0.25))
    rc.commit()
    # ρ = 0.9·0.5 + 0.1·0.25 = 0.475: upper edge 2/0.475; the incentives EMA still gives r = 8
    assert rc.alpha() == pytest.approx(math.sqrt(2 / 0.475 / 8), rel=1e-12)


def test_mean_and_sum_incentives_by_hand():
    lp = make_logps()
    obj = objective()  # DPO, summed scores
    summed, mean = compute_incentives(obj, lp, "sum"), compute_incentives(obj, lp, "mean")
    assert torch.equal(summed.d_w, compute_incentives(obj, lp).d_w)  # the objective's own by default
    for i in range(2):
        d = BETA * sig(-BETA * (LRW[i] - LRL[i]))
        # z = mean log-prob: ∂ℓ/∂z̄ = T·∂ℓ/∂z, so d scales by the response length
        assert summed.d_w[i].item() == pytest.approx(d, rel=1e-9)
        assert mean.d_w[i].item() == pytest.approx(len(PW[i]) * d, rel=1e-9)
        assert mean.d_l[i].item() == pytest.approx(len(PL[i]) * d, rel=1e-9)


def test_mean_and_sum_score_norms_by_hand():
    model, batch = _tiny_batch()
    params = select_params(model, "last_block")
    lp = compute_pair_logps(model, batch)
    masks = (lp.chosen_mask, lp.rejected_mask)
    for reduction in ("sum", "mean"):
        st = score_grad_norms(lp, params, masks, reduction)
        zw, zl = (lp.chosen * lp.chosen_mask).sum(1), (lp.rejected * lp.rejected_mask).sum(1)
        if reduction == "mean":
            zw, zl = zw / lp.chosen_mask.sum(1), zl / lp.rejected_mask.sum(1)
        gw = torch.cat([g.flatten() for g in torch.autograd.grad(zw.mean(), params, retain_graph=True)])
        gl = torch.cat([g.flatten() for g in torch.autograd.grad(zl.mean(), params, retain_graph=True)])
        assert st.norm_chosen.item() == pytest.approx(gw.norm().item(), rel=1e-5), reduction
        assert st.norm_rejected.item() == pytest.approx(gl.norm().item(), rel=1e-5), reduction
    # the two scores differ here (responses of 3 and 4 tokens), so the test tells them apart
    assert score_grad_norms(lp, params, masks, "mean").norm_chosen.item() != pytest.approx(
        score_grad_norms(lp, params, masks, "sum").norm_chosen.item(), rel=1e-2)


@pytest.mark.parametrize("option, value", [("rc_scores", "median"), ("rc_target", "center"), ("rc_norm_steps", 0)])
def test_bad_rc_values_rejected(tmp_path, option, value):
    cfg = PrefConfig(output_dir=str(tmp_path), reward_calibration=True, **{option: value})
    with pytest.raises(ConfigError, match=f"^--{option}: must be"):
        resolve_run(cfg)


@pytest.mark.parametrize("option, value", [("rc_scores", "sum"), ("rc_target", "band"), ("rc_norm_steps", 5),
                                           ("rc_ema", 0.9), ("rc_fixed_alpha", 1.0)])
def test_rc_options_without_rc_refused(tmp_path, option, value):
    with pytest.raises(ConfigError, match=f"^--{option}: has no effect without --reward_calibration true"):
        resolve_run(PrefConfig(output_dir=str(tmp_path), **{option: value}))
    resolve_run(PrefConfig(output_dir=str(tmp_path), reward_calibration=True, **{option: value}))


# ---- end to end --------------------------------------------------------------------------------------------
def _run(model_dir: Path, data: Path, out: Path, *extra: str) -> list[dict]:
    args = ["train", "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--output_dir", str(out),
            "--max_steps", "4", "--per_device_train_batch_size", "4", "--logging_steps", "1", "--save_strategy", "no",
            "--learning_rate", "5e-2", "--max_length", "64", "--seed", "7", "--use_cpu", "true", *extra]
    assert main(args) == 0
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def _curve(records: list[dict]) -> list[tuple[int, float, float]]:
    return [(r["step"], r["loss"], r["grad_norm"]) for r in records if "loss" in r]


@pytest.mark.slow
def test_rc_with_alpha_forced_to_one_is_dpo_bit_for_bit(tmp_path: Path, model_dir: Path):
    data = write_pairs(tmp_path / "pairs.jsonl", 16)
    dpo = _run(model_dir, data, tmp_path / "dpo")
    rc = _run(model_dir, data, tmp_path / "rc", "--reward_calibration", "true")
    forced = _run(model_dir, data, tmp_path / "forced", "--reward_calibration", "true", "--rc_fixed_alpha", "1.0")
    assert len(_curve(dpo)) == 4
    assert _curve(forced) == _curve(dpo)  # loss and gradient norm at every step, exactly
    weights = [load_file(tmp_path / d / "model.safetensors") for d in ("dpo", "forced")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    # the comparison has power: real RC (α ≠ 1 from step 2 on) leaves DPO's curve
    assert any(r["rc/alpha"] != 1.0 for r in rc if "rc/alpha" in r)
    assert [c[1] for c in _curve(rc)][1:] != [c[1] for c in _curve(dpo)][1:]


@pytest.mark.slow
def test_cli_rc_band_every_step_writes_alpha(tmp_path: Path, model_dir: Path):
    data = write_pairs(tmp_path / "pairs.jsonl", 16)
    records = _run(model_dir, data, tmp_path / "band", "--reward_calibration", "true", "--rc_scores", "mean",
                   "--rc_target", "band", "--rc_norm_steps", "1")
    rc = [r for r in records if "rc/alpha" in r]
    assert [r["step"] for r in rc] == [1, 2, 3, 4]
    assert rc[0]["rc/alpha"] == 1.0  # nothing measured before the first step
    for r in rc[1:]:
        assert {"rc/ratio", "rc/target", "rc/in_band"} <= r.keys()
        # inside the band band-RC leaves the ratio alone; outside it moves it to the nearest edge
        assert (r["rc/alpha"] == 1.0) == (r["rc/in_band"] == 1.0)
