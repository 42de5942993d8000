"""The model against independent computations: attention, KV cache, sampling, parameter counts, FLOPs."""
import math

import pytest
import torch
import torch.nn.functional as F

from model import (GPT, GPT2_SIZES, ChunkedCrossEntropy, GPTConfig, KVCache, causal_mask,
                   configure_optimizers, decode_logits, explicit_attention, flops_per_token, generate,
                   head_blocks, sample_next_token, sdpa_attention)

TINY = GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=24, vocab_size=97)


def tiny_model(seed: int = 0, **changes) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY.__dict__, **changes})).eval()


def test_causal_mask_offsets_queries_after_cached_prefix():
    mask = causal_mask(2, 5)   # queries at absolute positions 3 and 4
    expected = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("T_q,T_k", [(7, 7), (1, 7), (3, 7)])
def test_sdpa_matches_explicit_attention(T_q, T_k):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, T_q, 8), torch.randn(2, 3, T_k, 8), torch.randn(2, 3, T_k, 8)
    # Written out independently: position T_k - T_q + i sees keys 0..T_k - T_q + i.
    scores = q @ k.transpose(-2, -1) / math.sqrt(8)
    for i in range(T_q):
        scores[..., i, T_k - T_q + i + 1:] = float("-inf")
    reference = torch.softmax(scores, dim=-1) @ v
    torch.testing.assert_close(explicit_attention(q, k, v), reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(sdpa_attention(q, k, v), reference, rtol=0, atol=1e-5)


def test_sdpa_model_matches_explicit_model():
    fast, slow = tiny_model(), tiny_model(sdpa=False)
    idx = torch.randint(0, TINY.vocab_size, (3, TINY.block_size))
    torch.testing.assert_close(fast(idx), slow(idx), rtol=0, atol=1e-5)


def test_loss_is_cross_entropy_of_logits_and_ignores_minus_one():
    model = tiny_model()
    idx = torch.randint(0, TINY.vocab_size, (2, 10))
    targets = torch.randint(0, TINY.vocab_size, (2, 10))
    targets[0, :4] = -1
    logits = model(idx)
    keep = targets != -1
    log_probs = torch.log_softmax(logits, dim=-1)[keep]                      # (N, V)
    expected = -log_probs.gather(1, targets[keep][:, None]).mean()
    torch.testing.assert_close(model(idx, targets), expected)


def test_kv_cache_matches_full_recompute():
    """Logits from feeding one token at a time through the cache equal re-running the whole prefix."""
    model = tiny_model()
    idx = torch.randint(0, TINY.vocab_size, (2, TINY.block_size))
    cache = KVCache(model.config, batch_size=2)
    cached = [model.lm_head(model.hidden_states(idx[:, :5], cache))]          # a 5-token prompt, then 1 by 1
    for t in range(5, TINY.block_size):
        cached.append(model.lm_head(model.hidden_states(idx[:, t:t + 1], cache)))
    torch.testing.assert_close(torch.cat(cached, dim=1), model(idx), rtol=0, atol=1e-5)


@pytest.mark.parametrize("vocab_size", [97, 96])   # decode_logits: 96 splits into equal blocks, 97 leaves one row
def test_greedy_generation_matches_full_recompute(vocab_size):
    model = tiny_model(vocab_size=vocab_size)
    prompt = torch.randint(0, vocab_size, (2, 4))
    tokens = torch.stack(list(generate(model, prompt, max_new_tokens=15, temperature=0)), dim=1)
    sequence = prompt
    for _ in range(15):   # the reference: no cache, the argmax of the last position of the whole sequence
        sequence = torch.cat([sequence, model(sequence)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(tokens, sequence[:, 4:])


@pytest.mark.parametrize("vocab_size,rows", [(50304, 1), (50257, 3), (96, 2), (97, 1)])
def test_decode_logits_equal_the_lm_head_in_float64(vocab_size, rows):
    """The decoding head (equal blocks of the vocabulary through one batched matmul, the odd rows left over
    through F.linear) gives each row's logits as a float64 product of the same weights does, to fp32 rounding."""
    model = tiny_model(vocab_size=vocab_size)
    x = torch.randn(rows, TINY.n_embd)
    reference = x.double() @ model.lm_head.weight.double().t()                   # (rows, V)
    with torch.inference_mode():
        logits = decode_logits(model, x)
    assert logits.shape == (rows, vocab_size) and logits.dtype == torch.float32
    torch.testing.assert_close(logits.double(), reference, rtol=0, atol=1e-5)
    assert head_blocks(x.device, x.dtype) >= 2                        # the blocked path is the one tested
    assert head_blocks(x.device, torch.bfloat16) == 1                 # bf16 keeps F.linear


def test_generation_slides_window_past_block_size():
    """Past block_size the cache restarts from the last block_size // 2 tokens; check against a recompute
    that applies the same window rule to the whole sequence."""
    model = tiny_model(seed=1)
    block = TINY.block_size
    prompt = torch.randint(0, TINY.vocab_size, (1, 6))
    tokens = torch.stack(list(generate(model, prompt, max_new_tokens=3 * block, temperature=0)), dim=1)
    sequence, start = prompt, 0     # start: index in `sequence` where the model's current window begins
    for _ in range(3 * block):
        if sequence.size(1) - start > block:
            start = sequence.size(1) - block // 2
        next_token = model(sequence[:, start:])[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, next_token], dim=1)
    assert torch.equal(tokens, sequence[:, 6:])


def test_generation_stops_at_stop_token_and_is_seeded():
    model = tiny_model()
    prompt = torch.zeros(1, 1, dtype=torch.long)
    run = lambda seed: [t.item() for t in generate(model, prompt, 40, temperature=1.0,   # noqa: E731
                                                    generator=torch.Generator().manual_seed(seed))]
    assert run(3) == run(3)
    first = run(3)
    stop = first[5]
    stopped = [t.item() for t in generate(model, prompt, 40, temperature=1.0, stop_token=stop,
                                          generator=torch.Generator().manual_seed(3))]
    assert stopped == first[:first.index(stop) + 1]


def test_top_k_and_top_p_keep_only_the_allowed_tokens():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    generator = torch.Generator().manual_seed(0)
    draw = lambda **kw: {sample_next_token(logits, generator=generator, **kw).item()   # noqa: E731
                         for _ in range(300)}
    assert draw(top_k=2) == {1, 3}
    assert draw(top_p=0.7) == {1, 3}        # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: the nucleus is {1, 3}
    assert draw(top_p=0.5) == {1}           # the best token alone already has 0.5
    assert draw(top_k=3, top_p=0.99) == {1, 2, 3}
    assert draw(temperature=0) == {1}


@pytest.mark.parametrize("top_p", [0.0, -0.5])
def test_top_p_zero_or_below_is_greedy(top_p):
    """top_p = 0 used to mask every candidate, the best one included (its probability mass before it, 0,
    is >= 0), and the draw over all-zero probabilities then returned the *least* likely of the top_k."""
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    for top_k in (None, 5):
        tokens = sample_next_token(logits, top_k=top_k, top_p=top_p, generator=torch.Generator().manual_seed(0))
        assert torch.equal(tokens, logits.argmax(dim=-1))


def test_top_p_sampling_frequencies_follow_renormalised_probabilities():
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log().expand(20_000, 4)
    tokens = sample_next_token(logits, top_p=0.7, generator=torch.Generator().manual_seed(0))
    share_of_1 = (tokens == 1).float().mean().item()
    assert abs(share_of_1 - 0.5 / 0.8) < 0.02


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, 1.0), (0.7, None, 1.0), (1.3, 4, 1.0),
                                                      (0.8, 6, 0.9), (1.0, None, 0.6)])
