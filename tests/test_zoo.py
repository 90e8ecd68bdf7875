"""The zoo: every causal-LM architecture of the installed transformers, tiny and random, in every layout prefkit
would use on it, against the plain two-row layout (TRL's).

For each architecture (tests/zoo.py builds it; one that cannot be built tiny is skipped with the reason):

- per-token chosen and rejected log-probs of every layout :func:`prefkit.layouts.resolve_layout` picks (with and
  without packing) equal the two-row layout's to 1e-5 in fp32, and so do the gradients of a DPO loss;
- a layout the decision refuses differs, on the architectures where it is refused for mixing tokens outside
  attention (so the refusals are not a blanket "no");
- packed pairs: perturbing one pair's tokens leaves the other pairs' log-probs bit-identical;
- the fused response-only head gives the model's own logits where prefkit uses it.

docs/models.md holds the generated table (architecture -> layout used -> reason); a test checks it matches the
decisions the code makes now (regenerate with ``python -m tests.zoo_table``).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers

from prefkit.accel.attention import register_segment_attention
from prefkit.config import PrefConfig
from prefkit.data.collate import PairCollator
from prefkit.data.spec import DataSpec
from prefkit.layouts import Layout, layout_support, resolve_layout
from prefkit.logprobs import _fused_parts, compute_pair_logps
from tests.zoo import causal_lm_types, pair_features, tiny_model


@functools.cache
def _data_spec() -> DataSpec:
    return DataSpec.from_config(PrefConfig(output_dir="unused"))  # the command line's data defaults


pytestmark = pytest.mark.slow
TOL = 1e-5
DOCS = Path(__file__).resolve().parent.parent / "docs" / "models.md"


@functools.cache
def _built(model_type: str):
    transformers.logging.set_verbosity_error()
    try:
        model = tiny_model(model_type)
        feats = pair_features(model.config.get_text_config().vocab_size)
        with torch.no_grad():
            plain = compute_pair_logps(model, PairCollator(pad_token_id=0)(feats))
    except Exception as e:  # an architecture that cannot be built or run tiny from its config alone
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return (model, feats, plain), None


def _model(model_type: str):
    built, why = _built(model_type)
    if built is None:
        pytest.skip(f"{model_type}: not buildable tiny from its config ({why})")
    return built


def _collate(layout: Layout, feats):
    return PairCollator.for_spec(_data_spec(), _Tok(), layout)(feats)


class _Tok:
    pad_token_id = 0
    eos_token_id = 2


def _dpo_grads(model, batch) -> tuple[object, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = compute_pair_logps(model, batch)
    margin = (out.chosen * out.chosen_mask).sum(1) - (out.rejected * out.rejected_mask).sum(1)
    (-F.logsigmoid(0.1 * margin).mean()).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out, grads


def _used_layouts(model) -> list[Layout]:
    register_segment_attention()
    return [resolve_layout(None, None, model), resolve_layout(None, False, model)]


def _restore(model) -> None:
    if model.config._attn_implementation == "prefkit_segments":
        model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("model_type", causal_lm_types())
def test_every_layout_used_equals_two_rows(model_type):
    model, feats, _ = _model(model_type)
    plain, g_plain = _dpo_grads(model, PairCollator(pad_token_id=0)(feats))
    try:
        for layout in _used_layouts(model):
            if not layout.share_prompt:
                continue
            out, g = _dpo_grads(model, _collate(layout, feats))
            what = f"{model_type}, {layout.describe()}"
            torch.testing.assert_close(out.chosen, plain.chosen, rtol=0, atol=TOL, msg=what)
            torch.testing.assert_close(out.rejected, plain.rejected, rtol=0, atol=TOL, msg=what)
            assert g.keys() == g_plain.keys(), what
            for n in g:
                torch.testing.assert_close(g[n], g_plain[n], rtol=1e-4, atol=TOL, msg=f"{what}: grad of {n}")
    finally:
        _restore(model)


@pytest.mark.parametrize("model_type", causal_lm_types())
def test_packed_pairs_do_not_see_each_other(model_type):
    model, feats, _ = _model(model_type)
    layout = _used_layouts(model)[0]
    if not layout.pack_pairs:
        pytest.skip(f"{model_type}: packed pairs not used ({layout_support(model).packed})")
    other = [dict(f) for f in feats]
    other[1] = {**other[1], **{k: [(t + 7) % 90 + 4 for t in other[1][k]]
                               for k in ("prompt_ids", "chosen_ids", "rejected_ids")}}
    try:
        with torch.no_grad():
            a = compute_pair_logps(model, _collate(layout, feats))
            b = compute_pair_logps(model, _collate(layout, other))
    finally:
        _restore(model)
    # bit for bit; a mixture of experts multiplies each expert's tokens in one matrix product whose rounding
    # follows the number of tokens routed there (1 ulp), so there the other pairs' values agree to 1e-6
    text = model.config.get_text_config()
    moe = any(getattr(text, k, None) for k in ("num_experts", "num_local_experts", "n_routed_experts"))
    for i in (0, 2):
        for x, y in ((a.chosen[i], b.chosen[i]), (a.rejected[i], b.rejected[i])):
            if moe:
                torch.testing.assert_close(x, y, rtol=0, atol=1e-6, msg=model_type)
            else:
                assert torch.equal(x, y), model_type
    assert not torch.equal(a.chosen[1], b.chosen[1])  # the perturbation reached the model


@pytest.mark.parametrize("model_type", causal_lm_types())
def test_a_refused_layout_differs_where_tokens_mix_outside_attention(model_type):
    """The refusals are measured, not assumed: where the shared prompt is refused because a layer mixes tokens
    outside attention, forcing it does change the log-probs (or fails)."""
    model, feats, plain = _model(model_type)
    reason = layout_support(model).shared
    if reason is None or not reason.startswith("its convolution") and not any(
            k in reason for k in ("conv", "mamba", "linear_attention", "recurrent")):
        pytest.skip(f"{model_type}: not refused for a layer that mixes tokens outside attention ({reason})")
    try:
        with torch.no_grad():
            forced = compute_pair_logps(model, PairCollator(pad_token_id=0, share_prompt=True)(feats))
    except Exception:
        return  # it cannot even run that way
    assert (forced.rejected - plain.rejected).abs().max() > TOL, f"{model_type}: refused ({reason}) yet exact"


@pytest.mark.parametrize("model_type", causal_lm_types())
def test_fused_head_equals_the_models_logits(model_type):
    model, feats, _ = _model(model_type)
    if _fused_parts(model) is None:
        pytest.skip(f"{model_type}: the model's own forward computes its logits")
    batch = PairCollator(pad_token_id=0)(feats)
    with torch.no_grad():
        fused = compute_pair_logps(model, batch)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits.float()
    lp = logits.log_softmax(-1)
    for i in range(batch.num_pairs * 2):
        s, n = int(batch.response_start[i]), int(batch.response_len[i])
        want = lp[i, s - 1 : s + n - 1].gather(1, batch.input_ids[i, s : s + n, None]).squeeze(1)
        got = (fused.chosen if i < batch.num_pairs else fused.rejected)[i % batch.num_pairs, :n]
        torch.testing.assert_close(got, want, rtol=0, atol=TOL, msg=model_type)


def test_enough_architectures_are_checked():
    built = [t for t in causal_lm_types() if _built(t)[0] is not None]
    assert len(built) >= 40, f"only {len(built)} architectures could be built tiny"
    fast = [t for t in built if resolve_layout(None, None, _built(t)[0][0]).share_prompt]
    assert len(fast) >= 40, f"a fast layout is used on only {len(fast)}"


def table_rows() -> list[str]:
    """docs/models.md's rows: architecture | layout used (defaults, command line) | why not a faster one."""
    register_segment_attention()
    rows = []
    for t in causal_lm_types():
        built, why = _built(t)
        if built is None:
            rows.append(f"| {t} | not checked | {re.sub(r'[|]', '/', why)} |")
            continue
        model = built[0]
        layout = resolve_layout(None, None, model)
        s = layout_support(model)
        reason = s.shared if not layout.share_prompt else s.packed if not layout.pack_pairs else ""
        window = " (window in logical positions)" if layout.window else ""
        rows.append(f"| {t} | {layout.describe()}{window} | {reason or ''} |")
        _restore(model)
    return rows


