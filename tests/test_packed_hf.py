"""Packed (padding-free) batches through a Hugging Face model: pack_batch / pack_preference_batch, the packed
policy_logps / policy_dpo_loss against the padded ones, and the refusals that keep tokens from attending across
packed sequences."""

import pytest
import torch

pytest.importorskip("transformers")

import fastdpo  # noqa: E402
from fastdpo.integrations.hf import pack_batch, pack_preference_batch, unpack_pairs  # noqa: E402
from trl_utils import tiny_llama  # noqa: E402


def _preference_batch(seed, *, left=False, B=3, T=11, V=64):
    """A TRL-1.x-style collated batch (input_ids, attention_mask, completion_mask), rows [0, B) chosen, [B, 2B)
    rejected, random lengths including a 1-token row, right (or left) padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (2 * B, T), generator=g)
    lengths = torch.randint(4, T + 1, (2 * B,), generator=g)
    lengths[1] = 1
    # a pair shares its prompt, of >= 1 token as TRL's (the 1-token row is then all prompt: an empty completion)
    prompt = torch.randint(1, 4, (B,), generator=g).repeat(2).minimum(lengths)
    pos = torch.arange(T)[None]
    if left:
        start = T - lengths
        attn = (pos >= start[:, None]).long()
        comp = (pos >= (start + prompt)[:, None]).long() * attn
    else:
        attn = (pos < lengths[:, None]).long()
        comp = ((pos >= prompt[:, None]) & (pos < lengths[:, None])).long()
    ids = ids.masked_fill(attn == 0, 0)
    return {"input_ids": ids, "attention_mask": attn, "completion_mask": comp}


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads_close(a, b):
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-4, atol=2e-5 * max(1.0, b[n].abs().max().item()),
                                   msg=lambda m, n=n: f"{n}: {m}")


def test_pack_batch_layout():
    batch = _preference_batch(0)
    packed = pack_preference_batch(batch)
    attn = batch["attention_mask"]
    lengths = attn.sum(1)
    assert packed.cu_seqlens.tolist() == [0, *lengths.cumsum(0).tolist()]
    assert packed.cu_seqlens.dtype == torch.int32 and packed.max_seqlen == int(lengths.max())
    assert packed.input_ids.shape == (1, int(lengths.sum()))
    assert torch.equal(packed.input_ids[0], batch["input_ids"][attn.bool()])
    expected_pos = torch.cat([torch.arange(int(n)) for n in lengths])
    assert torch.equal(packed.position_ids[0], expected_pos)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    assert torch.equal(packed.labels[0], labels[attn.bool()])
    # unpack is the inverse at every real token, ``fill`` elsewhere
    back = packed.unpack(packed.input_ids[0], fill=-1)
    assert torch.equal(back[attn.bool()], batch["input_ids"][attn.bool()]) and (back[attn == 0] == -1).all()
    chosen, rejected = unpack_pairs(packed, packed.labels, per_token=True)
    assert torch.equal(torch.cat([chosen, rejected])[attn.bool()], labels[attn.bool()])
    seq = torch.arange(6.0)
    assert all(torch.equal(x, y) for x, y in zip(unpack_pairs(packed, seq, per_token=False), seq.chunk(2)))
    # shift_labels: the next token's label within the same sequence, -100 at each sequence's last token
    shifted = packed.shift_labels()[0]
    padded_shift = torch.cat([labels[:, 1:], torch.full((6, 1), -100)], 1).masked_fill(attn == 0, -100)
    assert torch.equal(shifted, padded_shift[attn.bool()])


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
@pytest.mark.parametrize("left", [False, True])
def test_policy_logps_packed_equals_padded(backend, attn_impl, left):
    model = tiny_llama(64, seed=1)
    model.config._attn_implementation = attn_impl
    batch = _preference_batch(1, left=left)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    padded = fastdpo.policy_logps(model, batch["input_ids"], batch["attention_mask"], labels,
                                  return_token_logps=True)
    padded.logps.sum().backward()
    g_padded = _grads(model)
    model.zero_grad()
    packed = pack_preference_batch(batch)
    out = fastdpo.policy_logps(model, **packed.model_inputs(), return_token_logps=True)
    out.logps.sum().backward()
    torch.testing.assert_close(out.logps, padded.logps, rtol=1e-5, atol=1e-4)
    assert torch.equal(out.num_tokens, padded.num_tokens)
    # per-token outputs sit at their label's position in both layouts
    torch.testing.assert_close(packed.unpack(out.token_logps), padded.token_logps, rtol=1e-5, atol=1e-4)
    _assert_grads_close(_grads(model), g_padded)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_policy_dpo_loss_packed_equals_padded(backend, loss_type):
    model = tiny_llama(64, seed=2)
    batch = _preference_batch(2)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    ref_c, ref_r = -torch.rand(3) * 20, -torch.rand(3) * 20
    padded = fastdpo.policy_dpo_loss(model, batch["input_ids"], batch["attention_mask"], labels, ref_c, ref_r,
                                     beta=0.1, loss_type=loss_type)
    padded.loss.backward()
    g_padded = _grads(model)
    model.zero_grad()
    packed = pack_preference_batch(batch)
    out = fastdpo.policy_dpo_loss(model, **packed.model_inputs(), ref_chosen_logps=ref_c, ref_rejected_logps=ref_r,
                                  beta=0.1, loss_type=loss_type)
    out.loss.backward()
    torch.testing.assert_close(out.loss, padded.loss, rtol=1e-5, atol=1e-6)
    for name in ("chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards"):
        torch.testing.assert_close(getattr(out, name), getattr(padded, name), rtol=1e-5, atol=1e-4)
    _assert_grads_close(_grads(model), g_padded)


def test_packed_forward_needs_the_helpers_rules():
    """What the refusals guard: a packed row run with an all-ones attention mask, or without restarting
    position_ids, attends across sequences (its logits differ from the separate runs); the helper's way matches."""
    model = tiny_llama(64, seed=3)
    batch = _preference_batch(3, B=2)
    packed = pack_batch(batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        separate = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        separate = separate[batch["attention_mask"].bool()]
        right = model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False).logits[0]
        masked = model(input_ids=packed.input_ids, attention_mask=torch.ones_like(packed.input_ids),
                       position_ids=packed.position_ids, use_cache=False).logits[0]
        no_pos = model(input_ids=packed.input_ids, use_cache=False).logits[0]
    torch.testing.assert_close(right, separate, rtol=1e-4, atol=1e-4)
    assert (masked - separate).abs().max() > 1e-2 and (no_pos - separate).abs().max() > 1e-2


