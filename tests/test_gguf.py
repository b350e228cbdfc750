"""`ftune export-gguf`: names, permutation, tokenizer and metadata are checked by loading the file
back in llama.cpp (the `gguf` extra, part of `make setup`) and comparing logits with the Hugging
Face model's, and llama.cpp's own tokenizer on the file with the Hugging Face tokenizer."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from ftune.config.compose import compose
from ftune.errors import FtuneError
from ftune.export import gguf as export_mod
from ftune.export import gguf_writer
from ftune.export.gguf_writer import gguf_name, permute_rotary, write_gguf
from ftune.train.run import train

# Text that tells tokenizers apart: accents, CJK, emoji, long numbers, runs of spaces, tabs and
# newlines, code, contractions, and the chat template's special tokens (whole, next to text and spaces).
TOKENIZER_TEXTS = [
    "what is the capital of france? paris!", "Café naïve résumé über ÅÄÖ ñ ß œ", "日本語のテキスト 中文 한국어",
    "emoji 🙂👍🏽 and 👨‍👩‍👧 done", "12345678901234567890 and 3.14159, 1,000,000 on 2024-05-17 x1 9",
    "a  b   c    d", "tab\there\t\tx\n\nnewline\r\n end  ", "   leading spaces", "trailing   ", "\n\n\n", " \t \n ",
    "def f(x):\n    return x**2  # square\n", "it's we'll they've I'M don't",
    "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n", "x<|im_end|>y<|endoftext|>z", " <|im_start|> a ",
]


@pytest.fixture()
def lora_run(tiny_overrides, tmp_path):
    train(compose([*tiny_overrides, "train.max_steps=3", "train.lr=1e-2", "train.run_name=lora"]))
    return tmp_path / "outputs" / "lora"


def test_tensor_names_and_rotary_permutation():
    assert gguf_name("model.layers.3.self_attn.q_proj.weight") == "blk.3.attn_q.weight"
    assert gguf_name("model.embed_tokens.weight") == "token_embd.weight"
    assert gguf_name("lm_head.weight") == "output.weight"
    # One head of dim 4: HF keeps rotary pairs as (x0, x1 | x2, x3) halves, GGML as (x0, x2), (x1, x3).
    w = np.arange(4, dtype=np.float32)[:, None]
    assert permute_rotary(w, 1)[:, 0].tolist() == [0, 2, 1, 3]


@pytest.mark.parametrize("quant,min_top1", [("f16", 0.95), ("q8_0", 0.9), ("q4_0", 0.5)])
def test_export_of_a_run_loads_back_with_the_same_predictions(lora_run, tmp_path, quant, min_top1):
    path, result = export_mod.export(lora_run, quant, tmp_path / f"m-{quant}.gguf")
    assert path.is_file() and path.stat().st_size > 0
    assert result.verifier == "llama.cpp"  # the gguf extra is installed: its absence fails here
    assert result.top1_agreement >= min_top1, result
    assert len(result.answers) == len(export_mod.PROMPTS)


def test_export_refuses_unknown_architectures_and_quants(lora_run, tmp_path):
    from ftune.export.merge import merge_run

    folder = merge_run(lora_run, tmp_path / "merged", dtype="float32")
    with pytest.raises(FtuneError, match="is unknown"):
        export_mod.export(folder, "q3_x")
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(FtuneError, match="GPT2LMHeadModel cannot be exported"):
        export_mod.export(folder, "q8_0", tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_k_quants_need_llama_cpp(lora_run, tmp_path, monkeypatch):
    monkeypatch.setattr(export_mod, "has_llama_cpp", lambda: False)
    with pytest.raises(FtuneError, match="needs llama.cpp's quantiser"):
        export_mod.export(lora_run, "q4_k_m", tmp_path / "k.gguf", check=False)


def test_cli_export_with_modelfile(lora_run, tmp_path):
    out = tmp_path / "cli" / "m.gguf"
    result = subprocess.run([sys.executable, "-m", "ftune.cli", "export-gguf", str(lora_run), "--quant", "q8_0",
                             "--out", str(out), "--modelfile"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "top-1 agreement" in result.stdout and out.is_file()
    assert (out.parent / "Modelfile").read_text().startswith("FROM ./m.gguf")
    bad = subprocess.run([sys.executable, "-m", "ftune.cli", "export-gguf", str(tmp_path / "nope")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "ftune: error" in bad.stderr and "Traceback" not in bad.stderr


def test_transformers_verifier_when_llama_cpp_is_missing(lora_run, tmp_path, monkeypatch):
    monkeypatch.setattr(export_mod, "has_llama_cpp", lambda: False)
    _, result = export_mod.export(lora_run, "q8_0", tmp_path / "t.gguf")
    assert result.verifier == "transformers" and result.top1_agreement >= 0.9


def test_k_quant_through_llama_cpp(lora_run, tmp_path):
    path, result = export_mod.export(lora_run, "q6_k", tmp_path / "k.gguf")
    assert result.verifier == "llama.cpp" and path.stat().st_size > 0 and result.top1_agreement >= 0.5


def _qalora_run(tiny_overrides, tmp_path, group_size):
    name = f"qalora-g{group_size}"
    train(compose([*tiny_overrides, "train.max_steps=3", "train.lr=1e-2", f"train.run_name={name}", "method=qalora",
                   "method.r=4", f"method.group_size={group_size}"]))
    return tmp_path / "outputs" / name


# Groups of 32 are single q4_1 blocks that span their full code range, so re-quantising already
# lands on the same grid (the direct path is then a guarantee, not a gain); from 64 on, a block
# sees only part of its group's range and re-quantising re-fits a finer grid that misses the codes.
@pytest.mark.parametrize("group_size", [32, 64])
def test_qalora_q4_1_is_written_from_the_codes(tiny_overrides, tmp_path, group_size):
    import gguf
    from safetensors.numpy import load_file

    from ftune.export.gguf_writer import to_ggml_rows
    from ftune.export.merge import QALORA_GROUPS, merge_run

    folder = merge_run(_qalora_run(tiny_overrides, tmp_path, group_size), tmp_path / "merged", dtype="float32")
    assert json.loads((folder / "ftune_merge.json").read_text())["qalora_group_size"] == group_size
    notes = []
    path, result = export_mod.export(folder, "q4_1", tmp_path / "q.gguf", notes=notes)
    modules = 2 * 7  # 2 layers x q k v o gate up down
    assert notes == [f"{modules} QA-LoRA layers written as q4_1 blocks without re-quantisation"]
    assert result.verifier == "llama.cpp"
    assert result.top1_agreement >= 0.9, result

    groups, weights = load_file(folder / QALORA_GROUPS), load_file(folder / "model.safetensors")
    # Training moved the zero-points off the integers: the case q4_0 cannot hold and q4_1 can.
    assert max(np.abs(v - np.round(v)).max() for k, v in groups.items() if k.endswith(".zero")) > 0.05
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    q4_1 = gguf.GGMLQuantizationType.Q4_1
    direct_err, requant_err, checked = 0.0, 0.0, 0
    for key in groups:
        if not key.endswith(".codes"):
            continue
        module = key[:-len(".codes")]
        name = gguf_name(f"{module}.weight")
        tensor = tensors[name]
        assert tensor.tensor_type == q4_1
        merged = to_ggml_rows(weights[f"{module}.weight"], "llama", name, 4, 2)
        got = gguf.quants.dequantize(tensor.data, q4_1).reshape(merged.shape)
        # d = s and m = -s*z, each rounded to f16: the only difference from the merged weights.
        scale = to_ggml_rows(groups[f"{module}.scale"], "llama", name, 4, 2)
        zero = to_ggml_rows(groups[f"{module}.zero"], "llama", name, 4, 2)
        d, m = scale.astype(np.float16).astype(np.float32), (-scale * zero).astype(np.float16).astype(np.float32)
        bound = 15 * np.abs(d - scale) + np.abs(m + scale * zero) + 1e-6
        assert np.all(np.abs(got - merged) <= np.repeat(bound, group_size, axis=1)), module
        requant = gguf.quants.dequantize(gguf.quants.quantize(merged, q4_1), q4_1)
        direct_err = max(direct_err, float(np.abs(got - merged).max()))
        requant_err = max(requant_err, float(np.abs(requant - merged).max()))
        checked += 1
    assert checked == modules
    print(f"group {group_size}: max |q4_1 - merged| direct {direct_err:.3g}, re-quantised {requant_err:.3g}")
    if group_size == 32:
        assert direct_err <= requant_err
    else:
        assert direct_err * 10 < requant_err


def test_qalora_exports_that_cannot_keep_the_groups_say_why(tiny_overrides, tmp_path):
    import gguf

    from ftune.export.gguf_writer import Q4_0_NOTE, write_gguf
    from ftune.export.merge import merge_run

    run = _qalora_run(tiny_overrides, tmp_path, 16)
    notes = []
    path, result = export_mod.export(run, "q4_0", tmp_path / "q4_0.gguf", notes=notes)
    assert notes == [Q4_0_NOTE] and result.top1_agreement >= 0.5
    # Groups of 16 split q4_1's 32-weight blocks: re-quantised, with the reason.
    written = write_gguf(merge_run(run, tmp_path / "merged", dtype="float32"), tmp_path / "q4_1.gguf", "q4_1")
    assert written.direct_layers == 0
    assert len(written.notes) == 1 and "group size 16 is not a multiple of q4_1's 32" in written.notes[0]
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(written.path).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q4_1


def test_unknown_architecture_names_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FooForCausalLM"]}))
    with pytest.raises(FtuneError) as caught:
        export_mod.export(tmp_path, "f16", tmp_path / "foo.gguf")
    assert "FooForCausalLM cannot be exported" in caught.value.title
    assert any("LlamaForCausalLM" in p and "Qwen2ForCausalLM" in p for p in caught.value.problems)
    assert not (tmp_path / "foo.gguf").exists()


def _tiny_model(folder, tokenizer, arch="llama", init=0.02, hidden=64, layers=2):
    """A random Llama or Qwen2 (4 heads, 2 KV heads) with `tokenizer`, saved in `folder`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    config = config_cls(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=512, tie_word_embeddings=True, initializer_range=init,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id, **({"rope_theta": 1000000.0} if arch == "qwen2" else {}))
    torch.manual_seed(0)
    model = model_cls(config)
    if arch == "qwen2":
        with torch.no_grad():  # random init leaves the q/k/v biases at zero; make them matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    model.save_pretrained(folder)
    return folder