def test_the_docs_table_matches_the_decisions():
    text = DOCS.read_text()
    block = text.split("<!-- zoo table: start -->\n", 1)[1].split("<!-- zoo table: end -->", 1)[0]
    got = [ln for ln in block.splitlines() if ln.startswith("| ") and not ln.startswith("| architecture")]
    assert got == table_rows(), "docs/models.md is stale: regenerate it with python -m tests.zoo_table"


# ---- the architectures the layouts were wrong on, through the command line ------------------------------------
NAMED = ["nemotron_h", "gpt_oss", "olmo3", "cohere2", "lfm2", "mistral", "gemma2"]


def _saved(model_type: str, tmp_path: Path) -> Path:
    from tests.conftest import make_tokenizer

    path = tmp_path / model_type
    tiny_model(model_type).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def _first_losses(out: Path) -> list[float]:
    import json

    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.parametrize("model_type", NAMED)
def test_train_defaults_equal_two_rows_and_say_which_layout(model_type, tmp_path, caplog):
    """`prefkit train` with its defaults trains on the layout the decision picks (exact, or the fallback it names
    in one info line) and its losses equal the two-row run's."""
    import logging

    from prefkit.cli import main
    from tests.test_train_e2e import _train_args, write_pairs

    model = _saved(model_type, tmp_path)
    data = write_pairs(tmp_path / "p.jsonl", 12)
    extra = ["--max_steps", "2", "--save_steps", "10", "--dynamics_steps", "0", "--eval_split_size", "0"]
    with caplog.at_level(logging.INFO, logger="prefkit.layouts"):
        assert main(_train_args(model, data, tmp_path / "auto", *extra)) == 0
    support = layout_support(tiny_model(model_type))
    said = [r.getMessage() for r in caplog.records if r.name == "prefkit.layouts"]
    if support.shared is not None:
        assert said and "two rows per pair" in said[0] and support.shared in said[0]
    elif support.packed is not None:
        assert said and "shared prompt" in said[0] and support.packed in said[0]
    assert main(_train_args(model, data, tmp_path / "rows", *extra, "--share_prompt", "false")) == 0
    torch.testing.assert_close(torch.tensor(_first_losses(tmp_path / "auto")),
                               torch.tensor(_first_losses(tmp_path / "rows")), rtol=0, atol=1e-5)


