"""hardware.compile: when it is switched on, and a compiled run learns what the eager run learns."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ftune import runtime
from ftune.config.compose import compose
from ftune.errors import FtuneError
from ftune.train import compiled

CPU = torch.device("cpu")


def _hw(mode, strategy="none"):
    return SimpleNamespace(compile=mode, strategy=strategy)


def test_auto_compiles_only_long_runs_with_a_compiler(monkeypatch):
    monkeypatch.setattr(runtime.shutil, "which", lambda name: "/usr/bin/" + name)
    assert runtime.compiles(_hw("auto"), 50, CPU) == (False, None)
    on, note = runtime.compiles(_hw("auto"), 500, CPU)
    assert on and "500 steps" in note
    assert runtime.compiles(_hw("auto", "fsdp"), 500, CPU)[0] is False
    assert runtime.compiles(_hw("false"), 500, CPU) == (False, None)
    assert runtime.compiles(_hw("true"), 3, CPU) == (True, None)
    monkeypatch.setattr(runtime.shutil, "which", lambda name: None)
    assert runtime.compiles(_hw("auto"), 500, CPU)[0] is False
    with pytest.raises(FtuneError, match="compiler"):
        runtime.compiles(_hw("true"), 500, CPU)


def test_compile_setting_is_checked(tiny_overrides):
    with pytest.raises(FtuneError, match="hardware.compile must be one of"):
        compose([*tiny_overrides, "hardware.compile=fast"])
    with pytest.raises(FtuneError, match="strategy none or ddp"):
        compose([*tiny_overrides, "hardware.compile=true", "hardware.strategy=fsdp"])
    assert compose([*tiny_overrides, "hardware.compile=True"]).cfg.hardware.compile == "true"


def test_a_compiled_run_learns_like_the_eager_run(tiny_overrides):
    from torch._dynamo.utils import counters

    from ftune.train.run import train

    if runtime.compiler_missing(CPU):
        pytest.skip(runtime.compiler_missing(CPU))
    common = [*tiny_overrides, "train.max_steps=3", "train.lr=1e-2", "dataset.packing=false",
              "train.sample_max_new_tokens=2"]
    eager = train(compose([*common, "train.run_name=eager", "hardware.compile=false"]))
    graphs = counters["stats"]["unique_graphs"]
    fast = train(compose([*common, "train.run_name=fast", "hardware.compile=true"]))
    assert counters["stats"]["unique_graphs"] > graphs  # the decoder layers really ran compiled
    # evaluation runs uncompiled; the compiled CPU run uses matmul-softmax attention instead of SDPA
    assert fast["eval_loss_before"] == pytest.approx(eager["eval_loss_before"], rel=1e-6)
    assert fast["eval_loss_after"] == pytest.approx(eager["eval_loss_after"], rel=1e-5)
    assert fast["eval_loss_after"] < fast["eval_loss_before"]


def test_compiled_cpu_runs_switch_to_matmul_attention_only_when_unset():
    cfg = SimpleNamespace(model=SimpleNamespace(attn_implementation="auto"),
                          hardware=SimpleNamespace(attn_implementation="auto"))
    assert runtime.compiled_attention(cfg, CPU) == "eager"
    assert runtime.compiled_attention(cfg, torch.device("cuda")) is None
    cfg.model.attn_implementation = "sdpa"
    assert runtime.compiled_attention(cfg, CPU) is None


class _Broken(Exception):
    pass


@pytest.mark.parametrize("strict", [False, True])
def test_a_compiler_failure_falls_back_to_eager_or_stops_with_the_reason(monkeypatch, strict):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([LlamaDecoderLayer(LlamaConfig(hidden_size=16, intermediate_size=32,
                                                num_attention_heads=2, num_key_value_heads=1), 0)])

    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise _Broken("no C++ compiler found")
        return run

    monkeypatch.setattr(compiled, "compile_errors", lambda: (_Broken,))
    monkeypatch.setattr(compiled.torch, "compile", broken_compile)
    net = Net().train()
    assert compiled.compile_layers(net, strict=strict) == 1
    layer = net.layers[0]
    x = torch.randn(1, 5, 16, requires_grad=True)
    cos, sin = torch.ones(1, 5, 8), torch.zeros(1, 5, 8)
    if strict:
        with pytest.raises(FtuneError, match="torch.compile failed"):
            layer(x, position_embeddings=(cos, sin), attention_mask=None)
        return
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler found"):
        out = layer(x, position_embeddings=(cos, sin), attention_mask=None)
    out = out[0] if isinstance(out, tuple) else out
    out.sum().backward()
    assert x.grad is not None
