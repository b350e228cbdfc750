"""`ftune export-gguf`: a Hugging Face folder (or a run, merged first) -> one GGUF file for
llama.cpp and ollama, with llama.cpp's tensor names, its metadata keys, the BPE tokenizer and the
chat template.

Written natively with the `gguf` package: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1. Norms and
other 1-D tensors stay f32 (as llama.cpp's own converter does). Llama's q/k projections are
permuted from the Hugging Face rotary layout (halves) to GGML's (interleaved pairs); Qwen2's are
not (llama.cpp runs qwen2 with the halves layout, NEOX rope).
Supported: Llama-architecture models (Llama 2/3, Mistral, SmolLM) and Qwen2.

A merged 4-bit QA-LoRA folder (ftune_qalora/groups.safetensors beside the weights) exported as
q4_1 gets its quantised layers written from the INT codes, scales and zero-points themselves:
a q4_1 block (value = d*q + m over 32 weights of a row) holds w = s*(q - z) exactly with d = s and
m = -s*z whenever the group size is a multiple of 32, so only the f16 rounding of d and m is lost.
Re-quantising the dequantised weights instead re-fits every block's min/max, which moves the codes
as soon as a 32-block does not span its group's full code range (groups of 64 and more).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file

from ftune.errors import FtuneError
from ftune.export.merge import QALORA_GROUPS

NATIVE = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
ARCHES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
# Hugging Face parameter suffix -> GGUF tensor name suffix, per block.
BLOCK = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
         "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
         "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
         "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
         "self_attn.v_proj.bias": "attn_v.bias",
         "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
         "mlp.down_proj.weight": "ffn_down.weight"}
TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
       "lm_head.weight": "output.weight"}
# Pre-tokenizer names llama.cpp knows (it picks its split regex by this name), by model family: the
# fallback when tokenizer.json's pre_tokenizer has none of the shapes _pre_tokenizer recognises.
PRE = {"smollm": "smollm", "llama-3": "llama-bpe", "llama3": "llama-bpe", "qwen": "qwen2"}
# The Split regexes of Llama 3's and Qwen2's tokenizer.json (as quoted in llama.cpp's llama-vocab.cpp).
SPLIT_PRE = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "qwen2",
}
Q4_1_BLOCK = 32  # weights per q4_1 block, along a row
# What a QA-LoRA folder exported as q4_0 tells the user (they asked for 4-bit and get a re-fit).
Q4_0_NOTE = ("q4_0 stores no zero-point (value = d*(q-8)), so QA-LoRA's merged zero-points cannot be kept: "
             "its layers were re-quantised from the merged weights; --quant q4_1 writes them exactly.")


@dataclass
class Written:
    """What write_gguf wrote: the file, the QA-LoRA layers written as exact q4_1 blocks, and notes
    for the user (what was written directly, or why a QA-LoRA run had to be re-quantised)."""

    path: Path
    direct_layers: int = 0
    notes: list[str] = field(default_factory=list)


def gguf_name(hf_name: str) -> str | None:
    if hf_name in TOP:
        return TOP[hf_name]
    parts = hf_name.split(".")
    if len(parts) > 3 and parts[0] == "model" and parts[1] == "layers":
        suffix = BLOCK.get(".".join(parts[3:]))
        return f"blk.{parts[2]}.{suffix}" if suffix else None
    return None


def permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotary layout (first half / second half of each head) -> GGML's interleaved pairs."""
    shape = w.shape
    return w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def to_ggml_rows(array: np.ndarray, arch: str, name: str, n_head: int, n_kv: int) -> np.ndarray:
    """Llama's q/k rows in GGML's rotary order; works on weights and on per-row codes/scales/zeros."""
    if arch == "llama" and name.endswith("attn_q.weight"):
        return permute_rotary(array, n_head)
    if arch == "llama" and name.endswith("attn_k.weight"):
        return permute_rotary(array, n_kv)
    return array


