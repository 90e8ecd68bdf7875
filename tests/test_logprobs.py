"""Per-token response log-probs equal a hand-written gather over full logits, values and gradients."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from prefkit.accel.attention import register_segment_attention
from prefkit.data.types import PairBatch
from prefkit.logprobs import _TokenLogprob, compute_pair_logps


@pytest.fixture(autouse=True)
def _segment_attention_registered():
    """Packed batches need the segment attention that the host layer registers (prefkit.accel.install)."""
    register_segment_attention()


def _model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True)).eval()


def _batch() -> PairBatch:
    # pair 0: prompt [5, 6, 7], chosen [8, 9, 2], rejected [10, 2]; pair 1: prompt [11, 12], chosen [13, 2],
    # rejected [14, 15, 16, 2]; rows = chosen 0, chosen 1, rejected 0, rejected 1, right-padded with 0
    rows = [[5, 6, 7, 8, 9, 2], [11, 12, 13, 2], [5, 6, 7, 10, 2], [11, 12, 14, 15, 16, 2]]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return PairBatch(
        input_ids=ids, attention_mask=mask,
        response_start=torch.tensor([3, 2, 3, 2]), response_len=torch.tensor([3, 2, 2, 4]),
        row_ids=torch.tensor([0, 1]),
    )


def _by_hand(model: torch.nn.Module, batch: PairBatch) -> list[list[float]]:
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    out = []
    for r in range(batch.input_ids.shape[0]):
        s, n = int(batch.response_start[r]), int(batch.response_len[r])
        out.append([logp[r, p - 1, batch.input_ids[r, p]] for p in range(s, s + n)])
    return out


def test_logps_match_hand_gather_llama_and_qwen2():
    for kind in ("llama", "qwen2"):
        model, batch = _model(kind), _batch()
        lp = compute_pair_logps(model, batch)
        expected = _by_hand(model, batch)
        rows = [(lp.chosen, lp.chosen_mask, 0), (lp.chosen, lp.chosen_mask, 1),
                (lp.rejected, lp.rejected_mask, 0), (lp.rejected, lp.rejected_mask, 1)]
        for (values, mask, i), exp in zip(rows, expected):
            assert mask[i].sum().item() == len(exp)
            torch.testing.assert_close(values[i][mask[i]], torch.stack(exp), rtol=1e-5, atol=1e-5)
            assert torch.all(values[i][~mask[i]] == 0)


@pytest.mark.parametrize("chunk", [1024, 3], ids=["one-chunk", "three-chunks"])
def test_fused_head_gradients_match_autograd(monkeypatch, chunk):
    """Forward values and gradients of the fused head against plain autograd, in one chunk and in several (a
    chunk of 3 tokens over 7 rows: two full chunks and a partial one, so grad_w / grad_b accumulate)."""
    import prefkit.logprobs

    monkeypatch.setattr(prefkit.logprobs, "CHUNK_TOKENS", chunk)
    torch.manual_seed(1)
    h = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 11, (7,))
    logp = torch.log_softmax(h @ w.T + b, dim=1)
    got, sq = _TokenLogprob.apply(h, w, b, y, True)
    torch.testing.assert_close(got, logp.gather(1, y[:, None]).squeeze(1))
    torch.testing.assert_close(sq, (2 * logp).exp().sum(1).log())  # log Σ_v p_v² (WPO's weights)
    assert torch.autograd.gradcheck(lambda h, w, b: _TokenLogprob.apply(h, w, b, y), (h, w, b))


def test_policy_gradient_matches_unfused_path():
    model, batch = _model("llama"), _batch()
    lp = compute_pair_logps(model, batch)
    (lp.chosen.sum() - 0.5 * lp.rejected.sum()).backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    hand = _by_hand(model, batch)
    (sum(torch.stack(r).sum() for r in hand[:2]) - 0.5 * sum(torch.stack(r).sum() for r in hand[2:])).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(fused[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_shared_prompt_layout_equals_plain_layout():
    from prefkit.data import PairCollator

    feats = [{"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9, 2], "rejected_ids": [10, 2], "row_id": 0},
             {"prompt_ids": [11, 12], "chosen_ids": [13, 2], "rejected_ids": [14, 15, 16, 2], "row_id": 1}]
    for kind in ("llama", "qwen2"):
        model = _model(kind)
        plain = compute_pair_logps(model, PairCollator(pad_token_id=0)(feats))
        shared_batch = PairCollator(pad_token_id=0, share_prompt=True)(feats)
        assert shared_batch.input_ids.shape[0] == 2  # one row per pair
        shared = compute_pair_logps(model, shared_batch)
        torch.testing.assert_close(shared.chosen, plain.chosen, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(shared.rejected, plain.rejected, rtol=1e-5, atol=1e-5)
        assert torch.equal(shared.chosen_mask, plain.chosen_mask)


def test_packed_layout_is_one_row_without_padding():
    from prefkit.data import PairCollator
    from prefkit.data.types import PairSegments

    feats = [{"prompt_ids": [5, 6], "chosen_ids": [7, 2], "rejected_ids": [8, 9, 2], "row_id": 0},
             {"prompt_ids": [11], "chosen_ids": [12, 13, 2], "rejected_ids": [2], "row_id": 1}]
    b = PairCollator(pad_token_id=0, share_prompt=True, pack_pairs=True)(feats)
    assert b.input_ids.tolist() == [[5, 6, 7, 2, 8, 9, 2, 11, 12, 13, 2, 2]]
    # rejected restarts after its prompt; the second pair restarts at 0
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 2, 3, 4, 0, 1, 2, 3, 1]]
    assert b.segments == PairSegments(((2, 2, 3), (1, 3, 1)))
    assert b.response_start.tolist() == [2, 8, 4, 11] and b.first_pred.tolist() == [1, 7, 1, 7]
    assert b.to("cpu").segments == b.segments


def test_segment_attention_is_sdpa_without_segments_and_refuses_other_backends():
    from prefkit.errors import PrefkitError
    from prefkit.logprobs import use_segment_attention

    model, batch = _model("qwen2"), _batch()
    before = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    use_segment_attention(model)
    assert model.config._attn_implementation == "prefkit_segments"
    after = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert torch.equal(before, after)  # padded batches (generation, TRL-style scoring) are untouched
    eager = _model("llama")
    eager.set_attn_implementation("eager")
    with pytest.raises(PrefkitError, match="--pack_pairs false"):
        use_segment_attention(eager)


def test_packed_batch_without_the_host_layer_is_refused(monkeypatch):
    """Without the segment attention registered (prefkit.accel not installed) a packed batch names the fix."""
    from prefkit.data import PairCollator
    from prefkit.errors import ModelError

    monkeypatch.setattr("prefkit.logprobs.segment_attention_registered", lambda: False)
    feats = [{"prompt_ids": [5, 6], "chosen_ids": [8, 2], "rejected_ids": [9, 2], "row_id": 0}]
    model = _model("llama")
    with pytest.raises(ModelError, match=r"prefkit\.accel\.install"):
        compute_pair_logps(model, PairCollator(pad_token_id=0, share_prompt=True, pack_pairs=True)(feats))
    assert model.config._attn_implementation == "sdpa"


def test_a_sliding_window_shorter_than_a_pair_counts_logical_positions_in_every_layout(
        _segment_attention_registered):
    """Window 4, pairs of 5-9 tokens: the shared-prompt mask and the packed attention window each rejected token
    by its logical position (p + j), so both equal the two-row layout; without the window they would not."""
    from prefkit.data import PairCollator

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                                         sliding_window=4, max_window_layers=1,
                                         layer_types=["full_attention", "sliding_attention"])).eval()
    feats = [{"prompt_ids": [5, 6, 11], "chosen_ids": [7, 8, 12, 13, 2], "rejected_ids": [9, 14, 15, 2], "row_id": 0},
             {"prompt_ids": [16, 17], "chosen_ids": [18, 2], "rejected_ids": [19, 20, 21, 22, 23, 2], "row_id": 1}]
    with torch.no_grad():
        plain = compute_pair_logps(model, PairCollator(pad_token_id=0)(feats))
        mapped = PairCollator(pad_token_id=0, share_prompt=True, window=4,
                              mask_types=("full_attention", "sliding_attention"))(feats)
        assert set(mapped.attention_mask.mask_types) == {"full_attention", "sliding_attention"}
        unwindowed = compute_pair_logps(model, PairCollator(pad_token_id=0, share_prompt=True)(feats))
        for batch in (mapped, PairCollator(pad_token_id=0, share_prompt=True, pack_pairs=True)(feats)):
            out = compute_pair_logps(model, batch)
            torch.testing.assert_close(out.chosen, plain.chosen, rtol=0, atol=1e-5)
            torch.testing.assert_close(out.rejected, plain.rejected, rtol=0, atol=1e-5)
    model.set_attn_implementation("sdpa")
    assert (unwindowed.rejected - plain.rejected).abs().max() > 1e-3  # the window matters at these lengths


def test_packed_pairs_equal_one_pair_per_row_values_and_gradients():
    """All pairs in one row (segment attention, restarted positions) give the same log-probs and gradients as
    the plain two-rows-per-pair layout (GQA: 4 query heads on 2 key/value heads)."""
    from prefkit.data import PairCollator

    g = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(3, 61, (n,), generator=g).tolist()

    lens = [(2, 3, 5), (6, 4, 1), (1, 1, 2), (3, 2, 2), (4, 7, 3)]
    feats = [{"prompt_ids": ids(p), "chosen_ids": ids(c) + [2], "rejected_ids": ids(r) + [2], "row_id": i}
             for i, (p, c, r) in enumerate(lens)]
    packed_batch = PairCollator(pad_token_id=0, share_prompt=True, pack_pairs=True)(feats)
    assert packed_batch.input_ids.numel() == sum(p + c + r + 2 for p, c, r in lens)  # the point: no padding
    # --pad_to_multiple_of: the packed row (56 tokens) gets an 8-token tail that attends to nothing
    padded_batch = PairCollator(pad_token_id=0, share_prompt=True, pack_pairs=True, pad_to_multiple_of=16)(feats)
    assert padded_batch.input_ids.shape == (1, 64) and padded_batch.segments.pad == 8
    for kind in ("llama", "qwen2"):
        model = _model(kind)
        results = []
        for batch in (PairCollator(pad_token_id=0)(feats), packed_batch, padded_batch):
            model.zero_grad()
            lp = compute_pair_logps(model, batch)
            (lp.chosen.sum() - 0.3 * lp.rejected.sum()).backward()
            results.append((lp, {n: q.grad.clone() for n, q in model.named_parameters()}))
        (plain, g_plain), *others = results
        for packed, g_packed in others:
            torch.testing.assert_close(packed.chosen, plain.chosen, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(packed.rejected, plain.rejected, rtol=1e-5, atol=1e-5)
            assert torch.equal(packed.rejected_mask, plain.rejected_mask)
            for n in g_plain:
                torch.testing.assert_close(g_packed[n], g_plain[n], rtol=1e-4, atol=1e-6, msg=n)


def test_cpu_bf16_autocast_head_pads_rows_and_recomputes_under_autocast(monkeypatch):
    """Under CPU bf16 autocast the fused head pads its rows to the batch's multiple (64, dropped again) and its
    backward recomputes the logits under the same autocast, so values and gradients match plain autograd there."""
    import prefkit.logprobs
    from prefkit.logprobs import token_logprobs_and_sq

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    h = torch.randn(37, 16, requires_grad=True)
    y = torch.randint(0, 50, (37,))
    rows, apply = [], prefkit.logprobs._TokenLogprob.apply
    monkeypatch.setattr(prefkit.logprobs._TokenLogprob, "apply", lambda hh, *a: rows.append(len(hh)) or apply(hh, *a))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, sq = token_logprobs_and_sq(h, head, y, pad_to_multiple_of=64)
        assert sq is None
        assert rows == [64]
        assert fused.shape == (37,)
        g_h, g_w = torch.autograd.grad(fused.square().sum(), (h, head.weight))
        ref = torch.log_softmax(head(h).float(), dim=1).gather(1, y[:, None]).squeeze(1)
        r_h, r_w = torch.autograd.grad(ref.square().sum(), (h, head.weight))
    torch.testing.assert_close(fused, ref, rtol=1e-3, atol=1e-3)
    # the same bf16 matmuls as autograd's (an fp32 recomputation would be ~4e-3 off); the weight's gradient is
    # summed in fp32 instead (test_head_weight_gradient_is_summed_in_fp32_under_bf16_autocast)
    torch.testing.assert_close(g_h, r_h, rtol=1e-4, atol=1e-6)
    assert ((g_w - r_w).norm() / r_w.norm()).item() < 1e-2  # within autograd's own bf16 rounding of the sum


def test_segment_attention_runs_fp32_on_cpu_under_autocast(monkeypatch):
    """On CPU the per-pair attention leaves autocast (bf16 kernels are built per segment length) and returns
    sdpa's dtype: under bf16 autocast a packed forward stays within bf16 rounding of the fp32 one."""
    from prefkit.data import PairCollator

    feats = [{"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9, 2], "rejected_ids": [10, 2], "row_id": 0},
             {"prompt_ids": [11], "chosen_ids": [12, 13, 14, 2], "rejected_ids": [15, 16, 2], "row_id": 1}]
    batch = PairCollator(pad_token_id=0, share_prompt=True, pack_pairs=True, pad_to_multiple_of=8)(feats)
    model = _model("llama")
    exact = compute_pair_logps(model, batch)
    sdpa, seen = torch.nn.functional.scaled_dot_product_attention, []

    def recording(q, *a, **k):
        seen.append((q.dtype, torch.is_autocast_enabled("cpu")))
        return sdpa(q, *a, **k)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = compute_pair_logps(model, batch)
    assert seen and set(seen) == {(torch.float32, False)}
    torch.testing.assert_close(mixed.chosen, exact.chosen, rtol=0.05, atol=0.05)
    torch.testing.assert_close(mixed.rejected, exact.rejected, rtol=0.05, atol=0.05)


def _pairs_feats(lens):
    g = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(3, 61, (n,), generator=g).tolist()

    return [{"prompt_ids": ids(p), "chosen_ids": ids(c) + [2], "rejected_ids": ids(r) + [2], "row_id": i}
            for i, (p, c, r) in enumerate(lens)]


def _logps_and_grads(model, batch):
    model.zero_grad()
    lp = compute_pair_logps(model, batch)
    (lp.chosen.sum() - 0.3 * lp.rejected.sum()).backward()
    return lp, {n: q.grad.clone() for n, q in model.named_parameters()}


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("window", [None, 4], ids=["full", "window4"])
def test_every_segment_attention_path_equals_the_loop_and_two_rows(monkeypatch, kv_heads, window):
    """The one-call paths (pairs gathered into one batch, the whole row with a block-diagonal mask) give the
    per-pair loop's and the two-row layout's log-probs and gradients to 1e-5 in fp32, with and without grouped
    key/value heads, and with a sliding window shorter than the pairs (layers alternate full and windowed)."""
    from prefkit.data import PairCollator

    torch.manual_seed(0)
    common = dict(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=kv_heads, max_position_embeddings=64)
    if window is None:
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False)).eval()
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=True, sliding_window=window,
                                             max_window_layers=1,
                                             layer_types=["full_attention", "sliding_attention"])).eval()
    feats = _pairs_feats([(2, 3, 5), (6, 4, 1), (1, 1, 2), (3, 2, 2), (4, 7, 3)])
    plain, g_plain = _logps_and_grads(model, PairCollator(pad_token_id=0)(feats))
    packed = PairCollator(pad_token_id=0, share_prompt=True, pack_pairs=True, pad_to_multiple_of=16)(feats)
    assert packed.segments.pad > 0  # the row's padding tail goes through every path too
    results = {}
    for path in ("loop", "pairs", "row"):
        monkeypatch.setenv("PREFKIT_SEGMENT_ATTENTION", path)
        results[path] = _logps_and_grads(model, packed)
    for path, (lp, grads) in results.items():
        for ref, g_ref, against in ((plain, g_plain, "two rows"), (*results["loop"], "loop")):
            torch.testing.assert_close(lp.chosen, ref.chosen, rtol=0, atol=1e-5, msg=f"{path} vs {against}")
            torch.testing.assert_close(lp.rejected, ref.rejected, rtol=0, atol=1e-5, msg=f"{path} vs {against}")
            for n in g_ref:
                torch.testing.assert_close(grads[n], g_ref[n], rtol=0, atol=1e-5, msg=f"{path} vs {against}: {n}")


