"""Shared fixtures: a tiny random Llama with a BPE tokenizer trained on the spot, and a tiny Q/A dataset.

No test model is packaged anywhere and the Hub is unreachable, so the tests build their own.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

COLOURS = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple"]
THINGS = ["apple", "grass", "sky", "banana", "night", "snow", "carrot", "plum"]


def qa_records(n: int = 64):
    """Prompt/completion pairs a tiny model can learn: 'Question: colour of X?\nAnswer:' -> ' Y'."""
    return [
        {"prompt": f"Question: What colour is the {THINGS[i % 8]}?\nAnswer:", "completion": f" {COLOURS[i % 8]}"}
        for i in range(n)
    ]


def build_tiny_model_dir(path) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = [r["prompt"] + r["completion"] for r in qa_records(64)] * 4
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>", "<pad>"])
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture()
def qa_dataset():
    from datasets import Dataset

    return Dataset.from_list(qa_records(64))


@pytest.fixture
def clean_env(monkeypatch):
    """``monkeypatch`` with accelerate's FSDP launch variables and WORLD_SIZE removed, for the start-up checks."""
    for key in (
        "ACCELERATE_USE_FSDP",
        "FSDP_VERSION",
        "FSDP_AUTO_WRAP_POLICY",
        "FSDP_MIN_NUM_PARAMS",
        "FSDP_STATE_DICT_TYPE",
        "WORLD_SIZE",
    ):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch
