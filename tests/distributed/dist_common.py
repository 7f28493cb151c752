"""Shared pieces of the distributed tests: one tiny ALLoRA model, one fixed global batch, one training step.

The single-process reference (run inside pytest) and the multi-process workers (started by ``torchrun``) build
the model and data from here, so the only difference between the two runs is the sharding itself.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from allora_trl import apply_allora

ETA = 2.0
GLOBAL_BATCH = 4  # split over 2 processes: 2 sequences each
SEQ_LEN = 16
VOCAB = 128
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_config() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )


def save_base(path) -> str:
    """The tiny base model as a folder, for loading it 4-bit quantised (QLoRA)."""
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config()).save_pretrained(path)
    return str(path)


def build_model(seed: int = 0, qlora_dir: str | None = None) -> torch.nn.Module:
    """The same fp32 peft model with ALLoRA on every linear layer of the decoder, in every process.

    ``init_lora_weights=False`` gives B != 0 from the start, so the coefficients differ per row at step 1 and
    the A gradients are not trivially zero: a test on the default init (B = 0, c = eta everywhere) proves less.
    With ``qlora_dir`` the base is that folder loaded 4-bit (bitsandbytes NF4, default uint8 storage, fp32 compute).
    """
    if qlora_dir is None:
        torch.manual_seed(seed)
        base = LlamaForCausalLM(tiny_config()).float()
    else:
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
        base = LlamaForCausalLM.from_pretrained(qlora_dir, quantization_config=quantization, device_map="cpu")
        torch.manual_seed(seed)
    lora = LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, lora_dropout=0.0, init_lora_weights=False)
    model = get_peft_model(base, lora)
    apply_allora(model, eta=ETA)
    return model


def global_batch(step: int) -> torch.Tensor:
    """Fixed token ids for a step (no padding, so every sequence has the same number of loss tokens)."""
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ_LEN), generator=generator)


def local_batch(step: int, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous slice of the global batch, as a distributed sampler would give it."""
    per_rank = GLOBAL_BATCH // world_size
    return global_batch(step)[rank * per_rank : (rank + 1) * per_rank]


def loss_on(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy: with equal token counts per rank, the mean over ranks is the global mean."""
    return model(input_ids=input_ids, labels=input_ids).loss


def make_optimizer(model: torch.nn.Module, kind: str) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.5, momentum=0.9)
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)


def lora_state(named_tensors) -> dict[str, torch.Tensor]:
    """The LoRA A/B weights of a (full) state dict, keyed without FSDP/DDP prefixes, detached on CPU."""
    out = {}
    for name, tensor in named_tensors:
        if "lora_" in name:
            key = name.replace("module.", "", 1) if name.startswith("module.") else name
            out[key] = tensor.detach().cpu().clone()
    return out