def test_packed_refusals():
    model = tiny_llama(64, seed=4)
    batch = _preference_batch(4)
    packed = pack_preference_batch(batch)
    inputs = packed.model_inputs()
    with pytest.raises(ValueError, match="attention_mask"):
        fastdpo.policy_logps(model, **{**inputs, "attention_mask": torch.ones_like(packed.input_ids)})
    with pytest.raises(ValueError, match="attention_mask"):
        fastdpo.policy_dpo_loss(model, **{**inputs, "attention_mask": torch.ones_like(packed.input_ids)},
                                ref_chosen_logps=torch.zeros(3), ref_rejected_logps=torch.zeros(3))
    with pytest.raises(ValueError, match="input_ids"):
        fastdpo.policy_logps(model, batch["input_ids"], None, batch["input_ids"], cu_seqlens=packed.cu_seqlens)
    with pytest.raises(ValueError, match="cu_seqlens"):
        fastdpo.policy_logps(model, **{**inputs, "cu_seqlens": packed.cu_seqlens.float()})
    with pytest.raises(ValueError, match="cu_seqlens"):  # the op's own checks: last offset != token count
        fastdpo.policy_logps(model, **{**inputs, "cu_seqlens": packed.cu_seqlens[:-1]})
    with pytest.raises(ValueError, match="attention_mask"):
        gappy = batch["attention_mask"].clone()
        gappy[0, 1] = 0
        pack_batch(batch["input_ids"], gappy)
    with pytest.raises(ValueError, match="attention_mask"):
        pack_batch(batch["input_ids"], batch["attention_mask"][:, :-1])
    with pytest.raises(ValueError, match="labels"):
        pack_batch(batch["input_ids"], batch["attention_mask"], batch["input_ids"][:, :-1])
    with pytest.raises(ValueError, match="completion_mask"):
        pack_preference_batch({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
    with pytest.raises(ValueError, match="input_ids"):
        pack_preference_batch({k: v[:5] for k, v in batch.items()})
    with pytest.raises(ValueError, match="values"):
        packed.unpack(torch.zeros(4))
    with pytest.raises(ValueError, match="values"):
        unpack_pairs(packed, torch.zeros(4), per_token=False)
    with pytest.raises(TypeError, match="per_token"):
        unpack_pairs(packed, torch.zeros(6), per_token=None)
    with pytest.raises(ValueError, match="no real token"):
        pack_batch(batch["input_ids"], torch.zeros_like(batch["attention_mask"]))


@pytest.mark.parametrize("lengths", [[2, 0], [1, 1, 1, 1]])
def test_unpack_when_tokens_equal_sequences(lengths):
    """As many tokens as sequences: per-token values still unpack to the padded layout (not read as one value
    per sequence), and TRL's shift stays per sequence."""
    T = 3
    attn = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
    ids = torch.arange(1, 1 + len(lengths) * T).view(-1, T)
    packed = pack_batch(ids, attn, ids)
    assert packed.num_tokens == len(lengths)
    back = packed.unpack(packed.input_ids, fill=-1)
    assert back.shape == (len(lengths), T) and torch.equal(back[attn.bool()], ids[attn.bool()])
    chosen, rejected = unpack_pairs(packed, packed.input_ids, per_token=True)
    assert chosen.shape == rejected.shape == (len(lengths) // 2, T)
    assert packed.shift_labels()[0].tolist() == ([2, -100] if lengths == [2, 0] else [-100] * 4)


def test_custom_attention_without_mask_function_refused():
    """An attention implementation registered without a mask function gets no mask at all: a packed row would
    attend across its sequences. Refused before the model runs."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register("unmasked_sdpa", sdpa_attention_forward)
    model = tiny_llama(64, seed=6)
    model.config._attn_implementation = "unmasked_sdpa"
    packed = pack_preference_batch(_preference_batch(6))
    with pytest.raises(ValueError, match="attn_implementation 'unmasked_sdpa'"):
        fastdpo.policy_logps(model, **packed.model_inputs())


def _hybrid(kind):
    torch.manual_seed(0)
    if kind == "lfm2":
        from transformers import Lfm2Config, Lfm2ForCausalLM
        return Lfm2ForCausalLM(Lfm2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2,
                                          layer_types=["conv", "full_attention"], max_position_embeddings=64))
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig
    return Qwen3_5ForCausalLM(Qwen3_5TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, layer_types=["linear_attention", "full_attention"],
        linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
        max_position_embeddings=64))


@pytest.mark.parametrize("kind", ["lfm2", "qwen3_5"])
def test_models_mixing_tokens_outside_attention_refused(kind):
    """Convolution and linear-attention layers read straight across a packed row (position ids only reach the
    attention mask): LFM2's short convolutions and Qwen3.5's Gated DeltaNet gave other log-probs packed than
    padded, silently. Refused; the padded call still works."""
    model = _hybrid(kind).float()
    batch = _preference_batch(7, B=1, T=8)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    assert torch.isfinite(fastdpo.policy_logps(model, batch["input_ids"], batch["attention_mask"], labels).logps).all()
    packed = pack_preference_batch(batch)
    with pytest.raises(ValueError, match="mixes tokens outside attention"):
        fastdpo.policy_logps(model, **packed.model_inputs())


def test_checkout_detection(tmp_path):
    """The shadowing fix acts only in a source checkout: in an installed wheel, site-packages/kernels is Hugging
    Face's package and fastdpo's parent directory is site-packages."""
    import pathlib

    from fastdpo._checkout import is_checkout

    assert is_checkout(pathlib.Path(fastdpo.__file__).resolve().parent.parent)
    site = tmp_path / "site"
    (site / "fastdpo").mkdir(parents=True)
    (site / "kernels").mkdir()
    (site / "fastdpo" / "_checkout.py").write_text("")
    (site / "kernels" / "__init__.py").write_text("")
    assert not is_checkout(site)


def test_flash_attention_gets_varlen_offsets(monkeypatch):
    """Under a flash-attention implementation the packed forward passes flash-attention's varlen offsets
    (cu_seq_lens_q/k, max_length_q/k) with the restarting position_ids; a recording attention function stands in
    for flash-attention (not installed on CPU) and computes sdpa's result per sequence."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    seen = []

    def probe(module, query, key, value, attention_mask, **kwargs):
        seen.append({k: kwargs.get(k) for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k",
                                                 "position_ids")})
        cu = kwargs["cu_seq_lens_q"].tolist()
        outs = []
        for a, b in zip(cu[:-1], cu[1:]):
            o, _ = sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None,
                                          is_causal=True, **{k: v for k, v in kwargs.items() if k == "scaling"})
            outs.append(o)
        return torch.cat(outs, dim=1), None

    AttentionInterface.register("flash_probe", probe)
    monkeypatch.setitem(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, "flash_probe", flash_attention_mask)
    model = tiny_llama(64, seed=5)
    batch = _preference_batch(5)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    padded = fastdpo.policy_logps(model, batch["input_ids"], batch["attention_mask"], labels)
    model.config._attn_implementation = "flash_probe"
    packed = pack_preference_batch(batch)
    out = fastdpo.policy_logps(model, **packed.model_inputs())
    assert seen and all(torch.equal(s["cu_seq_lens_q"], packed.cu_seqlens) for s in seen)
    assert all(s["max_length_q"] == s["max_length_k"] == packed.max_seqlen for s in seen)
    torch.testing.assert_close(out.logps, padded.logps, rtol=1e-5, atol=1e-4)


def test_sdpa_attends_per_sequence(monkeypatch):
    """Under sdpa the packed forward runs attention one sequence at a time (sdpa's causal kernels on each
    sequence's own tokens, no mask): the work of the real tokens, not the packed row's total^2 under a dense mask."""
    import torch.nn.functional as F

    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, *args, **kwargs):
        calls.append((q.shape[2], attn_mask is None, kwargs.get("is_causal")))
        return sdpa(q, k, v, attn_mask, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = tiny_llama(64, seed=8)
    batch = _preference_batch(8)
    packed = pack_preference_batch(batch)
    fastdpo.policy_logps(model, **packed.model_inputs())
    lengths = batch["attention_mask"].sum(1).tolist()
    layers = model.config.num_hidden_layers
    assert sorted(q for q, _, _ in calls) == sorted([n for n in lengths if n > 0] * layers)
    assert all(no_mask for _, no_mask, _ in calls)


def test_packed_under_gradient_checkpointing(backend):
    """Gradient checkpointing recomputes each layer in backward, outside the helper's call: the per-sequence
    boundaries travel with the layer's arguments, so the recompute attends per sequence too."""
    model = tiny_llama(64, seed=9)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    batch = _preference_batch(9)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    padded = fastdpo.policy_logps(model, batch["input_ids"], batch["attention_mask"], labels)
    padded.logps.sum().backward()
    g_padded = _grads(model)
    model.zero_grad()
    out = fastdpo.policy_logps(model, **pack_preference_batch(batch).model_inputs())
    out.logps.sum().backward()
    torch.testing.assert_close(out.logps, padded.logps, rtol=1e-5, atol=1e-4)
    _assert_grads_close(_grads(model), g_padded)


def test_sliding_window_packed_equals_padded():
    """A sliding-window model (Mistral, window 4 < the sequences) keeps transformers' mask under sdpa: the
    per-sequence path steps aside for layers it cannot reproduce."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, sliding_window=4,
                                             max_position_embeddings=64)).float()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    batch = _preference_batch(10)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    padded = fastdpo.policy_logps(model, batch["input_ids"], batch["attention_mask"], labels)
    out = fastdpo.policy_logps(model, **pack_preference_batch(batch).model_inputs())
    torch.testing.assert_close(out.logps, padded.logps, rtol=1e-5, atol=1e-4)


def _sdpa_mask_spy(monkeypatch):
    import torch.nn.functional as F

    masks = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, *args, **kwargs):
        masks.append(attn_mask is not None)
        return sdpa(q, k, v, attn_mask, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return masks


def test_mask_only_attention_keeps_transformers_mask(monkeypatch):
    """Llama4's chunked attention lives only in its mask (no kwarg reaches the attention call): attending per
    sequence gave other logits (0.62 apart). Families outside the verified list keep transformers' masked sdpa."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    torch.manual_seed(0)
    model = Llama4ForCausalLM(Llama4TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, intermediate_size_mlp=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, attention_chunk_size=4, num_local_experts=2,
        max_position_embeddings=64)).float()
    model.config._attn_implementation = "sdpa"
    batch = _preference_batch(11)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    padded = fastdpo.policy_logps(model, batch["input_ids"], batch["attention_mask"], labels)
    masks = _sdpa_mask_spy(monkeypatch)
    out = fastdpo.policy_logps(model, **pack_preference_batch(batch).model_inputs())
    assert masks and all(masks)
    torch.testing.assert_close(out.logps, padded.logps, rtol=1e-5, atol=1e-4)