def test_sampling_frequencies_match_the_filtered_softmax(temperature, top_k, top_p):
    """The sampler draws among the top-k candidates by inverting their CDF; the reference here is the
    textbook recipe over the whole vocabulary: mask the filtered logits to -inf, then softmax."""
    logits = torch.randn(1, 10, generator=torch.Generator().manual_seed(1)) * 2
    scaled = logits[0] / temperature
    allowed = torch.ones(10, dtype=torch.bool)
    order = scaled.argsort(descending=True)
    if top_k is not None:
        allowed[order[top_k:]] = False
    probs = F.softmax(scaled.masked_fill(~allowed, float("-inf")), dim=-1)
    mass_before = probs[order].cumsum(0) - probs[order]
    allowed[order[mass_before >= top_p]] = False
    expected = F.softmax(scaled.masked_fill(~allowed, float("-inf")), dim=-1)
    tokens = sample_next_token(logits.expand(50_000, 10), temperature, top_k, top_p,
                               torch.Generator().manual_seed(0))
    observed = torch.bincount(tokens, minlength=10).double() / 50_000
    assert observed[~allowed].sum() == 0                                    # filtered tokens never come
    assert (observed - expected).abs().sum() / 2 < 0.01                     # total variation distance


@pytest.mark.parametrize("name,expected", [
    ("gpt2", 124_439_808), ("gpt2-medium", 354_823_168), ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)])