def test_the_cuda_form_of_a_masked_call_repeats_kv_heads_and_equals_gqa(monkeypatch):
    """On CUDA a masked sdpa call never carries enable_gqa (GQA with a mask has only the math kernel there): the
    key/value heads are repeated instead. Forced on a CPU, that form gives the same outputs and gradients."""
    import prefkit.accel.attention as attention
    from prefkit.data.types import PairSegments

    torch.manual_seed(0)
    segments = PairSegments(((2, 3, 5), (6, 4, 1), (1, 1, 2)), pad=3)
    t = sum(segments.split_sizes())
    q = torch.randn(1, 6, t, 8, requires_grad=True)
    k, v = (torch.randn(1, 2, t, 8, requires_grad=True) for _ in range(2))
    sdpa, calls = torch.nn.functional.scaled_dot_product_attention, []

    def recording(*a, **kw):
        calls.append((a[1].shape[1], kw.get("enable_gqa", False), kw.get("attn_mask") is not None))
        return sdpa(*a, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    found = []
    for on_cuda in (False, True):
        monkeypatch.setattr(attention, "repeats_kv", lambda _device, on=on_cuda: on)
        attention._CACHE.clear()
        for run in (attention._gathered, attention._one_row):
            out = run(q, k, v, segments, 0.0, None, None)
            found.append((out, torch.autograd.grad(out.sin().sum(), (q, k, v))))
    assert calls[:2] == [(2, True, True)] * 2 and calls[2:] == [(6, False, True)] * 2
    for (o, g), (o_ref, g_ref) in zip(found[2:], found[:2]):
        torch.testing.assert_close(o, o_ref, rtol=0, atol=1e-6)
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_segment_path_defaults_per_device_and_refuses_an_unknown_one(monkeypatch):
    from prefkit.accel.attention import segment_path
    from prefkit.errors import ConfigError

    monkeypatch.delenv("PREFKIT_SEGMENT_ATTENTION", raising=False)
    assert segment_path("cpu") == "loop" and segment_path("cuda") == "pairs"
    monkeypatch.setenv("PREFKIT_SEGMENT_ATTENTION", "row")
    assert segment_path("cpu") == "row"
    monkeypatch.setenv("PREFKIT_SEGMENT_ATTENTION", "flash")
    with pytest.raises(ConfigError, match="PREFKIT_SEGMENT_ATTENTION: must be one of loop, pairs, row"):
        segment_path("cuda")


def test_head_weight_gradient_is_summed_in_fp32_under_bf16_autocast():
    """Under bf16 autocast the fused head's weight gradient, summed over 3 chunks of tokens, is within 5e-4
    (relative norm) of the float64 gradient, and at least 5x closer than the per-chunk bf16 products summed
    (the head's backward before, recomputed here by hand), which were ~3e-3 off."""
    from prefkit.logprobs import CHUNK_TOKENS, token_logprobs_and_sq

    torch.manual_seed(0)
    n, hid, vocab = 3 * CHUNK_TOKENS - 72, 64, 500
    head = torch.nn.Linear(hid, vocab, bias=False)
    h = torch.randn(n, hid, requires_grad=True)
    y, w = torch.randint(0, vocab, (n,)), torch.randn(n)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = token_logprobs_and_sq(h, head, y)[0]
        (g_w,) = torch.autograd.grad((out * w).sum(), (head.weight,))
        per_chunk = torch.zeros(vocab, hid)  # the per-chunk bf16 products, as the backward summed them before
        for s in range(0, n, CHUNK_TOKENS):
            logits = torch.nn.functional.linear(h[s:s + CHUNK_TOKENS].detach(), head.weight.detach()).float()
            g = -torch.softmax(logits, dim=1)
            g[torch.arange(len(g)), y[s:s + CHUNK_TOKENS]] += 1
            g *= w[s:s + CHUNK_TOKENS, None]
            product = g.t() @ h[s:s + CHUNK_TOKENS].detach()
            assert product.dtype == torch.bfloat16
            per_chunk += product
    h64, w64 = h.detach().double(), head.weight.detach().double().requires_grad_()
    exact = torch.log_softmax(h64 @ w64.t(), dim=1).gather(1, y[:, None]).squeeze(1)
    (r_w,) = torch.autograd.grad((exact * w.double()).sum(), (w64,))

    def err(x):
        return ((x.double() - r_w).norm() / r_w.norm()).item()

    assert err(g_w) < 5e-4 and err(g_w) * 5 < err(per_chunk), (err(g_w), err(per_chunk))
