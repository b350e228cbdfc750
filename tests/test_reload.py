"""A trained run's saved result, reloaded, gives the logits of the model that was trained.

Each method trains a short real run on the tiny model (`ftune train` end to end). The logits of
the trained model are taken in memory as the run saves it; the saved folder is then reloaded
(a) by ftune (`load_run`, how stages chain and `ftune eval` read a run) and (b) for peft-backed
methods, by plain transformers + peft in a separate Python process that never imports ftune
(what a user without ftune does). Both must reproduce the trained logits to fp32 precision.

One module-scoped fixture trains the selected methods and runs a single subprocess for all of
them; the parametrized test then checks one method each.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TOL = dict(rtol=1e-5, atol=1e-5)
TEXT = "What is the capital of France? Paris."
DYLORA_CUT = 4

# case -> (overrides, reloads in plain peft)
CASES = {
    "lora": (["method=lora", "method.r=4"], True),
    "lora-dora": (["method=lora", "method.r=4", "method.use_dora=true"], True),
    "lora-rslora": (["method=lora", "method.r=4", "method.use_rslora=true"], True),
    "lora-pissa": (["method=lora", "method.r=4", "method.init=pissa"], True),
    "lora-attn": (["method=lora-attn", "method.r=4"], True),
    "qlora": (["method=qlora", "method.r=4"], True),
    "prompt": (["method=prompt", "method.num_virtual_tokens=5"], True),
    "prompt-text": (["method=prompt", "method.num_virtual_tokens=5", "method.init_text=answer the question"], True),
    "ptuning": (["method=ptuning", "method.num_virtual_tokens=5", "method.encoder_hidden_size=32"], True),
    "ptuning-lstm": (["method=ptuning", "method.num_virtual_tokens=5", "method.encoder_hidden_size=32",
                      "method.encoder=lstm"], True),
    "prefix": (["method=prefix", "method.num_virtual_tokens=5", "method.encoder_hidden_size=32"], True),
    "ptuning-v2": (["method=ptuning-v2", "method.num_virtual_tokens=5"], True),
    "ia3": (["method=ia3"], True),
    "loha": (["method=loha", "method.r=4"], True),
    "lokr": (["method=lokr", "method.r=4"], True),
    "vera": (["method=vera", "method.r=16"], True),
    # 6 steps: one before pruning, then budget updates, the last two with the final rank pattern
    "adalora": (["method=adalora", "method.init_r=6", "method.target_r=2", "method.tinit=0.2", "method.tfinal=0.35",
                 "train.max_steps=6"], True),
    # ftune's own folders: reloaded by ftune only
    "adapter": (["method=adapter", "method.bottleneck=8"], False),
    "bitfit": (["method=bitfit"], False),
    "dylora": (["method=dylora", "method.r=8"], False),
    # the saved adapter cut to rank 4: it must give the trained model evaluated at rank 4
    "dylora-cut": (["method=dylora", "method.r=8", f"method.save_rank={DYLORA_CUT}"], False),
}

# Run in a fresh interpreter that imports torch, transformers, peft and safetensors only: loads each
# job's base and adapter and writes its logits; fails if ftune was imported along the way.
PLAIN_PEFT = r"""
import json, sys
import torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