def test_gpt2_parameter_counts(name, expected):
    with torch.device("meta"):                # shapes only: no memory, no time
        model = GPT(GPT2_SIZES[name])
    assert model.num_params() == expected


def test_gpt2_parameter_names_match_openai_checkpoint():
    with torch.device("meta"):
        names = set(GPT(GPT2_SIZES["gpt2"]).state_dict())
    for name in ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.11.ln_1.weight",
                 "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.bias",
                 "transformer.h.0.ln_2.bias", "transformer.h.0.mlp.c_fc.weight",
                 "transformer.h.0.mlp.c_proj.weight", "transformer.ln_f.weight", "lm_head.weight"]:
        assert name in names


def test_embedding_and_head_are_tied_and_init_follows_gpt2():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=8, n_head=4, n_embd=256, block_size=64, vocab_size=4096))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert abs(model.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 1e-3
    assert abs(model.transformer.h[0].mlp.c_proj.weight.std().item() - 0.02 / math.sqrt(16)) < 5e-4
    assert model.transformer.h[0].attn.c_attn.bias.abs().max() == 0


def test_flops_per_token_for_gpt2():
    config = GPT2_SIZES["gpt2"]
    # Counted by hand: per block 12 C^2 weights (+ biases), the head V x C; the position embedding excluded.
    C, L, V = 768, 12, 50257
    per_block = 4 * C * C + 4 * C + 8 * C * C + 5 * C + 4 * C     # attention, mlp, two LayerNorms
    matmul_params = L * per_block + V * C + 2 * C                 # + tied head + ln_f
    expected = 6 * matmul_params + 12 * L * C * 1024               # 12 L H D T with H*D = C
    assert flops_per_token(config, 124_439_808, 1024) == expected


def test_weight_decay_only_on_matrices():
    model = tiny_model()
    optimizer = configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), "cpu")
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() < 2 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_gradient_reaches_every_parameter():
    model = tiny_model()
    model.train()
    idx = torch.randint(0, TINY.vocab_size, (2, 8))
    model(idx, idx).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_loss_matches_plain_cross_entropy(chunk):
    """Loss and every gradient of the chunked LM head + cross-entropy equal the plain full-logits path,
    with some targets ignored (-1) and a chunk size that does not divide B*T."""
    plain, chunked = tiny_model(), tiny_model()
    idx = torch.randint(0, TINY.vocab_size, (3, 10))
    targets = torch.randint(0, TINY.vocab_size, (3, 10))
    targets[1, :6] = -1
    plain_loss, chunked_loss = plain(idx, targets), chunked(idx, targets, loss_chunk=chunk)
    plain_loss.backward()
    chunked_loss.backward()
    torch.testing.assert_close(chunked_loss, plain_loss, rtol=0, atol=1e-6)
    for (name, p), q in zip(plain.named_parameters(), chunked.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-6, msg=name)
    with torch.no_grad():   # evaluation: no gradients are built
        torch.testing.assert_close(chunked(idx, targets, loss_chunk=chunk), plain_loss.detach(), rtol=0, atol=1e-6)


