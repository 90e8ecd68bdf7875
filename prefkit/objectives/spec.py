"""ObjectiveSpec: every objective option, declared once.

:class:`prefkit.config.PrefConfig` takes these fields as its objective options (same names, defaults and help:
:func:`prefkit.config.spliced_options`), the links read them by name, and the registry
(:func:`prefkit.objectives.registry.validate_objective`) checks them. A new objective option is a field here,
its use in a link and, if it limits what the link composes with, its registry row: nothing else.
Fields run in the order `prefkit train --help` shows them: the loss options, then granularity (from
``granularity`` on), then POET.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


def _opt(default, help: str, *, above: float | None = None,  # noqa: A002 - HfArgumentParser reads "help"
         at_least: float | None = None):
    """A field with its help and, for a number, its range (``above``: strictly greater; ``at_least``: >=), which
    :func:`prefkit.objectives.registry.validate_objective` checks (with finiteness) when the value is set."""
    bounds = {k: v for k, v in (("above", above), ("at_least", at_least)) if v is not None}
    return field(default=default, metadata={"help": help, **bounds})


@dataclass(frozen=True)
class ObjectiveSpec:
    # ---- loss ----------------------------------------------------------------------------------------
    beta: float = _opt(0.1, "Temperature of the implicit reward (DPO β).", above=0)
    loss_type: tuple[str, ...] = _opt(("sigmoid",), "Link loss(es); see docs/objectives.md.")
    loss_weights: tuple[float, ...] | None = _opt(None, "Weights of several loss_type.")
    label_smoothing: float = _opt(0.0, "cDPO / robust DPO / EXO / AOT ε.")
    simpo_gamma: float = _opt(0.5, "SimPO / CPO-SimPO target reward margin γ.", at_least=0)
    cpo_alpha: float = _opt(1.0, "Weight of the chosen NLL term in CPO.", at_least=0)
    rpo_alpha: float | None = _opt(None, "RPO: add rpo_alpha x chosen NLL; the same as --loss_type sigmoid sft "
                                         "--loss_weights 1 rpo_alpha (TRL 1.16's spelling).")
    ld_alpha: float | None = _opt(None, "LD-DPO: weight α in [0, 1] of the longer response's tokens past the shorter "
                                        "one's length.")
    f_divergence_type: str = _opt("reverse_kl", "f-DPO divergence: reverse_kl (DPO) | forward_kl | js_divergence | "
                                                "alpha_divergence.")
    f_alpha_divergence_coef: float = _opt(0.5, "α of --f_divergence_type alpha_divergence.")
    use_weighting: bool = _opt(False, "WPO: weight each pair's loss by its on-policy probability (detached).")
    discopop_tau: float = _opt(0.05, "DiscoPOP temperature τ.", above=0)
    dpop_lambda: float = _opt(50.0, "DPOP λ: weight of the penalty on the chosen log-ratio falling below 0.", at_least=0)
    # ---- granularity (ADPO) ----------------------------------------------------------------------------
    granularity: str = _opt("response", "ADPO feedback units: response (DPO) | static (window k) | adaptive (m "
                                        "pieces) | token.")
    window_size: int = _opt(4, "Static granularity window k (tokens).", at_least=1)
    num_segments: int = _opt(256, "Adaptive granularity pieces m per response.", at_least=1)
    unit_reduction: str = _opt("sum", "Reduce per-unit losses by sum (ADPO paper) or mean.")
    static_padding: str = _opt("zero", "Static windows: pad the shorter response with log-ratio 0 (zero) or scored "
                                       "EOS (eos).")
    use_token_weights: bool = _opt(False, "cADPO: weight tokens by dataset fields chosen_token_weights/"
                                          "rejected_token_weights.")
    # ---- POET ------------------------------------------------------------------------------------------
    poet: bool = _opt(False, "POET: truncate chosen/rejected to the shorter length.")

    @classmethod
    def from_config(cls, cfg) -> ObjectiveSpec:
        """The objective options of a PrefConfig (or any object with these attributes), by name."""
        values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)}
        values["loss_type"] = tuple(values["loss_type"])  # lists on the command line, tuples in a frozen spec
        values["loss_weights"] = tuple(values["loss_weights"]) if values["loss_weights"] else None
        return cls(**values)