def test_llama_export_gets_the_rotary_permutation_right(tmp_path, monkeypatch):
    """llama.cpp's llama runs rope on interleaved pairs, so q/k rows must be permuted from HF's halves.

    The shared tiny model (init 0.02) cannot show it: its attention is nearly uniform and a wrong
    q/k row order still agrees on every token. At init 0.2 it cannot hide: the file written with
    the permutation skipped, or applied to q only, is checked to lose the agreement here too."""
    from conftest import make_tiny_tokenizer

    folder = tmp_path / "tiny-llama-sharp"
    _tiny_model(folder, make_tiny_tokenizer(folder), "llama", init=0.2)
    path, result = export_mod.export(folder, "f16", tmp_path / "llama.gguf")
    assert result.verifier == "llama.cpp"
    assert result.top1_agreement == 1.0 and result.max_logit_diff < 0.1, result

    rows = gguf_writer.to_ggml_rows
    broken = {"unpermuted": lambda array, arch, name, n_head, n_kv: array,
              "q only": lambda array, arch, name, n_head, n_kv:
                  array if name.endswith("attn_k.weight") else rows(array, arch, name, n_head, n_kv)}
    for label, wrong in broken.items():
        monkeypatch.setattr(gguf_writer, "to_ggml_rows", wrong)
        _, bad = export_mod.export(folder, "f16", tmp_path / "wrong.gguf")
        assert bad.top1_agreement < 0.8, (label, bad)


