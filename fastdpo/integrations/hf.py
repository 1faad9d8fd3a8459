"""Plain Hugging Face loops: per-sequence log-probs of a causal LM without building its logits, padded or packed
(padding-free: every sequence of the batch in one row, no padding token run through the model)."""

import logging
import re
from dataclasses import dataclass
from typing import Mapping, Optional, Tuple

import torch

try:
    from torch.distributed.tensor import DTensor, Partial
except ImportError:  # a torch built without distributed: no DTensor can reach us
    DTensor = Partial = None

from fastdpo.dpo import DPOLossOutput
from fastdpo.linear import linear_dpo_loss, linear_sequence_logps
from fastdpo.logps import SequenceLogps


logger = logging.getLogger(__name__)


def _logit_options(config) -> dict:
    """Softcapping and logit scaling as the model's config states them (TRL's add_fused_lm_head reads the same)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = getattr(text, "logit_scale", None)
    if scale is None:
        scale = getattr(text, "output_multiplier", None)
    if scale is None:
        scale = getattr(text, "lm_head_multiplier", None)
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        scale = text.logits_scaling if getattr(text, "model_type", "") == "hyperclovax" else 1 / text.logits_scaling
    return {"logit_scale": 1.0 if scale is None else float(scale),
            "softcap": getattr(text, "final_logit_softcapping", None)}


def causal_lm(model):
    """The transformers causal LM inside DDP and PEFT wrappers (FSDP2's ``fully_shard`` wraps in place)."""
    inner = model
    while isinstance(inner, torch.nn.parallel.DistributedDataParallel):
        inner = inner.module
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # PEFT: LoRA lives inside


def _full(p: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A parameter still sharded inside the forward (a DTensor: an LM head that FSDP2 shards as a unit of its
    own, so its forward never runs) gathered for the call; its gradient is averaged over the mesh as FSDP2's
    reduce-scatter does (each rank holds a different batch)."""
    if p is None or DTensor is None or not isinstance(p, DTensor):
        return p
    return p.full_tensor(grad_placements=[Partial("avg")] * p.device_mesh.ndim)


@dataclass(frozen=True)
class PackedBatch:
    """A padded batch with its padding taken out: every sequence's tokens, in row order, in one row.

    Sequence s is tokens ``[cu_seqlens[s], cu_seqlens[s + 1])``; for a preference batch, rows ``[0, B)`` of the
    padded batch (the chosen) are sequences ``[0, B)`` and rows ``[B, 2B)`` (the rejected) sequences ``[B, 2B)``,
    the convention of ``dpo_loss(..., cu_seqlens=)``.

    Attributes:
        input_ids: (1, total) the real tokens.
        position_ids: (1, total) restarting at 0 for each sequence (what keeps a packed model forward from
            attending across sequences, with no attention mask).
        labels: (1, total) the labels of those tokens (``None`` when none were given).
        cu_seqlens: (S + 1,) int32 offsets, flash-attention's ``cu_seq_lens_q`` / ``cu_seq_lens_k``.
        max_seqlen: the longest sequence (flash-attention's ``max_length_q`` / ``max_length_k``).
        index: (total,) int64, each packed token's flat position in the padded ``(S, T)`` batch.
        padded_shape: ``(S, T)``, the padded batch's shape.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: Optional[torch.Tensor]
    cu_seqlens: torch.Tensor
    max_seqlen: int
    index: torch.Tensor
    padded_shape: Tuple[int, int]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    def model_inputs(self) -> dict:
        """The keywords ``policy_logps`` / ``policy_dpo_loss`` take for this batch (``attention_mask=None``)."""
        return {"input_ids": self.input_ids, "attention_mask": None, "labels": self.labels,
                "cu_seqlens": self.cu_seqlens, "max_seqlen": self.max_seqlen}

    def unpack(self, values: torch.Tensor, *, fill: float = 0) -> torch.Tensor:
        """Per-token packed values ``(total, ...)`` or ``(1, total, ...)`` back in the padded layout ``(S, T, ...)``,
        ``fill`` at the padding (differentiable). Per-sequence values ``(S, ...)`` are already in row order."""
        S, T = self.padded_shape
        total = self.num_tokens
        if values.dim() >= 2 and values.shape[0] == 1 and values.shape[1] == total:
            values = values[0]
        if values.dim() < 1 or values.shape[0] != total:
            raise ValueError(f"values: expected per-token values ({total}, ...) or (1, {total}, ...) of this packed "
                             f"batch, got {tuple(values.shape)}")
        out = values.new_full((S * T, *values.shape[1:]), fill)
        return out.index_copy(0, self.index.to(values.device), values).view(S, T, *values.shape[1:])

    def shift_labels(self, *, ignore_index: int = -100) -> torch.Tensor:
        """(1, total): the label each position predicts (the next token's label within its own sequence,
        ``ignore_index`` at each sequence's last token): Hugging Face's pre-shifted ``shift_labels``."""
        if self.labels is None:
            raise ValueError("this PackedBatch was packed without labels")
        # a sequence's last token: the next position restarts at 0, or the row ends (no host read)
        last = torch.roll(self.position_ids, -1, dims=1) == 0
        last[:, -1] = True
        return torch.roll(self.labels, -1, dims=1).masked_fill(last.to(self.labels.device), ignore_index)


def pack_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: Optional[torch.Tensor] = None,
               ) -> PackedBatch:
    """Take the padding out of a padded batch: ``(S, T)`` rows whose real tokens (``attention_mask`` 1) are one
    contiguous run (right or left padding) -> a ``PackedBatch`` of one row. Reads the lengths to the host once
    (the packed row's length is a shape)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected a (S, T) tensor, got "
                         f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__}")
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask: expected the shape of input_ids {tuple(input_ids.shape)}, got "
                         f"{getattr(attention_mask, 'shape', type(attention_mask).__name__)}")
    if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape):
        raise ValueError(f"labels: expected the shape of input_ids {tuple(input_ids.shape)}, got "
                         f"{getattr(labels, 'shape', type(labels).__name__)}")
    S, T = input_ids.shape
    real = attention_mask.to(input_ids.device) != 0
    runs = torch.diff(real.to(torch.int8), dim=1, prepend=torch.zeros_like(real[:, :1], dtype=torch.int8)) == 1
    lengths_t = real.sum(1)
    lengths, run_counts = torch.stack([lengths_t, runs.sum(1)]).tolist()  # the one host read
    gaps = [s for s in range(S) if run_counts[s] > 1]
    if gaps:
        raise ValueError(f"attention_mask: row {gaps[0]} has padding between its tokens; packing needs each row's "
                         "tokens as one contiguous run (right or left padding)")
    total = sum(lengths)
    if total == 0:
        raise ValueError("attention_mask: the batch holds no real token; there is nothing to pack")
    flat = real.reshape(-1)
    index = (torch.nonzero_static(flat, size=total) if hasattr(torch, "nonzero_static") and flat.device.type != "cpu"
             else flat.nonzero()).squeeze(1)  # nonzero_static: no second sync on a GPU
    cu = torch.zeros(S + 1, dtype=torch.int32, device=input_ids.device)
    cu[1:] = lengths_t.cumsum(0)
    starts = torch.repeat_interleave(cu[:-1].to(torch.int64), lengths_t, output_size=total)
    position_ids = (torch.arange(total, device=input_ids.device) - starts)[None]
    return PackedBatch(input_ids=input_ids.reshape(-1)[index][None], position_ids=position_ids,
                       labels=None if labels is None else labels.reshape(-1)[index.to(labels.device)][None],
                       cu_seqlens=cu, max_seqlen=max(lengths, default=0), index=index, padded_shape=(S, T))


def pack_preference_batch(batch: Mapping[str, torch.Tensor], *, ignore_index: int = -100) -> PackedBatch:
    """A padded preference batch -> a ``PackedBatch`` for ``policy_dpo_loss(model, **packed.model_inputs(), ...)``.

    ``batch``: ``input_ids`` and ``attention_mask`` (2B, T), rows [0, B) chosen and [B, 2B) rejected, with either
    ``labels`` (prompt and padding at ``ignore_index``) or ``completion_mask`` (TRL 1.x's
    ``DataCollatorForPreference``: labels are the completion's tokens)."""
    for key in ("input_ids", "attention_mask"):
        if key not in batch:
            raise ValueError(f"batch: needs {key!r} (and 'labels' or 'completion_mask'), got keys {sorted(batch)}")
    input_ids = batch["input_ids"]
    if "labels" in batch:
        labels = batch["labels"]
    elif "completion_mask" in batch:
        labels = input_ids.masked_fill(batch["completion_mask"] == 0, ignore_index)
    else:
        raise ValueError(f"batch: needs 'labels' or 'completion_mask', got keys {sorted(batch)}")
    if input_ids.dim() != 2 or input_ids.shape[0] % 2:
        raise ValueError(f"batch['input_ids']: expected (2B, T) chosen then rejected rows, got {tuple(input_ids.shape)}")
    return pack_batch(input_ids, batch["attention_mask"], labels)


def unpack_pairs(packed: PackedBatch, values: torch.Tensor, *, per_token: bool, fill: float = 0
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Packed outputs of a preference batch -> ``(chosen, rejected)``: ``per_token=False``, per-sequence ``(2B, ...)``
    values to two ``(B, ...)``; ``per_token=True``, ``(total, ...)`` or ``(1, total, ...)`` values to two padded
    ``(B, T, ...)`` (``fill`` at the padding). Said, not guessed: a batch can hold as many tokens as sequences."""
    if not isinstance(per_token, bool):
        raise TypeError(f"per_token must be a bool, got {type(per_token).__name__}")
    if per_token:
        return packed.unpack(values, fill=fill).chunk(2, dim=0)
    S = packed.padded_shape[0]
    if values.dim() < 1 or values.shape[0] != S:
        raise ValueError(f"values: expected per-sequence values ({S}, ...), got {tuple(values.shape)}")
    return values.chunk(2, dim=0)


_SEQUENCE_MIXERS = re.compile(r"mamba|ssm|deltanet|gated_?delta|shortconv|short_conv|rwkv|recurrent|linear_?att"
                              r"|lightning|hyena|retnet|xlstm|mlstm", re.IGNORECASE)
_ATTENTION_LAYERS = {"full_attention", "sliding_attention", "chunked_attention", "attention", "global", "local"}
_WARNED_DENSE = set()


def _token_mixers_besides_attention(lm) -> Optional[str]:
    """Why ``lm`` has layers that mix tokens other than by masked attention (convolutions, recurrent or linear
    attention state): such layers read straight across a packed row's boundaries, whatever the position ids."""
    text = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    for attr in ("layer_types", "layers_block_type", "block_types", "hybrid_override_pattern"):
        kinds = getattr(text, attr, None)
        if isinstance(kinds, (list, tuple)) and set(map(str, kinds)) - _ATTENTION_LAYERS:
            return f"config.{attr} holds {sorted(set(map(str, kinds)) - _ATTENTION_LAYERS)}"
    for name, module in lm.named_modules():
        if isinstance(module, torch.nn.Conv1d) or _SEQUENCE_MIXERS.search(type(module).__name__):
            return f"{name or 'the model'} is a {type(module).__name__}"
    return None


SEGMENTS_KWARG = "fastdpo_segments"  # the packed row's (start, end) pairs, for the per-sequence sdpa below
_SDPA_NEUTRAL = {"dropout", "scaling", "position_ids", "use_cache", "is_causal", "output_attentions",
                 "output_router_logits", "output_hidden_states", "return_dict"}
# Families whose every layer's mask is the plain causal one, or says otherwise through a kwarg the wrapper sees
# (a sliding window): compared packed per sequence against transformers' masked sdpa on tiny models. Llama4
# (chunked attention), PhiMoE (a window only in its mask), Doge (a learned bias folded into the mask) and every
# family not listed keep transformers' masked sdpa.
PER_SEQUENCE_MODEL_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma3_text", "cohere",
    "cohere2", "phi", "olmo2", "olmo3", "granite", "glm4", "gpt2", "gpt_neox", "diffllama", "dots1", "minimax_m2"})
_WARNED_FALLBACK = set()


def _sdpa_per_sequence(original):
    """transformers' ``sdpa`` attention, computing a packed row one sequence at a time when the forward carries
    ``fastdpo_segments`` (a kwarg transformers hands every attention call, and gradient checkpointing's recompute
    too): each sequence is causal attention on its own tokens, with no mask, so sdpa's fused kernels run and the
    work is the real tokens' (the sum of each length squared), not the packed row's ``total^2`` under a dense
    block-diagonal mask. Any other call, and any layer this cannot reproduce exactly (a sliding window, a
    position bias, a non-causal module, a query of another length than its keys), takes the original function
    with transformers' mask, unchanged."""

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        segments = kwargs.pop(SEGMENTS_KWARG, None)
        if segments is None:
            return original(module, query, key, value, attention_mask, *args, **kwargs)
        # anything else a model hands its attention (a sliding window, a softcap, sinks, a position bias, ...)
        # must be absent, None or False for plain causal attention per sequence to be the same computation
        other = any(v is not None and v is not False for k, v in kwargs.items() if k not in _SDPA_NEUTRAL)
        if (other or args or kwargs.get("is_causal") is False or getattr(module, "sliding_window", None) is not None
                or not getattr(module, "is_causal", True) or query.shape[2] != key.shape[2] or query.shape[0] != 1):
            name = type(module).__name__
            if name not in _WARNED_FALLBACK:
                _WARNED_FALLBACK.add(name)
                logger.warning("fastdpo: %s attends a packed row under transformers' dense mask (total^2 work): "
                               "its layer has more than plain causal attention (%s)", name,
                               sorted(k for k, v in kwargs.items() if k not in _SDPA_NEUTRAL
                                      and v is not None and v is not False) or "a sliding window or shape")
            return original(module, query, key, value, attention_mask, *args, **kwargs)
        outs = [original(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, **kwargs)[0]
                for a, b in segments if b > a]
        return torch.cat(outs, dim=1), None

    attention.fastdpo_original = original
    return attention


def _install_sdpa_per_sequence() -> bool:
    """Wrap transformers' own ``sdpa`` (once); False where "sdpa" is someone else's function (left alone)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    current = AttentionInterface._global_mapping.get("sdpa")
    if hasattr(current, "fastdpo_original"):
        return current.fastdpo_original is sdpa_attention_forward
    if current is not sdpa_attention_forward:
        return False
    AttentionInterface.register("sdpa", _sdpa_per_sequence(current))
    return True


def _per_sequence_sdpa(lm, compiled: bool) -> bool:
    """Whether a packed forward of ``lm`` under sdpa may attend per sequence (else transformers' dense mask)."""
    text = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    if getattr(text, "model_type", None) not in PER_SEQUENCE_MODEL_TYPES:
        return False
    if getattr(text, "attention_chunk_size", None) is not None:
        return False
    if compiled or torch.compiler.is_compiling():
        return False  # the boundaries are Python ints: every new batch would be a new graph
    return _install_sdpa_per_sequence()


def packed_forward_kwargs(lm, cu_seqlens: torch.Tensor, max_seqlen: Optional[int], total: int, *,
                          compiled: bool = False) -> dict:
    """What a packed forward of ``lm`` needs beyond ``input_ids``: ``position_ids`` restarting at each sequence,
    no attention mask and no cache (transformers then masks attention per sequence: its ``masking_utils`` finds
    the sequences from the restarts), and flash-attention's varlen offsets when the model attends with it.

    Refused (``ValueError``), where a packed row would silently attend or carry state across sequences: an
    attention implementation transformers has no mask function for (a custom registered one), and models with
    layers that mix tokens other than by attention (convolutions, state-space, linear attention)."""
    impl = str(getattr(lm.config, "_attn_implementation", None) or "")
    why = _token_mixers_besides_attention(lm)
    if why:
        raise ValueError(f"cu_seqlens: {type(lm).__name__} mixes tokens outside attention ({why}); those layers "
                         "would read across the packed sequences' boundaries: use a padded batch")
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, find_packed_sequence_indices  # noqa: F401
    except ImportError as e:
        raise ValueError(f"cu_seqlens: this transformers version cannot mask attention per packed sequence (it "
                         "lacks masking_utils' packed-sequence detection); use a padded batch") from e
    if impl not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        raise ValueError(f"cu_seqlens: attn_implementation {impl!r} has no mask function in transformers' "
                         f"masking_utils (known: {sorted(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping)}), so nothing "
                         "would keep a packed row's sequences apart: use one of those or a padded batch")
    flash = "flash" in impl
    cu = cu_seqlens.to(torch.int64)
    # the model side reads the offsets once per forward: checked before any layer indexes with them, the
    # boundaries of the per-sequence sdpa, flash-attention's longest sequence
    bounds = cu.tolist()
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != total or any(b < a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens: expected non-decreasing offsets from 0 to the token count {total}, got "
                         f"{bounds if len(bounds) <= 12 else bounds[:6] + ['...'] + bounds[-3:]}")
    seg = torch.searchsorted(cu[1:], torch.arange(total, device=cu.device), right=True)
    kwargs = {"position_ids": (torch.arange(total, device=cu.device) - cu[seg])[None], "use_cache": False}
    if impl == "sdpa" and _per_sequence_sdpa(lm, compiled):
        kwargs[SEGMENTS_KWARG] = tuple(zip(bounds[:-1], bounds[1:]))
    elif not flash and (impl, type(lm).__name__) not in _WARNED_DENSE:
        _WARNED_DENSE.add((impl, type(lm).__name__))
        logger.warning("fastdpo: a packed row of %s under attn_implementation=%r attends under a dense (total x "
                       "total) block-diagonal mask: total^2 attention work, more than the padded batch's (per-"
                       "sequence sdpa covers the families in fastdpo.integrations.hf.PER_SEQUENCE_MODEL_TYPES, "
                       "uncompiled; flash_attention_2/3 runs varlen)", type(lm).__name__, impl)
    if flash:
        if max_seqlen is None:
            max_seqlen = max(b - a for a, b in zip(bounds, bounds[1:]))
        cu32 = cu_seqlens.to(torch.int32)
        kwargs.update(cu_seq_lens_q=cu32, cu_seq_lens_k=cu32, max_length_q=max_seqlen, max_length_k=max_seqlen)
    return kwargs


def is_compiled(model, lm) -> bool:
    """``model`` (or a layer of its causal LM) under ``torch.compile``."""
    inner = model
    while True:
        if hasattr(inner, "_orig_mod"):
            return True
        if isinstance(inner, torch.nn.parallel.DistributedDataParallel):
            inner = inner.module
            continue
        break
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in lm.modules())


def _through_forward(model, input_ids, attention_mask, loss_fn, cu_seqlens=None, max_seqlen=None):
    """``loss_fn(hidden, weight, bias, logit options)`` run *inside* ``model``'s forward, in place of its LM head:
    the outermost wrapper's hooks all run (DDP's gradient synchronisation, FSDP2's unsharding and reduce-scatter),
    and the logits are never built. What ``loss_fn`` returns is what ``model(...)`` returns."""
    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or type(head).forward is not torch.nn.Linear.forward:
        raise TypeError(f"policy_logps needs a plain nn.Linear LM head, got {type(head).__name__} (an adapter on "
                        "the LM head changes its effective weight)")
    options = _logit_options(lm.config)
    if cu_seqlens is None:
        backbone_kwargs = {"attention_mask": attention_mask, "use_cache": False}
    else:
        if attention_mask is not None:
            raise ValueError("attention_mask: must be None with cu_seqlens (a packed batch): with an attention mask "
                             "the model's tokens attend across the packed sequences' boundaries")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() not in (1, 2) or (
                input_ids.dim() == 2 and input_ids.shape[0] != 1):
            raise ValueError(f"input_ids: a packed batch is (total,) or (1, total), got "
                             f"{tuple(getattr(input_ids, 'shape', ()))}")
        input_ids = input_ids.reshape(1, -1)
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point:
            raise ValueError("cu_seqlens: expected a 1-D integer tensor of sequence offsets")
        backbone_kwargs = packed_forward_kwargs(lm, cu_seqlens, max_seqlen, input_ids.shape[1],
                                                compiled=is_compiled(model, lm))

    def fused_forward(*args, **kwargs):
        # the backbone is looked up here: FSDP2 and PEFT may have replaced it since
        backbone = getattr(lm, lm.base_model_prefix, None)
        if not isinstance(backbone, torch.nn.Module):  # Llama4ForCausalLM's prefix names no attribute of it
            backbone = lm.model
        hidden = backbone(input_ids=input_ids, **backbone_kwargs).last_hidden_state
        return loss_fn(hidden.to(head.weight.device), _full(head.weight), _full(head.bias), options)

    saved = lm.__dict__.get("forward")  # an instance forward already there (TRL's fused head patches one in)
    lm.forward = fused_forward  # an instance attribute: module hooks still wrap it
    try:
        return model(input_ids=input_ids, attention_mask=attention_mask)  # what the wrappers see; unused inside
    finally:
        if saved is None:
            del lm.forward
        else:
            lm.forward = saved


def _on(cu_seqlens, input_ids):
    """``cu_seqlens`` on the tokens' device (a convenience of the helpers; the ops themselves refuse a mismatch)."""
    if isinstance(cu_seqlens, torch.Tensor) and isinstance(input_ids, torch.Tensor):
        return cu_seqlens.to(input_ids.device)
    return cu_seqlens


def policy_logps(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], labels: torch.Tensor, *,
                 ignore_index: int = -100, average: bool = False, temperature: float = 1.0,
                 cu_seqlens: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None,
                 **kwargs) -> SequenceLogps:
    """``sequence_logps(model(input_ids).logits, labels)`` through the backbone and the fused-linear LM head.

    Runs inside ``model``'s own forward (its LM head replaced for the call), so a model wrapped in DDP, in FSDP2
    (``fully_shard``) or in PEFT computes what the same batch computes unwrapped, gradients synchronised by the
    wrapper as usual.

    Args:
        model: a transformers causal LM (``...ForCausalLM``), PEFT-wrapped, DDP-wrapped or ``fully_shard``-ed;
            tied embeddings work.
        labels: (N, T) ``input_ids`` with prompt and padding set to ``ignore_index`` (shifted inside).
        cu_seqlens: a packed batch (``pack_batch``): ``input_ids`` and ``labels`` (1, total), ``attention_mask``
            None (refused otherwise), sequence s its tokens ``[cu_seqlens[s], cu_seqlens[s + 1])``. The model runs
            with ``position_ids`` restarting per sequence, no attention mask and no cache, plus flash-attention's
            varlen offsets under a flash implementation; outputs are per sequence ``(S,)`` / per token ``(1, total)``.
        max_seqlen: the longest packed sequence, for flash-attention (read from ``cu_seqlens`` if not given).
        kwargs: passed to ``linear_sequence_logps`` (``return_token_logps``, ``chunk_bytes``, ...).
    """
    packed = {} if cu_seqlens is None else {"cu_seqlens": _on(cu_seqlens, input_ids)}
    cu_seqlens = packed.get("cu_seqlens")

    def loss_fn(hidden, weight, bias, options):
        return linear_sequence_logps(hidden, weight, labels, bias, ignore_index=ignore_index, average=average,
                                     temperature=temperature, **packed, **options, **kwargs)

    return _through_forward(model, input_ids, attention_mask, loss_fn, cu_seqlens, max_seqlen)


def policy_dpo_loss(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], labels: torch.Tensor,
                    ref_chosen_logps: Optional[torch.Tensor] = None, ref_rejected_logps: Optional[torch.Tensor] = None,
                    *, ignore_index: int = -100, temperature: float = 1.0, cu_seqlens: Optional[torch.Tensor] = None,
                    max_seqlen: Optional[int] = None, **kwargs) -> DPOLossOutput:
    """``dpo_loss(model(input_ids).logits, labels, ...)`` through the backbone and ``linear_dpo_loss``: the
    policy's DPO loss without its logits, inside its own forward like ``policy_logps`` (DDP, FSDP2, PEFT).

    Args:
        input_ids, attention_mask, labels: (2B, T), rows [0, B) chosen, [B, 2B) rejected.
        cu_seqlens, max_seqlen: a packed batch, as in ``policy_logps``; sequences [0, B) chosen, [B, 2B) rejected
            (``pack_preference_batch`` builds them: ``policy_dpo_loss(model, **packed.model_inputs(), ...)``).
        kwargs: passed to ``linear_dpo_loss``: the loss options (``beta``, ``loss_type``, ... or ``config``),
            ``chunk_bytes``, ``lean``.
    """
    packed = {} if cu_seqlens is None else {"cu_seqlens": _on(cu_seqlens, input_ids)}
    cu_seqlens = packed.get("cu_seqlens")

    def loss_fn(hidden, weight, bias, options):
        return linear_dpo_loss(hidden, weight, labels, ref_chosen_logps, ref_rejected_logps, bias,
                               ignore_index=ignore_index, temperature=temperature, **packed, **options, **kwargs)

    return _through_forward(model, input_ids, attention_mask, loss_fn, cu_seqlens, max_seqlen)
