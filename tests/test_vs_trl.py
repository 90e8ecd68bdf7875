"""Side by side with TRL's DPOTrainer on the same tiny model, data and batch: loss and rewards agree (≤1e-5), in
every batch layout prefkit computes log-probs in (two rows per pair; the prompt shared, the Python API's default;
all pairs packed in one row, the command line's)."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset

from prefkit.accel.attention import register_segment_attention
from prefkit.data import PairCollator
from prefkit.logprobs import compute_pair_logps
from prefkit.objectives import ObjectiveSpec, build_objective

trl = pytest.importorskip("trl")

# completions start with a space: TRL tokenizes prompt + completion as one string
PAIRS = [
    ("the cat sat on the", " mat .", " log big red dog"),
    ("what is 2 + 2 ?", " 4", " 5 5 5"),
    ("hello", " world !", " bad answer"),
    ("a dog ran", " home quickly", " under the blue mat slowly"),
]
TRL_LOSSES = ["sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
              "apo_zero", "apo_down", "discopop", "sigmoid_norm", "aot_unpaired", "sft"]
# TRL 1.16 objective options: (loss types, DPOConfig / ObjectiveSpec options, link options)
TRL_OPTIONS = {
    "ld_alpha": (["sigmoid"], {"ld_alpha": 0.4}, {}),
    "ld_alpha_ipo": (["ipo"], {"ld_alpha": 0.4}, {}),
    "forward_kl": (["sigmoid"], {}, {"f_divergence_type": "forward_kl"}),
    "js_divergence": (["hinge"], {}, {"f_divergence_type": "js_divergence"}),
    "alpha_divergence": (["sigmoid_norm"], {}, {"f_divergence_type": "alpha_divergence",
                                                "f_alpha_divergence_coef": 0.3}),
    "wpo": (["sigmoid"], {"use_weighting": True}, {}),
    "sigmoid_sft": (["sigmoid", "sft"], {"loss_weights": [1.0, 0.5]}, {}),
}
LAYOUTS = {"two rows": {}, "shared prompt": {"share_prompt": True},
           "packed": {"share_prompt": True, "pack_pairs": True}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import make_tokenizer

    tok = make_tokenizer()
    torch.manual_seed(0)
    ref = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
    ref = ref.double()  # float64: the comparison is not at the mercy of fp32 kernel choices (SDPA backends)
    policy = copy.deepcopy(ref)
    with torch.no_grad():  # make log-ratios non-zero
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ds = Dataset.from_dict({"prompt": [p for p, _, _ in PAIRS], "chosen": [c for _, c, _ in PAIRS],
                            "rejected": [r for _, _, r in PAIRS]})
    return tok, ref, policy, ds, tmp_path_factory.mktemp("trl")


@pytest.mark.parametrize("loss_type", TRL_LOSSES)
def test_loss_equals_trl(setup, loss_type):
    eps = 0.1 if loss_type in ("robust", "exo_pair", "aot", "aot_unpaired") else 0.0
    _compare(setup, [loss_type], {}, {"label_smoothing": eps})


@pytest.mark.parametrize("name", sorted(TRL_OPTIONS))
def test_option_equals_trl(setup, name):
    loss_types, options, params = TRL_OPTIONS[name]
    _compare(setup, loss_types, options, params)


# the layout changes only how the policy log-probs are computed: summed, length-normalised and WPO (log Σp²) scores
@pytest.mark.parametrize("layout", ["shared prompt", "packed"])
@pytest.mark.parametrize("loss_types, options", [(["sigmoid"], {}), (["ipo"], {}), (["sigmoid"], {"use_weighting": True})])
def test_layouts_equal_trl(setup, layout, loss_types, options):
    register_segment_attention()  # packed rows need it; the host layer registers it for the command line
    _compare(setup, loss_types, options, {}, layout=layout)


def _compare(setup, loss_types, options, params, layout="two rows"):
    tok, ref, policy, ds, out = setup
    args = trl.DPOConfig(output_dir=str(out), loss_type=loss_types, beta=0.2, report_to="none",
                         per_device_train_batch_size=4, use_cpu=True, max_length=64, **options, **params)
    trainer = trl.DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=ds, processing_class=tok)
    feats = [trainer.train_dataset[i] for i in range(len(PAIRS))]
    trl_batch = trainer.data_collator(feats)
    policy.eval()
    trl_loss = trainer.compute_loss(trainer.model, trl_batch).item()
    metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}  # policy.eval(): no dropout

    pairs = [{"prompt_ids": f["prompt_ids"], "chosen_ids": f["chosen_ids"], "rejected_ids": f["rejected_ids"],
              "row_id": i} for i, f in enumerate(feats)]
    batch = PairCollator(pad_token_id=tok.pad_token_id)(pairs)  # two rows per pair: TRL's rows, for the reference
    with torch.no_grad():
        lp = compute_pair_logps(policy, PairCollator(pad_token_id=tok.pad_token_id, **LAYOUTS[layout])(pairs),
                                want_sq=options.get("use_weighting", False))
        # TRL's reference pass runs its fused head in float32 (≈5e-4 off an exact log-softmax on these sums), so the
        # reference log-probs are taken from TRL's own reference forward; the policy side is prefkit's.
        labels = trl_batch["input_ids"].masked_fill(trl_batch["completion_mask"] == 0, -100)
        ref_out = trainer.ref_model(input_ids=trl_batch["input_ids"], attention_mask=trl_batch["attention_mask"],
                                    labels=labels, fused_lm_head=True, use_cache=False)
    shifted = ref_out.log_probs.double()  # position p predicts token p + 1
    rows = torch.arange(batch.input_ids.shape[0])[:, None]
    cols = (batch.response_start[:, None] + torch.arange(lp.chosen.shape[1])[None, :] - 1).clamp(
        max=shifted.shape[1] - 1)
    ref_tok = shifted[rows, cols] * torch.cat([lp.chosen_mask, lp.rejected_mask])
    b = len(PAIRS)
    lp = lp.replace(ref_chosen=ref_tok[:b], ref_rejected=ref_tok[b:])
    weights = options.get("loss_weights")
    objective = build_objective(ObjectiveSpec(
        loss_type=tuple(loss_types), loss_weights=tuple(weights) if weights else None,
        beta=0.2, **params, ld_alpha=options.get("ld_alpha"),
        use_weighting=options.get("use_weighting", False)))
    out_ = objective(lp)
    assert out_.loss.item() == pytest.approx(trl_loss, rel=1e-5, abs=1e-6)
    ours = out_.stats.metrics()
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert ours[key] == pytest.approx(metrics[key], rel=1e-5, abs=1e-6), key