def test_qwen2_export_loads_back_with_the_same_predictions(tmp_path):
    from conftest import make_tiny_tokenizer
    from safetensors.numpy import load_file

    folder = tmp_path / "tiny-qwen2"
    # At the default 0.02 the attention is nearly uniform and a wrong q/k row order still agrees on
    # every token (measured); at 0.2 it drops to 20% agreement.
    _tiny_model(folder, make_tiny_tokenizer(folder), "qwen2", init=0.2)
    assert "lm_head.weight" not in load_file(folder / "model.safetensors")  # tied: llama.cpp reuses token_embd
    path, result = export_mod.export(folder, "f16", tmp_path / "qwen2.gguf")
    assert result.verifier == "llama.cpp"
    # Logits span about +-5; f16 weights move them by 0.015 (measured).
    assert result.top1_agreement == 1.0 and result.max_logit_diff < 0.1, result


# The Split regexes of Llama 3's and Qwen2's tokenizer.json (numbers in threes / one digit at a time).
SPLITS = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+",
}


def _shaped_tokenizer(folder, shape):
    """A small byte-level BPE with the pre-tokenizer of a model family, trained on varied text.

    shape: "gpt-2" (ByteLevel's own regex), "smollm" (single digits, then that regex), "llama-bpe"
    and "qwen2" (their Split regex, then ByteLevel without one); named as llama.cpp names them."""
    from conftest import CHATML
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=shape in ("gpt-2", "smollm"))
    steps = {"gpt-2": [], "smollm": [pre_tokenizers.Digits(individual_digits=True)],
             **{name: [pre_tokenizers.Split(Regex(split), behavior="isolated")] for name, split in SPLITS.items()}}
    steps = steps[shape]
    tok = Tokenizer(models.BPE(ignore_merges=shape == "llama-bpe"))  # as Llama 3's tokenizer.json
    tok.pre_tokenizer = pre_tokenizers.Sequence([*steps, byte_level]) if steps else byte_level
    tok.decoder = decoders.ByteLevel()
    corpus = [t.replace("<|im_start|>", "").replace("<|im_end|>", "") for t in TOKENIZER_TEXTS] * 3 + \
             [f"the answer is {i * 37} or {i}.{i * 3} , said {i}'s  friend\n\tthen   {i * 1001}" for i in range(100)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    tok.add_tokens([AddedToken("<think>", normalized=False, special=False)])  # user-defined, not special
    if shape == "llama-bpe":  # Llama 3 puts its BOS before every text it encodes
        tok.post_processor = processors.TemplateProcessing(
            single="<|im_start|> $A", pair="<|im_start|> $A <|im_start|> $B",
            special_tokens=[("<|im_start|>", tok.token_to_id("<|im_start|>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    return fast


def _assert_llama_cpp_tokenizes_like_hf(folder, path, texts=TOKENIZER_TEXTS):
    """llama.cpp's tokenizer on the GGUF file vs the HF tokenizer of `folder`, token for token."""
    import llama_cpp
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(folder)
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        assert llm.n_vocab() == len(hf)
        for text in texts:
            want = hf.encode(text, add_special_tokens=False)
            got = llm.tokenize(text.encode(), add_bos=False, special=True)
            assert got == want, (text, hf.convert_ids_to_tokens(got), hf.convert_ids_to_tokens(want))
            # With the tokenizer's own BOS/EOS choice on both sides (tokenizer.ggml.add_bos_token).
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == hf.encode(text), text
            assert llm.detokenize(got, special=True).decode() == hf.decode(want), text
    finally:
        llm.close()
    return hf


def _pre_name(path):
    import gguf

    return gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].contents()


def test_llama_cpp_tokenizes_the_tiny_model_like_hf(tiny_model_dir, tmp_path):
    path = write_gguf(tiny_model_dir, tmp_path / "tiny.gguf", "f16").path
    assert _pre_name(path) == "gpt-2"  # ByteLevel's regex; llama.cpp's "default" cuts " 3.14" differently
    _assert_llama_cpp_tokenizes_like_hf(tiny_model_dir, path)


@pytest.mark.parametrize("shape", ["gpt-2", "smollm", "llama-bpe", "qwen2"])
def test_llama_cpp_tokenizes_each_pre_tokenizer_like_hf(tmp_path, shape):
    # The folder is named after no family, so only tokenizer.json can tell the writer the split.
    folder = tmp_path / "tiny"
    _tiny_model(folder, _shaped_tokenizer(folder, shape), "llama", hidden=16, layers=1)
    path = write_gguf(folder, tmp_path / "t.gguf", "f16").path
    assert _pre_name(path) == shape
    hf = _assert_llama_cpp_tokenizes_like_hf(folder, path, [*TOKENIZER_TEXTS, "<think>x</think> <think>"])
    assert hf.convert_ids_to_tokens(hf.encode("<think>", add_special_tokens=False)) == ["<think>"]


@pytest.mark.real
def test_llama_cpp_tokenizes_the_default_model_like_hf(tmp_path):
    """The real default model: ftune's export of its converted folder tokenizes like the HF
    tokenizer ftune trains with, and like llama.cpp on the GGUF file it ships as."""
    import llama_cpp

    from ftune import resources
    from ftune.models.load import resolve_model_path

    cfg = compose([]).cfg
    folder = resolve_model_path(cfg.model)
    path = write_gguf(folder, tmp_path / "smollm2.gguf", "f16").path
    _assert_llama_cpp_tokenizes_like_hf(folder, path)
    ours = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    shipped = llama_cpp.Llama(model_path=str(resources.resolve_path(cfg.model.path)), vocab_only=True, verbose=False)
    try:
        for text in TOKENIZER_TEXTS:
            assert ours.tokenize(text.encode(), add_bos=False, special=True) == \
                shipped.tokenize(text.encode(), add_bos=False, special=True), text
    finally:
        ours.close()
        shipped.close()
