"""The architecture variants (ReZero, explicit sparse top-k attention, Macaron, RealFormer, ALiBi, RoPE), each
against a computation written out here, with the KV cache, in pipeline stages, and in a short training run."""
import cmath
import math

import pytest
import torch
import torch.nn.functional as F

from model import (GPT, Block, GPTConfig, KVCache, alibi_bias, alibi_slopes, build_stage, configure_optimizers,
                   generate, plan_stages, rope_rotate, scored_attention, sdpa_attention)
import train

SMALL = dict(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=50)
VARIANTS = {"plain": {}, "rezero": {"rezero": True}, "sparse_topk": {"sparse_topk": 3},
            "macaron": {"macaron": True}, "realformer": {"realformer": True}, "alibi": {"position": "alibi"}, "rope": {"position": "rope"},
            "all": {"rezero": True, "sparse_topk": 3, "macaron": True, "realformer": True, "position": "rope"}}


def small_model(**changes) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**SMALL, **changes})).eval()
    if model.config.rezero:   # alpha = 0 is the identity; give the branches some weight to test them
        for name, p in model.named_parameters():
            if "alpha" in name:
                p.data.fill_(0.5)
    return model


# --- ALiBi ---

def test_alibi_slopes_and_bias_for_8_heads():
    """Press et al. 2022, section 3: for 8 heads the slopes are 1/2, 1/4, ..., 1/256, and the bias on the score
    of query i for key j is -m * (i - j)."""
    slopes = [1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128, 1 / 256]
    assert alibi_slopes(8).tolist() == slopes
    T = 5
    expected = torch.tensor([[[-m * (i - j) for j in range(T)] for i in range(T)] for m in slopes])
    torch.testing.assert_close(alibi_bias(alibi_slopes(8), T, T), expected, rtol=0, atol=0)
    # The last 2 queries of 5 positions (the KV-cache case) sit at positions 3 and 4.
    torch.testing.assert_close(alibi_bias(alibi_slopes(8), 2, T), expected[:, 3:], rtol=0, atol=0)


def test_alibi_slopes_for_6_heads_interleave_the_next_power_of_two():
    """The paper's code for a non-power-of-two H: the 4-head slopes, then every other 8-head slope."""
    assert alibi_slopes(6).tolist() == [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]


def test_alibi_forward_builds_no_tensor_from_host_values(monkeypatch):
    """The slopes live on the model's device (a buffer, outside the state dict): a forward never builds them
    from Python numbers, which on a GPU is a host-to-device copy in every block of every step."""
    model = small_model(position="alibi")
    assert "alibi_slopes" not in "".join(model.state_dict())
    x = torch.randint(0, SMALL["vocab_size"], (2, 8))
    expected = model(x)[0]

    def no_host_tensors(*args, **kwargs):
        raise AssertionError("torch.tensor called in the forward")
    monkeypatch.setattr(torch, "tensor", no_host_tensors)
    torch.testing.assert_close(model(x)[0], expected, rtol=0, atol=0)


