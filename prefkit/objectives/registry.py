"""The objective registry: a table of link losses with what each needs and composes with.

It drives validation (start-up errors name the option to change), the reference-model decision, and the
table in docs/objectives.md (:func:`objectives_table_markdown`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from prefkit.errors import ConfigError
from prefkit.objectives import links
from prefkit.objectives.granularity import GRANULARITIES
from prefkit.objectives.links import F_DIVERGENCES, UnitLogps
from prefkit.objectives.spec import ObjectiveSpec


@dataclass(frozen=True)
class LinkSpec:
    fn: Callable[[UnitLogps, ObjectiveSpec], Tensor]
    paper: str
    arxiv: str
    formula: str
    needs_reference: bool = True
    length_normalized: bool = False  # response score z = mean (not sum) token log-prob
    supports_granularity: bool = True  # a per-unit margin makes sense
    nll_weight: str | None = None  # config field holding the weight of the chosen-NLL term the link adds
    batch_level: bool = False  # fn returns one scalar for the batch (a token mean), not a (B, U) loss
    f_divergence: bool = False  # compares pairs by links.margin / links.f_rewards, so --f_divergence_type applies
    pairs_independent: bool = True  # a pair's loss does not depend on its batch mates (AOT sorts the batch)


LINKS: dict[str, LinkSpec] = {
    "sigmoid": LinkSpec(links.sigmoid, "DPO (Rafailov et al. 2023); cDPO with label_smoothing", "2305.18290",
                        "−(1−ε)·log σ(β·h) − ε·log σ(−β·h)", f_divergence=True),
    "sigmoid_norm": LinkSpec(links.sigmoid_norm, "DPO on mean token log-ratios (TRL's sigmoid_norm)", "2405.14734",
                             "−(1−ε)·log σ(β·h̄) − ε·log σ(−β·h̄), h̄ on mean token log-ratios",
                             length_normalized=True, f_divergence=True),
    "robust": LinkSpec(links.robust, "Robust DPO (Chowdhury et al. 2024)", "2403.00409",
                       "(−(1−ε)·log σ(β·h) + ε·log σ(−β·h)) / (1−2ε)", f_divergence=True),
    "hinge": LinkSpec(links.hinge, "SLiC-HF (Zhao et al. 2023)", "2305.10425", "max(0, 1 − β·h)", f_divergence=True),
    "ipo": LinkSpec(links.ipo, "IPO (Azar et al. 2023)", "2310.12036", "(h̄ − 1/(2β))², h̄ on mean token log-ratios",
                    length_normalized=True, f_divergence=True),
    "exo_pair": LinkSpec(links.exo_pair, "EXO (Ji et al. 2024)", "2402.00856",
                         "σ(βh)(log σ(βh) − log(1−ε)) + σ(−βh)(log σ(−βh) − log ε)", f_divergence=True),
    "nca_pair": LinkSpec(links.nca_pair, "NCA (Chen et al. 2024)", "2402.05369",
                         "−log σ(r_w) − ½log σ(−r_w) − ½log σ(−r_l)", supports_granularity=False),
    "bco_pair": LinkSpec(links.bco_pair, "BCO (Jung et al. 2024)", "2404.04656", "−log σ(r_w) − log σ(−r_l)",
                         supports_granularity=False),
    "sppo_hard": LinkSpec(links.sppo_hard, "SPPO, hard labels (Wu et al. 2024)", "2405.00675",
                          "(ℓ_w − 1/(2β))² + (ℓ_l + 1/(2β))²", supports_granularity=False),
    "aot": LinkSpec(links.aot, "AOT (Melnyk et al. 2024)", "2406.05882",
                    "DPO on batch-sorted policy and reference margins", supports_granularity=False,
                    pairs_independent=False),
    "aot_unpaired": LinkSpec(links.aot_unpaired, "AOT, unpaired (Melnyk et al. 2024)", "2406.05882",
                             "DPO on sorted(ℓ_w) − sorted(ℓ_l) over the batch", supports_granularity=False,
                             pairs_independent=False),
    "apo_zero": LinkSpec(links.apo_zero, "APO-zero (D'Oosterlinck et al. 2024)", "2408.06266",
                         "1 − σ(r_w) + σ(r_l)", supports_granularity=False),
    "apo_down": LinkSpec(links.apo_down, "APO-down (D'Oosterlinck et al. 2024)", "2408.06266",
                         "σ(r_w) + 1 − σ(β·h)", supports_granularity=False),
    "discopop": LinkSpec(links.discopop, "DiscoPOP (Chan Lu et al. 2024)", "2406.08414",
                         "−log σ(βh)·(1−σ(βh/τ)) + e^(−βh)·σ(βh/τ)", f_divergence=True),
    "dpop": LinkSpec(links.dpop, "DPO-Positive (Pal et al. 2024)", "2402.13228",
                     "−log σ(β·(h − λ·max(0, −ℓ_w)))"),
    "sft": LinkSpec(links.sft, "SFT / RPO's NLL term (Pang et al. 2024)", "2404.19733",
                    "−Σ log π(y_w) / Σ|y_w| over the batch's chosen tokens", needs_reference=False,
                    batch_level=True, f_divergence=True),
    "simpo": LinkSpec(links.simpo, "SimPO (Meng et al. 2024)", "2405.14734", "−log σ(β·(z̄_w − z̄_l) − γ)",
                      needs_reference=False, length_normalized=True),
    "cpo": LinkSpec(links.cpo, "CPO (Xu et al. 2024)", "2401.08417", "−log σ(β·(z_w − z_l)) + α·NLL(y_w)",
                    needs_reference=False, nll_weight="cpo_alpha"),
    "orpo": LinkSpec(links.orpo, "ORPO (Hong et al. 2024)", "2403.07691",
                     "NLL(y_w) − β·log σ(log odds(z̄_w) − log odds(z̄_l))", needs_reference=False,
                     length_normalized=True, supports_granularity=False, nll_weight="one"),
}
# h = (log π/π_ref)(y_w) − (log π/π_ref)(y_l) summed over a unit's tokens; r = β·log-ratio; ℓ = log-ratio;
# z = summed, z̄ = mean policy token log-prob.


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name, list(LINKS), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def validate_objective(cfg: ObjectiveSpec) -> None:
    """Reject an invalid objective at start-up, naming the option to change."""
    for t in cfg.loss_type:
        if t not in LINKS:
            raise ConfigError(f"--loss_type: unknown value {t!r}{_suggest(t)} Valid: {', '.join(LINKS)}")
    if not cfg.loss_type:
        raise ConfigError("--loss_type: give at least one loss type")
    if cfg.loss_weights is not None and len(cfg.loss_weights) != len(cfg.loss_type):
        raise ConfigError(f"--loss_weights: {len(cfg.loss_weights)} weights for {len(cfg.loss_type)} loss types")
    _check_bounds(cfg)
    for w in cfg.loss_weights or ():
        if not math.isfinite(w) or w < 0:
            raise ConfigError(f"--loss_weights: must be finite, non-negative numbers, got {list(cfg.loss_weights)}")
    if not 0 <= cfg.label_smoothing < 0.5:
        raise ConfigError(f"--label_smoothing: must be in [0, 0.5), got {cfg.label_smoothing}")
    if cfg.granularity not in GRANULARITIES:
        raise ConfigError(f"--granularity: must be one of {', '.join(GRANULARITIES)}, got {cfg.granularity!r}")
    if cfg.unit_reduction not in ("sum", "mean"):
        raise ConfigError(f"--unit_reduction: must be sum or mean, got {cfg.unit_reduction!r}")
    if cfg.static_padding not in ("zero", "eos"):
        raise ConfigError(f"--static_padding: must be zero or eos, got {cfg.static_padding!r}")
    _validate_trl_options(cfg)
    if cfg.granularity != "response":
        bad = [t for t in cfg.loss_type if not LINKS[t].supports_granularity]
        if bad:
            ok = [n for n, s in LINKS.items() if s.supports_granularity]
            raise ConfigError(
                f"--granularity {cfg.granularity}: loss_type {', '.join(bad)} has no per-unit margin; use "
                f"--granularity response, or a loss_type among {', '.join(ok)}"
            )


def _check_bounds(cfg: ObjectiveSpec) -> None:
    """Every numeric option declared with a range (ObjectiveSpec's ``above`` / ``at_least``): finite, in range."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value is None or not ({"above", "at_least"} & set(f.metadata)):
            continue
        if not math.isfinite(value):
            raise ConfigError(f"--{f.name}: must be a finite number, got {value}")
        if "above" in f.metadata and not value > f.metadata["above"]:
            low = f.metadata["above"]
            raise ConfigError(f"--{f.name}: must be {'positive' if low == 0 else f'above {low}'}, got {value}")
        if "at_least" in f.metadata and value < f.metadata["at_least"]:
            raise ConfigError(f"--{f.name}: must be at least {f.metadata['at_least']}, got {value}")


def _validate_trl_options(cfg: ObjectiveSpec) -> None:
    """TRL 1.16's objective options (f-DPO, LD-DPO, WPO) and the combinations whose math does not compose."""
    if cfg.f_divergence_type not in F_DIVERGENCES:
        raise ConfigError(f"--f_divergence_type: must be one of {', '.join(F_DIVERGENCES)}, got {cfg.f_divergence_type!r}")
    if cfg.f_divergence_type != "reverse_kl":
        bad = [t for t in cfg.loss_type if not LINKS[t].f_divergence]
        if bad:
            ok = [n for n, s in LINKS.items() if s.f_divergence]
            raise ConfigError(f"--f_divergence_type {cfg.f_divergence_type}: loss_type {', '.join(bad)} does not score "
                              f"pairs by f′(π/π_ref); use a loss_type among {', '.join(ok)}")
    if cfg.ld_alpha is not None:
        if not 0.0 <= cfg.ld_alpha <= 1.0:
            raise ConfigError(f"--ld_alpha: must be in [0, 1], got {cfg.ld_alpha}")
        if cfg.poet:
            raise ConfigError("--ld_alpha with --poet true: POET drops the tail that LD-DPO down-weights (POET is "
                              "--ld_alpha 0 for summed scores); pick one")
    if cfg.use_weighting:
        bad = [t for t in cfg.loss_type if not LINKS[t].pairs_independent or LINKS[t].batch_level]
        if bad:
            raise ConfigError(f"--use_weighting: WPO weights pairs, and loss_type {', '.join(bad)} does not have "
                              "independent per-pair losses; drop --use_weighting or that loss_type")


def objectives_table_markdown() -> str:
    """The docs table, generated from the registry so the two never drift."""
    lines = [
        "| loss_type | paper | formula (per feedback unit) | reference | score | granularity / POET / token weights "
        "/ RC | f-divergence / WPO | command |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in LINKS.items():
        gran = "all / yes / yes / yes" if s.supports_granularity else "response only / yes / yes / yes"
        fdiv = f"{'yes' if s.f_divergence else 'no'} / {'yes' if s.pairs_independent and not s.batch_level else 'no'}"
        extra = " --granularity adaptive --num_segments 16 --poet true" if s.supports_granularity else " --poet true"
        cmd = f"`prefkit train --model_name_or_path M --dataset_name D --loss_type {name}{extra}`"
        lines.append(
            f"| `{name}` | {s.paper}, arXiv {s.arxiv} | {s.formula} | {'yes' if s.needs_reference else 'no'} | "
            f"{'mean' if s.length_normalized else 'sum'} | {gran} | {fdiv} | {cmd} |"
        )
    return "\n".join(lines)
