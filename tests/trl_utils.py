"""A tiny random causal LM, an in-memory tokenizer and a preference dataset: TRL without the hub."""

import copy

import torch

WORDS = [f"w{i}" for i in range(90)]


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in WORDS:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def tiny_llama(vocab_size: int, seed: int = 0, tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tie, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).float()
    with torch.no_grad():  # random heads give near-uniform logits; spread them so losses are not all ~log 2
        model.lm_head.weight.mul_(20.0)
    return model


def preference_dataset(n: int = 16, seed: int = 0):
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)

    def sentence(lo, hi):
        k = int(torch.randint(lo, hi, (1,), generator=g))
        return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g))
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(n):
        rows["prompt"].append(sentence(2, 6))
        rows["chosen"].append(" " + sentence(2, 9))
        rows["rejected"].append(" " + sentence(2, 9))
    return Dataset.from_dict(rows)


def dpo_trainer(tmp_path, model=None, eval_dataset=None, train_dataset=None, ref_model="copy", **config):
    """A DPOTrainer on the tiny model and dataset; ``ref_model`` defaults to a copy of the model (TRL would
    otherwise reload it from the hub), None for a PEFT policy (TRL disables its adapters for the reference)."""
    from trl import DPOConfig, DPOTrainer

    tok = tiny_tokenizer()
    model = model if model is not None else tiny_llama(len(tok))
    options = dict(per_device_train_batch_size=4, use_cpu=True, report_to="none", logging_steps=1,
                   save_strategy="no", seed=0,
                   bf16=False)  # TRL 1.16 defaults to bf16 autocast, on CPU too: tests compare fp32
    options.update(config)
    args = DPOConfig(output_dir=str(tmp_path), **options)
    ref_model = copy.deepcopy(model) if isinstance(ref_model, str) and ref_model == "copy" else ref_model
    return DPOTrainer(model=model, ref_model=ref_model, args=args,
                      train_dataset=train_dataset if train_dataset is not None else preference_dataset(),
                      eval_dataset=eval_dataset, processing_class=tok)


def perturb(model, seed: int = 1, scale: float = 0.05):
    """Moves a policy away from its reference copy, so rewards and margins are not ~0."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))


def trainer_step(tmp_path, config, context, cls=None, prepare=None):
    """One loss + backward of a perturbed DPOTrainer on its first batch, built and run inside ``context`` (e.g.
    fastdpo's ``patched()``): (loss, the metrics it logged, parameter gradients). TRL 1.x and 0.x alike."""
    with context:
        trainer = dpo_trainer(tmp_path, **config)
        if cls is not None:
            trainer.__class__ = cls
        if prepare is not None:
            prepare(trainer)
        perturb(trainer.model)
        batch = next(iter(trainer.get_train_dataloader()))
        trainer.model.train()
        if hasattr(trainer, "_compute_loss"):  # TRL >= 1
            loss, store = trainer._compute_loss(trainer.model, batch, False), trainer._metrics
        else:
            loss, store = trainer.compute_loss(trainer.model, batch), trainer._stored_metrics
        loss.backward()
    metrics = {k: v[-1] for k, v in store["train"].items()}
    return loss.detach(), metrics, [p.grad.clone() for p in trainer.model.parameters() if p.requires_grad]


LEARNING_RATE = 1e-3


def train_three_steps(path, **config):
    """3 AdamW steps at LEARNING_RATE: (the logged rows, the final weights)."""
    trainer = dpo_trainer(path, max_steps=3, learning_rate=LEARNING_RATE, **config)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return logs, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def lora_policy_config():
    """A fresh LoRA-wrapped tiny Llama (real PEFT; q_proj and v_proj) and no reference model: TRL then scores
    the reference from the same model (a frozen copy of the adapter, or the adapters disabled)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(len(tiny_tokenizer())),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    return dict(model=model, ref_model=None)