def test_compiled_models_keep_transformers_mask():
    """The per-sequence boundaries are Python ints: under torch.compile every new batch would be a new graph, so a
    compiled model keeps transformers' mask (one graph)."""
    from fastdpo.integrations.hf import SEGMENTS_KWARG, is_compiled, packed_forward_kwargs

    model = tiny_llama(64, seed=12)
    cu = torch.tensor([0, 4, 10])
    assert not is_compiled(model, model) and is_compiled(torch.compile(model), model)
    assert SEGMENTS_KWARG in packed_forward_kwargs(model, cu, None, 10)
    assert SEGMENTS_KWARG not in packed_forward_kwargs(model, cu, None, 10, compiled=True)


def test_a_users_own_sdpa_is_not_wrapped():
    """Someone else's function registered as "sdpa" is left alone (called per sequence without a mask it could
    compute something else): the packed forward then keeps transformers' mask."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from fastdpo.integrations.hf import SEGMENTS_KWARG, packed_forward_kwargs

    mapping = AttentionInterface._global_mapping
    saved = mapping["sdpa"]

    def own_sdpa(*args, **kwargs):
        return sdpa_attention_forward(*args, **kwargs)

    try:
        AttentionInterface.register("sdpa", own_sdpa)
        model = tiny_llama(64, seed=13)
        assert SEGMENTS_KWARG not in packed_forward_kwargs(model, torch.tensor([0, 4, 10]), None, 10)
        assert mapping["sdpa"] is own_sdpa
    finally:
        AttentionInterface.register("sdpa", saved)