def test_chunked_loss_keeps_small_gradients_under_fp16_autocast():
    """Under fp16 autocast the chunked loss once formed d_logits / n_valid in forward and multiplied it with
    the weights in fp16: entries of softmax / n below fp16's smallest normal (6.1e-5) lost their digits or
    became 0 before GradScaler's loss scale could lift them in backward. At GPT-2's shape (8,192 rows,
    V = 50,257) the head's rows for tokens absent from the batch got no gradient at all. Here (1,024 rows,
    V = 4,096) the chunked gradient of those rows was 16% off the fp32 one; the plain path, whose
    gradient GradScaler scales before it reaches fp16, was 0.03% off. Chunked must do as well as plain."""
    N, C, V = 1024, 16, 4096
    generator = torch.Generator().manual_seed(0)
    x0, weight0 = torch.randn(N, C, generator=generator), torch.randn(V, C, generator=generator) * 0.02
    targets = torch.randint(0, V // 2, (N,), generator=generator)   # tokens V/2.. never appear
    targets[:10] = -1

    def gradients(chunked: bool, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        x, weight = x0.clone().requires_grad_(), weight0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            if chunked:
                loss = ChunkedCrossEntropy.apply(x, weight, targets, 64, True, True)
            else:
                loss = F.cross_entropy(F.linear(x, weight).float(), targets, ignore_index=-1)
        (loss * 65536.0).backward()                  # GradScaler's initial scale, as it scales the loss
        return x.grad / 65536.0, weight.grad / 65536.0

    def errors(grads: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
        """Relative L2 errors against the fp32 gradients: of x, of W, of W's rows for the absent tokens."""
        pairs = {"grad_x": (grads[0], reference[0]), "grad_W": (grads[1], reference[1]),
                 "grad_W absent": (grads[1][V // 2:], reference[1][V // 2:])}
        return {name: ((a - b).norm() / b.norm()).item() for name, (a, b) in pairs.items()}

    reference = gradients(False, torch.float32)
    plain, chunked = errors(gradients(False, torch.float16)), errors(gradients(True, torch.float16))
    for name in plain:
        assert plain[name] < 1e-3                                   # fp16's rounding of the logits
        assert chunked[name] <= 1.5 * plain[name], (name, chunked[name], plain[name])


def test_untied_head_has_its_own_weights():
    tied, untied = tiny_model(), tiny_model(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert untied.num_params() == tied.num_params() + TINY.vocab_size * TINY.n_embd


def test_activation_checkpointing_gives_the_same_gradients():
    plain, recomputed = tiny_model(), tiny_model(activation_checkpointing=True)
    plain.train(), recomputed.train()
    idx = torch.randint(0, TINY.vocab_size, (2, 12))
    plain(idx, idx).backward()
    recomputed(idx, idx).backward()
    for p, q in zip(plain.parameters(), recomputed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-6)


def test_chunked_loss_with_a_frozen_head_matches_plain_path():
    """With the head frozen (as in LoRA fine-tuning) no weight gradient is built, and the input gradient
    still equals the plain path's."""
    plain, chunked = tiny_model(), tiny_model()
    for model in (plain, chunked):
        model.lm_head.weight.requires_grad_(False)
    idx = torch.randint(0, TINY.vocab_size, (2, 9))
    plain(idx, idx).backward()
    chunked(idx, idx, loss_chunk=5).backward()
    assert chunked.lm_head.weight.grad is None
    for (name, p), q in zip(plain.named_parameters(), chunked.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-6, msg=name)


def test_vocab_limit_keeps_padded_ids_out_of_samples():
    """A vocabulary padded for speed (nanoGPT's 50,304) has ids no tokenizer maps to: never sample them."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=64)).eval()
    prompt = torch.zeros((200, 1), dtype=torch.long)
    tokens = torch.stack(list(generate(model, prompt, 6, temperature=2.0, vocab_limit=10,
                                       generator=torch.Generator().manual_seed(0))))
    assert tokens.max() < 10 and len(tokens.unique()) == 10          # every allowed id shows up, no other


@pytest.mark.slow
def test_compiled_sampling_steps_give_the_same_tokens():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=64)).eval()
    prompt = torch.randint(64, (2, 3))
    eager = [t.tolist() for t in generate(model, prompt, 10, temperature=0)]
    compiled = [t.tolist() for t in generate(model, prompt, 10, temperature=0, compile=True)]
    assert compiled == eager
