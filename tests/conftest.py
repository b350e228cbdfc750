"""Shared fixtures: a tiny random Llama model (2 layers, hidden 64) with a small BPE tokenizer and
a ChatML chat template, built offline in a temp folder, and helpers to compose configs for it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Tokenised-data and converted-model caches in a temp folder; nothing ever leaves the machine.

    The converted default model is reused from the user's cache when present (it is large and
    always the same), so real-model tests do not pay the conversion twice.
    """
    cache = tmp_path_factory.mktemp("ftune-cache")
    user_models = Path.home() / ".cache" / "ftune" / "models"
    user_models.mkdir(parents=True, exist_ok=True)
    (cache / "models").symlink_to(user_models)
    os.environ["FTUNE_CACHE_DIR"] = str(cache)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    from ftune.logs import quiet_libraries

    quiet_libraries()
    yield cache


def make_tiny_tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = ("what is the capital of france paris answer question instruction input output response system "
             "user assistant hello world below describes a task write that appropriately completes request "
             "sort these numbers reverse word plural count letters convert kilometres metres").split()
    corpus = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) + f" {i} + {i * 3} = {i * 4}."
              for i in range(200)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    return fast


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved 2-layer Llama (hidden 64) with the tiny tokenizer: model.path=<this folder>."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = make_tiny_tokenizer(folder)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture()
def tiny_overrides(tiny_model_dir, tmp_path) -> list[str]:
    """Overrides that point the default recipe at the tiny model, in fp32, writing under tmp_path."""
    return [f"model.path={tiny_model_dir}", "model.name=tiny", "hardware.precision=fp32",
            f"train.output_dir={tmp_path / 'outputs'}", "train.sample_max_new_tokens=4", "train.tensorboard=false",
            "dataset.max_rows=64", "train.micro_batch_size=4", "train.eval_every=0", "train.save_every=0",
            "dataset.max_seq_len=128"]
