"""`ftune export-gguf`: write, optionally k-quantise, and verify a GGUF file.

Flow: a run directory is merged first (float32, in a temporary folder); the Hugging Face folder is
written natively (gguf_writer.py); k-quants (q4_k_m, q5_k_m, q6_k, …) are made from an f16 file by
llama.cpp's own quantiser through llama-cpp-python. Then the file is verified: loaded again, fixed
prompts are run, and top-1 agreement and the largest logit difference against the Hugging Face
model are reported. The verifier is llama.cpp (llama-cpp-python) when installed, otherwise
transformers' own GGUF reader (an independent reader of the same file, but not llama.cpp).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ftune.errors import FtuneError
from ftune.export.gguf_writer import NATIVE, write_gguf
from ftune.export.merge import merge_run
from ftune.models.runs import is_run_dir

# llama.cpp file types (llama.h, enum llama_ftype) of the k-quants.
K_QUANTS = {"q2_k": 10, "q3_k_s": 11, "q3_k_m": 12, "q3_k_l": 13, "q4_k_s": 14, "q4_k_m": 15, "q5_k_s": 16,
            "q5_k_m": 17, "q6_k": 18}
PROMPTS = ["What is the capital of France?", "Write the number 42 in words.", "Name three colours."]


@dataclass
class Verification:
    verifier: str
    top1_agreement: float
    max_logit_diff: float
    answers: list[str]


def has_llama_cpp() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def k_quantize(f16_file: Path, out: Path, quant: str) -> Path:
    if not has_llama_cpp():
        raise FtuneError(f"--quant {quant} (a k-quant) needs llama.cpp's quantiser",
                         [f"written natively without it: {', '.join(NATIVE)}"],
                         "pip install llama-cpp-python (builds llama.cpp, ~5 minutes), or pick a native type.")
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = K_QUANTS[quant]
    code = llama_cpp.llama_model_quantize(str(f16_file).encode(), str(out).encode(), params)
    if code != 0:
        raise FtuneError(f"llama.cpp could not quantise {f16_file} to {quant} (code {code})")
    return out


def prompt_ids(tokenizer: Any) -> list[list[int]]:
    out = []
    for text in PROMPTS:
        messages = [{"role": "user", "content": text}]
        if tokenizer.chat_template:
            rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            rendered = text
        out.append(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    return out


def verify(folder: Path, gguf_file: Path) -> Verification:
    """Load the GGUF file again and compare its logits on fixed prompts with the HF model's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    agree, total, worst, answers = 0, 0, 0.0, []
    runner = _llama_cpp_logits if has_llama_cpp() else _transformers_logits
    for ids in prompt_ids(tokenizer):
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].numpy()
        out, answer = runner(gguf_file, ids, tokenizer)
        agree += int((out.argmax(-1) == ref.argmax(-1)).sum())
        total += len(ids)
        worst = max(worst, float(np.abs(out - ref).max()))
        answers.append(answer)
    return Verification("llama.cpp" if has_llama_cpp() else "transformers", agree / total, worst, answers)


def _llama_cpp_logits(gguf_file: Path, ids: list[int], tokenizer: Any) -> tuple[np.ndarray, str]:
    from llama_cpp import Llama

    try:
        llm = Llama(str(gguf_file), logits_all=True, verbose=False, n_ctx=512)
    except Exception as exc:  # noqa: BLE001  (llama.cpp refuses the file: that is the finding)
        raise FtuneError(f"llama.cpp could not load {gguf_file}: {exc}") from None
    llm.eval(ids)
    logits = np.array(llm.scores[:len(ids)], dtype=np.float32)
    return logits, _greedy(llm, ids, tokenizer)


def _greedy(llm: Any, ids: list[int], tokenizer: Any, n: int = 24) -> str:
    llm.reset()
    out = []
    for token in llm.generate(ids, temp=0.0):
        if token == llm.token_eos() or token == tokenizer.eos_token_id or len(out) >= n:
            break
        out.append(token)
    return tokenizer.decode(out, skip_special_tokens=True).strip()


def _transformers_logits(gguf_file: Path, ids: list[int], tokenizer: Any) -> tuple[np.ndarray, str]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].numpy()
        gen = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return logits, tokenizer.decode(gen[0, len(ids):], skip_special_tokens=True).strip()


def modelfile(gguf_file: Path, folder: Path) -> Path:
    """An ollama Modelfile next to the GGUF file (the chat template travels inside the GGUF file;
    ollama reads it from there, so the Modelfile only names the file and the stop token)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    gen = json.loads((folder / "generation_config.json").read_text()) if (folder / "generation_config.json").is_file() else {}
    eos = gen.get("eos_token_id", tokenizer.eos_token_id)
    stops = [tokenizer.convert_ids_to_tokens(i) for i in (eos if isinstance(eos, list) else [eos]) if i is not None]
    lines = [f"FROM ./{gguf_file.name}", *(f'PARAMETER stop "{s}"' for s in stops)]
    path = gguf_file.with_name("Modelfile")
    path.write_text("\n".join(lines) + "\n")
    return path


def export(source: str | Path, quant: str = "q8_0", out: str | Path | None = None, check: bool = True,
           write_modelfile: bool = False, notes: list[str] | None = None) -> tuple[Path, Verification | None]:
    """Export a merged folder or a run directory; returns (file, verification or None).

    `notes`, when given, receives one line per thing the user should know about how the file was
    written (QA-LoRA layers written exactly as q4_1 blocks, or why they were re-quantised)."""
    source = Path(source)
    quant = quant.lower()
    if quant not in NATIVE and quant not in K_QUANTS:
        raise FtuneError(f"--quant {quant} is unknown", [f"native: {', '.join(NATIVE)}",
                                                         f"k-quants (llama.cpp): {', '.join(K_QUANTS)}"])
    if not source.exists():
        raise FtuneError(f"{source} does not exist", hint="Give a merged model folder (ftune merge) or a run directory.")
    with tempfile.TemporaryDirectory(prefix="ftune-export-") as tmp:
        folder = source
        if is_run_dir(source):

            folder = merge_run(source, Path(tmp) / "merged", dtype="float32")
        elif not (source / "config.json").is_file():
            raise FtuneError(f"{source} is neither a model folder (config.json) nor a run directory (config.yaml)")
        target = Path(out) if out else Path("gguf") / f"{source.name}-{quant}.gguf"
        if quant in K_QUANTS:
            f16 = write_gguf(folder, Path(tmp) / "f16.gguf", "f16")
            target.parent.mkdir(parents=True, exist_ok=True)
            k_quantize(f16.path, target, quant)
        else:
            written = write_gguf(folder, target, quant)
            if notes is not None:
                notes.extend(written.notes)
        result = verify(folder, target) if check else None
        if write_modelfile:
            modelfile(target, folder)
    return target, result