for job in json.loads(open(sys.argv[1]).read()):
    kwargs = {"dtype": torch.float32}
    if job["quantization"]:
        q = dict(job["quantization"], bnb_4bit_compute_dtype=torch.float32)
        kwargs.update(quantization_config=BitsAndBytesConfig(**q), device_map={"": "cpu"})
    base = AutoModelForCausalLM.from_pretrained(job["base"], **kwargs)
    model = PeftModel.from_pretrained(base, job["adapter"]).eval()
    for module in model.modules():  # bitsandbytes' 4-bit layers: the kernel training used
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    ids = torch.tensor([job["ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    save_file({"logits": logits.contiguous()}, job["out"])
assert not [m for m in sys.modules if m == "ftune" or m.startswith("ftune.")], "ftune was imported"
print("plain peft reload: ok")
"""


def _selected(request) -> list[str]:
    """The cases this session runs (all of them unless -k picked some)."""
    picked = [item.callspec.params["case"] for item in request.session.items
              if getattr(item, "originalname", "") == "test_trained_run_reloads_with_its_trained_logits"]
    return [c for c in CASES if c in picked]


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.detach().cpu().clone()
    model.train(was_training)
    return out


def same_4bit_kernel(model) -> None:
    """A reloaded 4-bit base computes with the kernel training used.

    In eval mode without grad, bitsandbytes' Linear4bit on a CPU with AVX512-BF16 repacks its
    weight for an inference kernel whose numbers differ from the training path's (logits ~2e-3
    apart on the tiny model, measured): a property of the frozen base's matmul, not of the
    adapter, so both reloads here use the training path."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


@pytest.fixture(scope="module")
def reloads(request, tiny_model_dir, tmp_path_factory):
    """case -> {trained, base, ftune, peft (or None), summary, folder}: logits and facts of each run."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import ftune.train.run as run_module
    from ftune.config.compose import compose
    from ftune.methods.runs import load_run

    cases = _selected(request)
    root = tmp_path_factory.mktemp("reload")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = torch.tensor([tok(TEXT)["input_ids"]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    base_logits = _logits(base, ids)
    common = [f"model.path={tiny_model_dir}", "model.name=tiny", "hardware.precision=fp32",
              f"train.output_dir={root / 'outputs'}", "train.sample_max_new_tokens=0", "train.tensorboard=false",
              "dataset.max_rows=32", "dataset.eval_max_rows=8", "train.micro_batch_size=4", "train.eval_every=0",
              "train.save_every=0", "dataset.max_seq_len=128", "train.max_steps=2", "train.lr=1e-2"]
    captured: dict[str, torch.Tensor] = {}
    original_save = run_module.save_trained

    def save_and_capture(model, *args, **kwargs):
        captured["trained"] = _logits(model, ids)  # the model as trained, before anything is written
        if getattr(args[1], "name", None) == "dylora":
            from ftune.methods.dylora import dylora_layers, set_rank

            full = dylora_layers(model)[0].rank
            set_rank(model, DYLORA_CUT)
            captured["cut"] = _logits(model, ids)
            set_rank(model, full)
        return original_save(model, *args, **kwargs)

    results, jobs = {}, []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_module, "save_trained", save_and_capture)
        for case in cases:
            overrides, plain = CASES[case]
            if case == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
                results[case] = None
                continue
            captured.clear()
            composed = compose([*common, *overrides, f"train.run_name={case}"])
            summary = run_module.train(composed)
            run_dir = Path(summary["run_dir"])
            model, _, _ = load_run(run_dir, torch.device("cpu"))
            same_4bit_kernel(model)
            results[case] = {"trained": captured["trained"], "cut": captured.get("cut"), "base": base_logits,
                             "ftune": _logits(model, ids), "summary": summary, "folder": run_dir / "adapter",
                             "cfg": composed.cfg, "peft": None}
            if plain:
                m = composed.cfg.model
                quant = ({"load_in_4bit": True, "bnb_4bit_quant_type": m.bnb_4bit_quant_type,
                          "bnb_4bit_use_double_quant": m.bnb_4bit_use_double_quant}
                         if m.quantization == "4bit" else None)
                jobs.append({"case": case, "base": str(tiny_model_dir), "adapter": str(run_dir / "adapter"),
                             "quantization": quant, "ids": ids[0].tolist(), "out": str(root / f"{case}.safetensors")})
    if jobs:
        (root / "jobs.json").write_text(json.dumps(jobs))
        done = subprocess.run([sys.executable, "-c", PLAIN_PEFT, str(root / "jobs.json")], capture_output=True,
                              text=True, timeout=600, cwd=root)
        assert done.returncode == 0, done.stderr[-3000:]
        for job in jobs:
            results[job["case"]]["peft"] = load_file(job["out"])["logits"]
    return results


@pytest.mark.parametrize("case", list(CASES))
def test_trained_run_reloads_with_its_trained_logits(case, reloads):
    result = reloads[case]
    if result is None:
        pytest.skip("bitsandbytes not installed")
    summary = result["summary"]
    trained = result["cut"] if case == "dylora-cut" else result["trained"]
    # Not trivially true: training changed the model, and the trained model is not the base.
    assert summary["eval_loss_after"] != summary["eval_loss_before"]
    # (prompt tuning and p-tuning return logits for the virtual tokens too: compare the text's)
    assert (trained[:, -result["base"].shape[1]:] - result["base"]).abs().max() > 1e-3
    torch.testing.assert_close(result["ftune"], trained, **TOL, msg=lambda m: f"{case}, ftune's reload: {m}")
    if CASES[case][1]:
        torch.testing.assert_close(result["peft"], trained, **TOL, msg=lambda m: f"{case}, plain peft: {m}")
    if case == "dylora-cut":  # the cut is a different model from the full rank, and really rank 4
        assert (result["cut"] - result["trained"]).abs().max() > 1e-3
        saved = load_file(str(result["folder"] / "adapter.safetensors"))
        assert {t.shape[0] for n, t in saved.items() if n.endswith("lora_A")} == {DYLORA_CUT}
    if case == "adalora":  # the budget update pruned ranks: the reload resizes to the saved rank pattern
        saved = json.loads((result["folder"] / "adapter_config.json").read_text())["rank_pattern"]
        assert saved and min(sum(mask) for mask in saved.values()) < 6
    if case == "adapter":  # Houlsby: the trained norms are saved with the bottlenecks
        from transformers import AutoConfig

        saved = load_file(str(result["folder"] / "adapter.safetensors"))
        base = load_file(str(Path(result["cfg"].model.path) / "model.safetensors"))
        norms = {n: t for n, t in saved.items() if "norm" in n}
        config = AutoConfig.from_pretrained(result["cfg"].model.path)
        assert len(norms) == 2 * config.num_hidden_layers + 1  # two per decoder layer and the final one
        assert all(not torch.equal(t, base[n]) for n, t in norms.items()), "the norms were trained"


def test_dylora_cut_is_made_from_the_gathered_tensors(tiny_model_dir):
    """Sharded runs (FSDP) pass whole tensors gathered from the shards: the cut is made from those,
    not from the model's own (sharded) parameters."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from ftune.methods import Setup, apply
    from ftune.methods.dylora import DyLoraConfig
    from ftune.methods.saving import native_state

    method = DyLoraConfig(r=8, save_rank=DYLORA_CUT, target_modules=["q_proj"])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = apply(base, SimpleNamespace(method=method), Setup(total_steps=1, model_path=str(tiny_model_dir)))
    gathered = {n: torch.randn_like(p) for n, p in model.named_parameters() if p.requires_grad}
    state, saved = native_state(model, method, gathered)
    assert saved.r == DYLORA_CUT and set(state) == set(gathered)
    for name, tensor in state.items():
        cut = gathered[name][:DYLORA_CUT] if name.endswith("lora_A") else gathered[name][:, :DYLORA_CUT]
        assert torch.equal(tensor, cut)
