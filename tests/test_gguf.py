"""`ftune export-gguf`: names, permutation, tokenizer and metadata are checked by loading the file
back (llama.cpp when installed, else transformers' GGUF reader) and comparing logits."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from ftune.config.compose import compose
from ftune.errors import FtuneError
from ftune.export import gguf as export_mod
from ftune.export.gguf_writer import gguf_name, permute_rotary
from ftune.train.run import train


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


@pytest.mark.skipif(not export_mod.has_llama_cpp(), reason="llama-cpp-python not installed")
def test_k_quant_through_llama_cpp(lora_run, tmp_path):
    path, result = export_mod.export(lora_run, "q6_k", tmp_path / "k.gguf")
    assert result.verifier == "llama.cpp" and path.stat().st_size > 0 and result.top1_agreement >= 0.5