def test_an_explicit_layout_that_is_not_exact_is_refused(tmp_path, capsys):
    from prefkit.cli import main
    from tests.test_train_e2e import _train_args, write_pairs

    model = _saved("nemotron_h", tmp_path)
    data = write_pairs(tmp_path / "p.jsonl", 8)
    for flag in ("--share_prompt", "--pack_pairs"):
        assert main(_train_args(model, data, tmp_path / flag.strip("-"), flag, "true")) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
        assert len(err) == 1 and err[0].startswith(f"prefkit: error: {flag} true:") and "NemotronH" in err[0], err
        assert "Traceback" not in err[0]


def _two_rows_vs_used(model, feats) -> None:
    """Every layout prefkit uses on ``model`` gives the two-row layout's per-token log-probs."""
    with torch.no_grad():
        plain = compute_pair_logps(model, PairCollator(pad_token_id=0)(feats))
        try:
            for layout in _used_layouts(model):
                out = compute_pair_logps(model, _collate(layout, feats))
                torch.testing.assert_close(out.chosen, plain.chosen, rtol=0, atol=TOL, msg=layout.describe())
                torch.testing.assert_close(out.rejected, plain.rejected, rtol=0, atol=TOL, msg=layout.describe())
        finally:
            _restore(model)


# rotary scalings: "dynamic" and "longrope" change with the longest position, which the tiny
# max_position_embeddings (16) puts inside the pairs (up to 24 positions), so both branches are reached
ROPE_SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16},
    "llama3": {"rope_type": "llama3", "factor": 2.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
    "longrope": {"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4,
                 "original_max_position_embeddings": 16},
}


@pytest.mark.parametrize("scaling", sorted(ROPE_SCALINGS))
def test_scaled_rotary_positions_equal_two_rows(scaling):
    """The rejected response gets the positions it has in two rows, under every rotary scaling: a
    length-dependent one sees the same longest position in every layout."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                         rope_parameters={"rope_theta": 10000.0, **ROPE_SCALINGS[scaling]})
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    assert resolve_layout(None, None, model).share_prompt
    _two_rows_vs_used(model, pair_features(64))


@pytest.mark.parametrize("model_type", ["gpt2", "opt", "bloom", "mpt", "gpt_neox", "phi"])
def test_non_rotary_positions_are_exact_or_refused(model_type):
    """Learned absolute positions (GPT-2, OPT), ALiBi (BLOOM, MPT) and partial rotary (GPT-NeoX, Phi): each layout
    used gives the two-row log-probs; where the decision refuses the shared prompt it says why."""
    model, feats, _ = _model(model_type)
    support = layout_support(model)
    _two_rows_vs_used(model, feats)
    if model_type in ("bloom", "mpt"):  # ALiBi's bias is not built from position_ids: never a shared prompt
        assert support.shared is not None and not resolve_layout(None, None, model).share_prompt


def test_fused_head_with_lora_on_the_head_equals_the_models_logits():
    """A LoRA adapter on lm_head: the fused path applies the adapted head, not the base weight."""
    from peft import LoraConfig, get_peft_model

    model, feats, _ = _model("llama")
    peft_model = get_peft_model(__import__("copy").deepcopy(model), LoraConfig(
        r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"], init_lora_weights=False))
    assert _fused_parts(peft_model) is not None
    batch = PairCollator(pad_token_id=0)(feats)
    with torch.no_grad():
        fused = compute_pair_logps(peft_model, batch)
        lp = peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float().log_softmax(-1)
        base = compute_pair_logps(model, batch)
    assert (fused.chosen - base.chosen).abs().max() > 1e-3  # the adapter changes the logits ...
    for i in range(batch.num_pairs * 2):
        s, n = int(batch.response_start[i]), int(batch.response_len[i])
        want = lp[i, s - 1 : s + n - 1].gather(1, batch.input_ids[i, s : s + n, None]).squeeze(1)
        got = (fused.chosen if i < batch.num_pairs else fused.rejected)[i % batch.num_pairs, :n]
        torch.testing.assert_close(got, want, rtol=0, atol=TOL)  # ... and the fused head applies it
