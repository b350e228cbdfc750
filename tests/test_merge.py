"""`ftune merge`: the merged Hugging Face model gives the adapter model's logits; refusals are clear."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from ftune.config.compose import compose
from ftune.errors import FtuneError
from ftune.export.merge import QALORA_GROUPS, merge_run
from ftune.methods.runs import load_run
from ftune.models.load import load
from ftune.train.run import train

IDS = torch.tensor([[5, 17, 42, 7, 99, 3, 250, 11]])


def _run(tiny_overrides, name, *extra):
    train(compose([*tiny_overrides, "train.max_steps=3", "train.lr=1e-2", f"train.run_name={name}", *extra]))


@pytest.mark.parametrize("method", ["lora", "qlora", "dylora", "qalora", "bitfit", "full"])
def test_merged_model_equals_the_adapter_model(tiny_overrides, tmp_path, method):
    from transformers import AutoModelForCausalLM

    _run(tiny_overrides, method, f"method={method}")
    run = tmp_path / "outputs" / method
    out = merge_run(run, tmp_path / "merged", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    cfg = compose([*tiny_overrides, "model.dtype=float32"]).cfg
    adapter_model, _, _ = load_run(run, torch.device("cpu"), current=cfg)
    with torch.no_grad():
        expected = adapter_model(input_ids=IDS).logits
        got = merged(input_ids=IDS).logits
    # bitsandbytes' CPU 4-bit matmul does not round like a dense fp32 matmul (measured max 2e-3 on
    # logits of size ~0.2); every other method folds in exactly.
    atol = 5e-3 if method == "qlora" else 1e-4
    assert torch.allclose(got, expected, atol=atol), (got - expected).abs().max()
    assert getattr(merged.config, "quantization_config", None) is None
    meta = json.loads((out / "ftune_merge.json").read_text())
    assert meta["method"] == method
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] is not None and (out / "tokenizer.json").is_file()
    assert any(p.suffix == ".safetensors" for p in out.iterdir()) and not any(p.suffix == ".bin" for p in out.iterdir())
    # 4-bit QA-LoRA keeps its merged groups for an exact q4_1 export; the folder above still loads.
    assert (out / QALORA_GROUPS).is_file() == (method == "qalora")
    assert ("qalora_group_size" in meta) == (method == "qalora")


def test_merge_refuses_what_cannot_merge_and_never_overwrites(tiny_overrides, tmp_path):
    _run(tiny_overrides, "prompt", "method=prompt")
    with pytest.raises(FtuneError, match="cannot be merged"):
        merge_run(tmp_path / "outputs" / "prompt", tmp_path / "m1")
    _run(tiny_overrides, "lora")
    out = tmp_path / "m2"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FtuneError, match="exists and is not empty"):
        merge_run(tmp_path / "outputs" / "lora", out)
    assert (out / "keep.txt").read_text() == "mine"
    merge_run(tmp_path / "outputs" / "lora", out, dtype="bfloat16", overwrite=True)
    assert not (out / "keep.txt").exists()
    model, _ = load(compose([*tiny_overrides, f"model.path={out}"]).cfg, torch.device("cpu"))
    assert model(input_ids=IDS).logits.shape[-1] > 0


def test_cli_merge(tiny_overrides, tmp_path):
    _run(tiny_overrides, "lora")
    result = subprocess.run([sys.executable, "-m", "ftune.cli", "merge", f"run={tmp_path / 'outputs' / 'lora'}",
                             f"out={tmp_path / 'cli-merged'}"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "cli-merged" / "config.json").is_file()
    bad = subprocess.run([sys.executable, "-m", "ftune.cli", "merge", "runn=x"], capture_output=True, text=True)
    assert bad.returncode == 2 and "valid: run=" in bad.stderr and "Traceback" not in bad.stderr


def test_merged_model_carries_the_training_format_as_its_chat_template(tiny_overrides, tmp_path):
    from transformers import AutoTokenizer

    from ftune.data import templates

    _run(tiny_overrides, "alp", "dataset.template=alpaca")
    out = merge_run(tmp_path / "outputs" / "alp", tmp_path / "merged")
    tok = AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    want = templates.render_prompt(messages, templates.load_template("alpaca"), tok)
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == want
    assert "### Response" in want