@pytest.mark.parametrize("T_q, T_k", [(6, 6), (1, 6), (3, 6)])
def test_alibi_sdpa_matches_explicit_and_a_loop(T_q, T_k):
    torch.manual_seed(0)
    H, D = 8, 4
    q, k, v = torch.randn(1, H, T_q, D), torch.randn(1, H, T_k, D), torch.randn(1, H, T_k, D)
    bias = alibi_bias(alibi_slopes(H), T_q, T_k)
    reference = torch.zeros(1, H, T_q, D)
    for h in range(H):
        m = 2 ** (-(h + 1))
        for i in range(T_q):
            pos = T_k - T_q + i
            s = torch.tensor([float(q[0, h, i] @ k[0, h, j]) / math.sqrt(D) - m * (pos - j)
                              for j in range(pos + 1)])
            reference[0, h, i] = torch.softmax(s, 0) @ v[0, h, :pos + 1]
    torch.testing.assert_close(scored_attention(q, k, v, bias=bias)[0], reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(sdpa_attention(q, k, v, bias=bias), reference, rtol=0, atol=1e-5)


# --- explicit sparse (top-k) attention ---

def test_topk_attention_on_a_hand_example():
    """D = 1, q = 1: the scores of query i are the keys 1, 3, 2, 0 it may see. With k = 2, query 2 keeps keys
    1 and 2 (scores 3 and 2) and drops key 0 (score 1); query 3 keeps the same two and drops keys 0 and 3."""
    q = torch.ones(1, 1, 4, 1)
    k = torch.tensor([1.0, 3.0, 2.0, 0.0]).view(1, 1, 4, 1)
    v = torch.tensor([10.0, 20.0, 30.0, 40.0]).view(1, 1, 4, 1)
    e = math.exp
    expected = [10.0,                                          # only itself to look at
                (e(1) * 10 + e(3) * 20) / (e(1) + e(3)),       # two keys: both kept
                (e(3) * 20 + e(2) * 30) / (e(3) + e(2)),
                (e(3) * 20 + e(2) * 30) / (e(3) + e(2))]
    out = scored_attention(q, k, v, top_k=2)[0].flatten()
    torch.testing.assert_close(out, torch.tensor(expected), rtol=1e-6, atol=1e-5)


# --- ReZero ---

def test_rezero_block_with_alpha_zero_is_the_identity():
    torch.manual_seed(0)
    block = Block(GPTConfig(**SMALL, rezero=True))
    x = torch.randn(2, 7, 32)
    assert torch.equal(block(x), x)
    assert not any("ln_" in name for name, _ in block.named_parameters())   # no LayerNorm in the block


def test_rezero_block_matches_hand_written_residuals():
    torch.manual_seed(0)
    block = Block(GPTConfig(**SMALL, rezero=True))
    block.alpha_attn.data.fill_(0.3)
    block.alpha_mlp.data.fill_(-0.7)
    x = torch.randn(2, 7, 32)
    h = x + 0.3 * block.attn.c_proj(causal_attention_by_hand(block.attn.c_attn(x), 4))
    h = h + -0.7 * block.mlp.c_proj(F.gelu(block.mlp.c_fc(h), approximate="tanh"))
    torch.testing.assert_close(block(x), h, rtol=0, atol=1e-5)


def causal_attention_by_hand(qkv: torch.Tensor, H: int, prev_scores=None):
    """Multi-head causal attention from the c_attn output (B, T, 3C), written out; returns (B, T, C) and,
    when prev_scores is given, the scores with prev_scores added (RealFormer)."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    D = C // H
    q, k, v = (t.reshape(B, T, H, D).permute(0, 2, 1, 3) for t in qkv.split(C, dim=-1))
    scores = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(D)
    if prev_scores is not None:
        scores = scores + prev_scores
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    weights = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    y = torch.einsum("bhij,bhjd->bhid", weights, v).permute(0, 2, 1, 3).reshape(B, T, C)
    return y if prev_scores is None else (y, scores)


# --- Macaron ---

def test_macaron_block_matches_hand_written_sandwich():
    """Lu et al. 2019: x + 1/2 FFN(x), then attention, then x + 1/2 FFN(x) (pre-LN here)."""
    torch.manual_seed(0)
    block = Block(GPTConfig(**SMALL, macaron=True))
    x = torch.randn(2, 7, 32)
    ffn = lambda mlp, t: mlp.c_proj(F.gelu(mlp.c_fc(t), approximate="tanh"))   # noqa: E731
    h = x + 0.5 * ffn(block.mlp_0, F.layer_norm(x, (32,), block.ln_0.weight, block.ln_0.bias))
    h = h + block.attn.c_proj(causal_attention_by_hand(block.attn.c_attn(
        F.layer_norm(h, (32,), block.ln_1.weight, block.ln_1.bias)), 4))
    h = h + 0.5 * ffn(block.mlp, F.layer_norm(h, (32,), block.ln_2.weight, block.ln_2.bias))
    torch.testing.assert_close(block(x), h, rtol=0, atol=1e-5)


# --- RealFormer ---

def test_realformer_matches_hand_written_residual_attention():
    """He et al. 2020: block l's pre-softmax scores are its own QK^T/sqrt(D) plus block l-1's scores."""
    model = small_model(realformer=True)
    idx = torch.randint(0, 50, (2, 9))
    x = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(9))
    scores = torch.zeros(2, 4, 9, 9)
    for block in model.transformer.h:
        y, scores = causal_attention_by_hand(block.attn.c_attn(block.ln_1(x)), 4, scores)
        x = x + block.attn.c_proj(y)
        x = x + block.mlp(block.ln_2(x))
    torch.testing.assert_close(model.hidden_states(idx), model.transformer.ln_f(x), rtol=0, atol=1e-5)


def test_realformer_refuses_pipeline_stages():
    cfg = train.TrainConfig(pp=2, batch_size=4)
    with pytest.raises(SystemExit, match="realformer"):
        train.check_config(cfg, GPTConfig(**SMALL, realformer=True))


# --- RoPE ---

def test_rope_matches_the_complex_number_formula():
    """Su et al. 2021, eq. 34: pair (x_2i, x_2i+1) read as the complex number x_2i + i x_2i+1 is multiplied
    by e^(i p theta_i), theta_i = 10000^(-2i/D)."""
    torch.manual_seed(0)
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64)
    positions = torch.tensor([0, 1, 2, 7, 100])
    out = rope_rotate(x, positions)
    for h in range(2):
        for t, p in enumerate(positions.tolist()):
            for i in range(3):
                z = complex(x[0, h, t, 2 * i], x[0, h, t, 2 * i + 1]) * cmath.exp(1j * p * 10000 ** (-2 * i / 6))
                assert abs(complex(out[0, h, t, 2 * i], out[0, h, t, 2 * i + 1]) - z) < 1e-9


def test_rope_scores_depend_only_on_the_offset():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    def score(pq: int, pk: int) -> float:
        return float(rope_rotate(q, torch.tensor([pq])) @ rope_rotate(k, torch.tensor([pk])).mT)

    assert score(5, 2) == pytest.approx(score(13, 10), abs=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-3)


# --- every variant: fast path, KV cache, stages, training ---

# Top-k and RealFormer need the score matrix, so both sdpa settings run the same scored attention: these
# variants are checked against the model written out below instead of against the other setting.
SCORED = [v for v in VARIANTS if VARIANTS[v].get("sparse_topk") or VARIANTS[v].get("realformer")]


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v not in SCORED])
def test_sdpa_and_explicit_paths_agree(variant):
    fast = small_model(**VARIANTS[variant])
    slow = small_model(**VARIANTS[variant], sdpa=False)
    idx = torch.randint(0, 50, (2, 16))
    torch.testing.assert_close(fast(idx), slow(idx), rtol=0, atol=1e-5)


def rope_by_complex_numbers(x: torch.Tensor) -> torch.Tensor:
    """Su et al. 2021, eq. 34 on (B, H, T, D): pair (x_2i, x_2i+1) at position p, read as a complex number,
    times e^(i p theta_i), theta_i = 10000^(-2i/D)."""
    T, D = x.size(-2), x.size(-1)
    theta = 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    turn = torch.polar(torch.ones(T, D // 2, dtype=torch.float64), torch.arange(T)[:, None] * theta)
    pairs = torch.view_as_complex(x.double().reshape(*x.shape[:-1], D // 2, 2).contiguous())
    return torch.view_as_real(pairs * turn).flatten(-2).to(x.dtype)


def keep_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Causally masked scores (B, H, T, T) where query i keeps, among keys j <= i, only the scores that fewer
    than k visible scores beat (its k largest; a tie with the k-th stays); the rest become -inf."""
    T = scores.size(-1)
    visible = torch.ones(T, T, dtype=torch.bool).tril()                           # key j <= query i
    masked = scores.masked_fill(~visible, float("-inf"))
    if k == 0:
        return masked
    beaten_by = (masked[..., None, :] > masked[..., :, None]).sum(-1)             # (B, H, T, T): for each j
    return masked.masked_fill(beaten_by >= k, float("-inf"))


def scored_model_by_hand(model: GPT, idx: torch.Tensor, top_k: int | None = None) -> torch.Tensor:
    """Logits (B, T, V) of a learned- or RoPE-position model with any of ReZero, Macaron, top-k and RealFormer,
    from its weights, written out: block l's scores are its QK^T/sqrt(D) plus block l-1's (RealFormer, eq. 3),
    top-k picks from that sum, and the sum is what block l+1 receives. top_k overrides the config's."""
    c = model.config
    top_k = c.sparse_topk if top_k is None else top_k
    B, T = idx.shape
    H, C = c.n_head, c.n_embd
    D = C // H
    def norm(ln, t):
        return t if c.rezero else F.layer_norm(t, (C,), ln.weight, ln.bias)
    def ffn(mlp, t):
        return mlp.c_proj(F.gelu(mlp.c_fc(t), approximate="tanh"))
    def alpha(block, name):
        return getattr(block, f"alpha_{name}") if c.rezero else 1.0
    x = model.transformer.wte(idx)
    if c.position == "learned":
        x = x + model.transformer.wpe(torch.arange(T))
    carried = torch.zeros(B, H, T, T)
    for block in model.transformer.h:
        if c.macaron:
            x = x + alpha(block, "mlp_0") * 0.5 * ffn(block.mlp_0, norm(block.ln_0, x))
        qkv = block.attn.c_attn(norm(block.ln_1, x))                                      # (B, T, 3C)
        q, k, v = (t.reshape(B, T, H, D).transpose(1, 2) for t in qkv.split(C, -1))        # (B, H, T, D)
        if c.position == "rope":
            q, k = rope_by_complex_numbers(q), rope_by_complex_numbers(k)
        scores = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(D)
        if c.realformer:
            scores = scores + carried
            carried = scores
        weights = torch.softmax(keep_top_k(scores, top_k), dim=-1)
        y = torch.einsum("bhij,bhjd->bhid", weights, v).transpose(1, 2).reshape(B, T, C)
        x = x + alpha(block, "attn") * block.attn.c_proj(y)
        x = x + alpha(block, "mlp") * (0.5 if c.macaron else 1.0) * ffn(block.mlp, norm(block.ln_2, x))
    return model.lm_head(F.layer_norm(x, (C,), model.transformer.ln_f.weight, model.transformer.ln_f.bias))


def test_keep_top_k_on_a_hand_example():
    """The reference's own top-k: query 3 sees scores 1, 3, 3, 0; with k = 2 it keeps both 3s (beaten by
    none), with k = 3 it also keeps the 1 (beaten by two); query 0 keeps its only key whatever k is."""
    scores = torch.tensor([1.0, 3.0, 3.0, 0.0]).expand(1, 1, 4, 4)
    inf = float("-inf")
    assert keep_top_k(scores, 2)[0, 0, 3].tolist() == [inf, 3.0, 3.0, inf]
    assert keep_top_k(scores, 3)[0, 0, 3].tolist() == [1.0, 3.0, 3.0, inf]
    assert keep_top_k(scores, 2)[0, 0, 0].tolist() == [1.0, inf, inf, inf]


@pytest.mark.parametrize("variant", SCORED)
def test_scored_variants_match_the_model_written_out(variant):
    """Top-k (k = 3 of up to 16 keys) and RealFormer, alone and with every other variant, on both sdpa
    settings, against scored_model_by_hand, in three blocks (so that one block receives scores that are
    already a sum). The attention weights are scaled up from GPT-2's small init so that the scores are O(1)
    and top-k visibly changes the logits at this length: the check bites."""
    idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    for sdpa in (True, False):
        model = small_model(**VARIANTS[variant], sdpa=sdpa, n_layer=3)   # block 2 gets the sum of two
        with torch.no_grad():
            for block in model.transformer.h:
                block.attn.c_attn.weight.mul_(4)
                block.attn.c_proj.weight.mul_(4)
            expected = scored_model_by_hand(model, idx)
            torch.testing.assert_close(model(idx), expected, rtol=0, atol=1e-5)
            if model.config.sparse_topk:
                assert (scored_model_by_hand(model, idx, top_k=0) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kv_cache_matches_full_recompute_for_every_variant(variant):
    model = small_model(**VARIANTS[variant])
    idx = torch.randint(0, 50, (2, 16))
    cache = KVCache(model.config, batch_size=2)
    cached = [model.lm_head(model.hidden_states(idx[:, :5], cache))]
    for t in range(5, 16):
        cached.append(model.lm_head(model.hidden_states(idx[:, t:t + 1], cache)))
    torch.testing.assert_close(torch.cat(cached, dim=1), model(idx), rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", ["alibi", "rope"])
def test_greedy_generation_matches_full_recompute(variant):
    model = small_model(**VARIANTS[variant])
    prompt = torch.randint(0, 50, (2, 4))
    tokens = torch.stack(list(generate(model, prompt, max_new_tokens=10, temperature=0)), dim=1)
    sequence = prompt
    for _ in range(10):
        sequence = torch.cat([sequence, model(sequence)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(tokens, sequence[:, 4:])


def test_alibi_generates_past_block_size_like_a_full_recompute():
    """ALiBi has no position table, so the cache keeps every token: 30 new tokens after a 10-token prompt
    with block_size 16 equal the argmax of the whole 40-token sequence recomputed at each step."""
    model = small_model(position="alibi")
    prompt = torch.randint(0, 50, (1, 10))
    tokens = torch.stack(list(generate(model, prompt, max_new_tokens=30, temperature=0)), dim=1)
    sequence = prompt
    for _ in range(30):
        sequence = torch.cat([sequence, model(sequence)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert sequence.size(1) > model.config.block_size
    assert torch.equal(tokens, sequence[:, 10:])


@pytest.mark.parametrize("variant", [v for v in VARIANTS if not VARIANTS[v].get("realformer")])
def test_chained_stages_compute_the_whole_model(variant):
    model = small_model(**{**VARIANTS[variant], "n_layer": 4})
    plan = plan_stages(model.config, 3, "params")
    stages = [build_stage(model.config, plan, s, model.state_dict()).eval() for s in range(3)]
    idx = torch.randint(0, 50, (2, 16))
    x = idx
    for stage in stages:
        x = stage(x)
    torch.testing.assert_close(x, model(idx), rtol=0, atol=0)
    assert sorted(n for stage in stages for n in stage.state_dict()) == sorted(model.state_dict())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_short_training_run_lowers_the_loss(variant):
    """40 AdamW steps on a repeating 8-token pattern: any working model learns it."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**SMALL, **VARIANTS[variant]})).train()
    optimizer = configure_optimizers(model, 0.0, 3e-3, (0.9, 0.95), "cpu")
    pattern = torch.randint(0, 50, (8,))
    data = pattern.repeat(8)
    losses = []
    for step in range(40):
        starts = torch.randint(0, len(data) - 17, (8,))
        x = torch.stack([data[s:s + 16] for s in starts])
        y = torch.stack([data[s + 1:s + 17] for s in starts])
        loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
