"""QA-LoRA in a bf16 run: the model reloaded from the run, its merge and its q4_1 GGUF export all
hold the INT4 codes, scales and zero-points training ended with, bit for bit.

The tiny model is saved in fp32 and a bf16 run loads it rounded to bf16, so quantising the fp32
weights instead (what a float32 reload or merge sees) moves some codes by one step: the case
these tests catch."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from ftune.config.compose import compose
from ftune.export.merge import QALORA_GROUPS, merge_run
from ftune.methods.runs import load_run
from ftune.train.run import train

IDS = torch.tensor([[5, 17, 42, 7, 99, 3, 250, 11]])
GROUP = 32
FIELDS = ("codes", "scale", "zero")


def _groups(model):
    """{module name: (codes, scale, zero)} of every QA-LoRA layer (adapted or merged)."""
    from ftune.methods.qalora import GroupQuantLinear, QALoraLinear

    found = {}
    for name, module in model.named_modules():
        base = module.base if isinstance(module, QALoraLinear) else module
        if isinstance(base, GroupQuantLinear) and not name.endswith(".base"):
            found[name] = tuple(getattr(base, f).detach().cpu().clone() for f in FIELDS)
    return found


@pytest.fixture(scope="module")
def bf16_run(tiny_model_dir, tmp_path_factory):
    """A 3-step bf16 QA-LoRA run, and what its model held when training saved it: the groups, the
    groups of its merge (QALoraLinear.merged of the in-memory layers) and its logits on IDS."""
    import ftune.train.run as run_mod
    from ftune.methods.qalora import QALoraLinear

    tmp = tmp_path_factory.mktemp("qalora-bf16")
    overrides = [f"model.path={tiny_model_dir}", "model.name=tiny", "hardware.precision=bf16", "model.dtype=bfloat16",
                 f"train.output_dir={tmp / 'outputs'}", "train.sample_max_new_tokens=0", "train.tensorboard=false",
                 "dataset.max_rows=64", "train.micro_batch_size=4", "train.eval_every=0", "train.save_every=0",
                 "dataset.max_seq_len=128", "train.max_steps=3", "train.lr=1e-2", "train.run_name=qalora-bf16",
                 "method=qalora", "method.r=4", f"method.group_size={GROUP}"]
    seen = {}
    original = run_mod.save_trained

    def capture(model, *args, **kwargs):
        with torch.no_grad():
            seen["logits"] = model(input_ids=IDS).logits.float()
        seen["groups"] = _groups(model)
        seen["merged"] = {name: tuple(getattr(m.merged(), f).detach().clone() for f in FIELDS)
                          for name, m in model.named_modules() if isinstance(m, QALoraLinear)}
        return original(model, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_mod, "save_trained", capture)
        train(compose(overrides))
    assert seen["groups"] and next(iter(seen["groups"].values()))[1].dtype == torch.float32
    return tmp / "outputs" / "qalora-bf16", seen


def _assert_same(got, expected):
    assert got.keys() == expected.keys()
    for name in expected:
        for field, a, b in zip(FIELDS, got[name], expected[name]):
            assert a.dtype == b.dtype and torch.equal(a, b), \
                f"{name}.{field}: {(a.float() != b.float()).sum().item()} of {b.numel()} differ"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_reloaded_run_has_the_trained_groups(bf16_run, tiny_model_dir, dtype):
    """Whatever dtype the reloading config picks (eval, a later stage), the groups are the trained ones."""
    run, seen = bf16_run
    current = compose([f"model.path={tiny_model_dir}", "model.name=tiny", f"model.dtype={dtype}"]).cfg
    model, _, _ = load_run(run, torch.device("cpu"), current=current)
    _assert_same(_groups(model), seen["groups"])


def test_merge_keeps_the_trained_groups_and_logits(bf16_run, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    run, seen = bf16_run
    out = merge_run(run, tmp_path / "merged", dtype="bfloat16")
    saved = load_file(out / QALORA_GROUPS)
    # The merge is a zero-point shift computed in fp32 from the same tensors: exact, not close.
    _assert_same({name: tuple(saved[f"{name}.{f}"] for f in FIELDS) for name in seen["merged"]}, seen["merged"])
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    with torch.no_grad():
        got = merged(input_ids=IDS).logits.float()
    # Same groups, so what remains is bf16 rounding: the trained model adds its fp32 update to a bf16
    # matmul of the base, the merged one rounds base + update into one bf16 weight. One bf16 step at
    # the logits' size (8 significant bits) is measured; two are allowed. Re-quantised codes: four.
    step = 2.0 ** (torch.floor(torch.log2(seen["logits"].abs().max())).item() - 7)
    diff = (got - seen["logits"]).abs().max().item()
    assert diff <= 2 * step, f"max |logits difference| {diff} vs a bf16 step of {step}"


def test_q4_1_export_writes_the_trained_groups(bf16_run, tmp_path):
    import gguf

    from ftune.export.gguf_writer import gguf_name, q4_1_blocks, to_ggml_rows, write_gguf

    run, seen = bf16_run
    written = write_gguf(merge_run(run, tmp_path / "merged", dtype="bfloat16"), tmp_path / "q.gguf", "q4_1")
    assert written.direct_layers == len(seen["merged"])
    tensors = {t.name: t for t in gguf.GGUFReader(written.path).tensors}
    for module, groups in seen["merged"].items():
        name = gguf_name(f"{module}.weight")
        assert tensors[name].tensor_type == gguf.GGMLQuantizationType.Q4_1
        expected = q4_1_blocks(*(to_ggml_rows(t.numpy(), "llama", name, 4, 2) for t in groups))
        got = np.asarray(tensors[name].data).reshape(expected.shape)
        assert np.array_equal(got, expected), f"{name}: {(got != expected).sum()} bytes differ"


def test_run_without_saved_groups_requantises_in_its_training_dtype(bf16_run, tmp_path, capsys):
    """A run saved before the groups were kept: merged from the base rounded to the run's dtype."""
    from safetensors.torch import load_file

    run, seen = bf16_run
    old = tmp_path / "old-run"
    shutil.copytree(run, old)
    (old / "adapter" / "qalora_base.safetensors").unlink(missing_ok=True)
    out = merge_run(old, tmp_path / "merged", dtype="float32")
    assert "re-quantised from the base in bfloat16" in capsys.readouterr().err
    saved = load_file(out / QALORA_GROUPS)
    _assert_same({name: tuple(saved[f"{name}.{f}"] for f in FIELDS) for name in seen["merged"]}, seen["merged"])


def test_saved_groups_are_compact_and_say_what_they_were_fitted_to(bf16_run):
    from safetensors import safe_open

    from ftune.methods.qalora import BASE_STATE, pack_codes, unpack_codes

    run, seen = bf16_run
    with safe_open(str(run / "adapter" / BASE_STATE), "pt") as f:
        assert f.metadata()["quantised_from"] == "bfloat16" and f.metadata()["bits"] == "4"
        for name, (codes, _, _) in seen["groups"].items():
            stored = f.get_tensor(f"{name}.codes")
            assert stored.dtype == torch.uint8 and stored.shape == (codes.shape[0], codes.shape[1] // 2)
            assert torch.equal(unpack_codes(stored, codes.shape[1]), codes)
    wide = torch.randint(0, 256, (3, 5), dtype=torch.uint8)  # 8-bit codes, odd width: stored as they are
    assert pack_codes(wide, 8) is wide and unpack_codes(wide, 5) is wide