def q4_1_blocks(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """GGML q4_1 bytes (rows x blocks*20) of w = scale*(codes - zero), groups along each row.

    Each block of 32 weights: d (f16), m (f16), then 16 bytes where byte j holds code j in its low
    nibble and code j+16 in its high one; llama.cpp reads the weight as d*q + m.
    """
    rows, cols = codes.shape
    if cols % Q4_1_BLOCK or (cols // scale.shape[1]) % Q4_1_BLOCK:
        raise ValueError(f"{cols} columns in groups of {cols // scale.shape[1]} do not fill q4_1 blocks")
    if codes.max(initial=0) > 15:
        raise ValueError("q4_1 holds 4-bit codes (0..15)")
    per_group = cols // scale.shape[1] // Q4_1_BLOCK
    scale = scale.astype(np.float32)
    d = np.repeat(scale, per_group, axis=1).astype("<f2")
    m = np.repeat(-scale * zero.astype(np.float32), per_group, axis=1).astype("<f2")
    q = codes.astype(np.uint8).reshape(rows, cols // Q4_1_BLOCK, Q4_1_BLOCK)
    packed = q[..., :16] | (q[..., 16:] << 4)
    blocks = np.concatenate([d[..., None].view(np.uint8), m[..., None].view(np.uint8), packed], axis=-1)
    return np.ascontiguousarray(blocks.reshape(rows, -1))


def qalora_groups(folder: Path, quant: str, notes: list[str]) -> dict[str, tuple[np.ndarray, ...]]:
    """HF weight name -> (codes, scale, zero) of the merged QA-LoRA layers to write as q4_1 blocks.

    Empty when the folder has none, the type is not q4_1, or the groups do not fill q4_1 blocks; the
    last two add a note, since the user asked for a 4-bit type and gets a re-quantised one.
    """


    path = folder / QALORA_GROUPS
    if not path.is_file() or quant not in ("q4_0", "q4_1"):
        return {}
    if quant == "q4_0":
        notes.append(Q4_0_NOTE)
        return {}
    tensors = load_file(str(path))
    modules = sorted({key.rsplit(".", 1)[0] for key in tensors})
    if not modules:
        return {}
    meta_file = folder / "ftune_merge.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    # ftune merge records it; the shapes give it too (columns per scale) for a hand-made folder.
    group = meta.get("qalora_group_size") or \
        tensors[f"{modules[0]}.codes"].shape[1] // tensors[f"{modules[0]}.scale"].shape[1]
    if group % Q4_1_BLOCK:
        notes.append(f"QA-LoRA group size {group} is not a multiple of q4_1's {Q4_1_BLOCK}-weight blocks, so its "
                     "layers were re-quantised from the merged weights (method.group_size=32/64/128 exports exactly).")
        return {}
    return {f"{m}.weight": (tensors[f"{m}.codes"], tensors[f"{m}.scale"], tensors[f"{m}.zero"]) for m in modules}


def weight_files(folder: Path) -> list[Path]:
    """The model's safetensors files (not ftune's QA-LoRA groups file beside them)."""
    return sorted(p for p in folder.glob("*.safetensors") if p.name != QALORA_GROUPS)


def tensor_type(name: str, array: np.ndarray, quant: str) -> Any:
    import gguf

    q = gguf.GGMLQuantizationType
    if array.ndim == 1 or quant == "f32":
        return q.F32
    if name in ("token_embd.weight", "output.weight") and quant.startswith(("q4", "q5")):
        # The embedding (and the output head, often tied to it) sets every logit: 4/5-bit there costs
        # far more than in the blocks (measured on SmolLM2 q4_0: top-1 agreement 62% vs 8-bit kept).
        quant = "q8_0"
    chosen = {"f16": q.F16, "bf16": q.BF16, "q8_0": q.Q8_0, "q4_0": q.Q4_0, "q4_1": q.Q4_1,
              "q5_0": q.Q5_0, "q5_1": q.Q5_1}[quant]
    block = gguf.GGML_QUANT_SIZES[chosen][0]
    return chosen if array.shape[-1] % block == 0 else q.F16  # rows that do not fill blocks


def _pre_tokenizer(folder: Path, config: dict, data: dict) -> str:
    """llama.cpp's name for the split that tokenizer.json (`data`) does before its byte-level BPE.

    A plain ByteLevel pre-tokenizer splits with GPT-2's regex: "gpt-2". llama.cpp's "default" is
    not that (it splits punctuation runs and numbers off their space, numbers in threes). A
    tokenizer.json with none of the shapes below falls back to the model family's name.
    """
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    last = steps[-1] if steps else {}
    if kinds and kinds[-1] == "ByteLevel" and not last.get("add_prefix_space", False):
        regex = last.get("use_regex", True)
        if kinds == ["ByteLevel"] and regex:
            return "gpt-2"
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and regex:
            return "smollm"  # each digit alone, then GPT-2's regex
        if kinds == ["Split", "ByteLevel"] and not regex and steps[0].get("behavior") == "Isolated":
            name = SPLIT_PRE.get((steps[0].get("pattern") or {}).get("Regex"))
            if name:
                return name
    text = (json.dumps(config) + str(folder)).lower()
    return next((value for key, value in PRE.items() if key in text), "default")


def write_tokenizer(writer: Any, folder: Path, tokenizer: Any, config: dict) -> None:
    import gguf

    data = json.loads((folder / "tokenizer.json").read_text())
    if data["model"]["type"] != "BPE":
        raise FtuneError(f"{folder}: tokenizer type {data['model']['type']} is not supported for GGUF export (BPE only)")
    vocab = tokenizer.get_vocab()
    size = max(config["vocab_size"], len(vocab))
    by_id = {i: t for t, i in vocab.items()}
    special = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    added = {t.content for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(size):
        token = by_id.get(i, f"[PAD{i}]")
        tokens.append(token)
        kind = gguf.TokenType.CONTROL if token in special else gguf.TokenType.USER_DEFINED if token in added else \
            gguf.TokenType.UNUSED if i not in by_id else gguf.TokenType.NORMAL
        types.append(kind)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(folder, config, data))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for setter, token in (("add_bos_token_id", tokenizer.bos_token), ("add_eos_token_id", tokenizer.eos_token),
                          ("add_pad_token_id", tokenizer.pad_token), ("add_unk_token_id", tokenizer.unk_token)):
        if token is not None and token in vocab:
            getattr(writer, setter)(vocab[token])
    # llama.cpp adds BOS/EOS to a text it encodes only when the file says to: say what the HF
    # tokenizer does (Llama 3 puts its BOS first; SmolLM2 and Qwen2 add nothing).
    plain, full = (tokenizer("a", add_special_tokens=flag)["input_ids"] for flag in (False, True))
    bos, eos = [tokenizer.bos_token_id], [tokenizer.eos_token_id]
    writer.add_add_bos_token(full in (bos + plain, bos + plain + eos))
    writer.add_add_eos_token(full in (plain + eos, bos + plain + eos))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def write_gguf(folder: str | Path, out: str | Path, quant: str = "q8_0") -> Written:
    """Write `folder` (a Hugging Face model folder) as a GGUF file at `out`."""
    import gguf
    from transformers import AutoTokenizer

    folder, out = Path(folder), Path(out)
    config = json.loads((folder / "config.json").read_text())
    arch_name = (config.get("architectures") or ["?"])[0]
    arch = ARCHES.get(arch_name)
    if arch is None:
        raise FtuneError(f"{folder}: architecture {arch_name} cannot be exported to GGUF yet",
                         [f"supported: {', '.join(sorted(ARCHES))}"], "Export a Llama/Mistral/SmolLM or Qwen2 model.")
    if quant not in NATIVE:
        raise FtuneError(f"--quant {quant} is not written natively", [f"native: {', '.join(NATIVE)}"])
    files = weight_files(folder)
    if not files:
        raise FtuneError(f"{folder}: no .safetensors weights", hint="Merge the run first: ftune merge run=…")
    written = Written(out)
    groups = qalora_groups(folder, quant, written.notes)
    check_groups(files, groups)
    n_head, n_kv = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), arch)
    writer.add_name(folder.name)
    writer.add_context_length(config.get("max_position_embeddings", 4096))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_rope_freq_base(float(config.get("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta", 10000.0))))
    writer.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // n_head)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type({"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "bf16": 32}[quant])
    write_tokenizer(writer, folder, AutoTokenizer.from_pretrained(folder), config)
    for file in files:
        with safe_open(str(file), "pt") as f:
            for hf_name in f.keys():
                name = gguf_name(hf_name)
                if name is None:
                    if "rotary_emb" in hf_name:
                        continue
                    raise FtuneError(f"{file.name}: tensor {hf_name} has no llama.cpp name")
                if hf_name in groups:
                    codes, scale, zero = (to_ggml_rows(a, arch, name, n_head, n_kv) for a in groups[hf_name])
                    writer.add_tensor(name, q4_1_blocks(codes, scale, zero), raw_dtype=gguf.GGMLQuantizationType.Q4_1)
                    written.direct_layers += 1
                    continue
                array = to_ggml_rows(f.get_tensor(hf_name).float().numpy(), arch, name, n_head, n_kv)
                kind = tensor_type(name, array, quant)
                writer.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), kind),
                                  raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    if written.direct_layers:
        written.notes.append(f"{written.direct_layers} QA-LoRA layers written as q4_1 blocks without re-quantisation")
    return written


def check_groups(files: list[Path], groups: dict[str, tuple[np.ndarray, ...]]) -> None:
    """Every QA-LoRA layer must be a weight of the same shape in the folder: a groups file left from
    another merge (or a model edited after merging) would otherwise put the wrong weights in the GGUF."""

    if not groups:
        return
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        with safe_open(str(file), "pt") as f:
            shapes.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
    problems = [f"{name}: {'missing' if name not in shapes else f'shape {shapes[name]}'} vs codes {codes.shape}"
                for name, (codes, _, _) in groups.items() if shapes.get(name) != codes.shape]
    if problems:
        raise FtuneError("the QA-LoRA groups beside the weights do not match them", problems,
                         "Merge the run again (ftune merge), or delete ftune_qalora/groups.safetensors "
                         "to export the weights as they are.")
