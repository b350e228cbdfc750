"""QA-LoRA (Xu et al. 2023), our own module: quantisation-aware LoRA whose update folds exactly
into a group-quantised base.

The base weight W (out x in) is quantised group-wise along the input: for each row o and group j
of `group_size` columns, INT codes q in 0..2^bits-1 with a scale s[o, j] and zero z[o, j], so
W ~ s (q - z). The adapter sees the input average-pooled over each group, so its update is
constant inside a group: delta[o, c] = scale (B A)[o, c // g] / g. That is exactly a shift of the
group's zero-point, z' = z - scale (B A)[o, j] / (g s[o, j]): after merging, the model is still
group-quantised (same codes and scales) with no precision lost. peft's `use_qalora` targets GPTQ
layers on GPU; this module works on any linear layer, on CPU too.

The quantised base is part of the trained model, so it is saved with the adapter
(`qalora_base.safetensors` in the adapter folder: codes two to a byte for bits <= 4, scales and
zero-points in fp32) and every reload (merge, eval, a later stage) rebuilds the layers from it
instead of quantising the base again. Re-quantising is not a function of the saved adapter alone:
a bf16 run quantises the bf16-rounded base, a float32 reload the unrounded one (0.4-0.5% of
SmolLM2's INT4 codes then move by a step), and the base folder itself can change under a run
(a new revision, a re-download). Persisting costs about 0.75 byte per base weight (4 bits in
groups of 32; SmolLM2-135M: ~80 MB) and makes the reloaded groups the trained ones bit for bit.
An adapter saved without the file (older runs) is re-quantised from the base rounded to the dtype
its run trained in (the run's config.yaml), which is what that run quantised, with a note saying so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ftune.config.methods_schema import MethodConfig
from ftune.config.rules import positive
from ftune.errors import FtuneError
from ftune.methods.base import MethodSpec, Setup, freeze_all, register, unwrap_modules, wrap_linears
from ftune.models.runs import is_run_dir, run_config
from ftune.runtime import weight_dtype


@dataclass
class QALoraConfig(MethodConfig):
    """QA-LoRA (Xu et al. 2023): INT4 group-quantised base; LoRA on the group-pooled input, so the
    update merges exactly into the group zero-points and the merged model stays quantised."""

    name: str = "qalora"
    r: int = 16
    """Adapter rank."""
    alpha: float = 32.0
    """Scaling numerator (alpha / r)."""
    group_size: int = 32
    """Input columns per quantisation group (must divide every target layer's input width)."""
    bits: int = 4
    """Bits per quantised weight (2..8)."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                              "up_proj", "down_proj"])
    """Modules quantised and adapted."""

    def problems(self, cfg: Any) -> list[str]:
        problems: list[str] = []
        positive(problems, "method.r", self.r)
        positive(problems, "method.group_size", self.group_size)
        if not 2 <= self.bits <= 8:
            problems.append(f"method.bits must be in 2..8 (got {self.bits})")
        return problems

BASE_STATE = "qalora_base.safetensors"  # in the adapter folder, beside adapter.safetensors
STATE_FORMAT = "ftune-qalora-base-v1"


class GroupQuantLinear(nn.Module):
    """A frozen linear layer stored as INT codes with a float scale and zero-point per group."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None,
                 quantised_from: str = "float32"):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.group_size = self.in_features // scale.shape[1]
        self.quantised_from = quantised_from  # dtype of the weights the codes were fitted to (saved as metadata)
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int, bits: int,
                    dtype: torch.dtype | None = None) -> "GroupQuantLinear":
        """Quantise the layer's weight, first rounded to `dtype` when given (the run's training dtype)."""
        source = linear.weight.detach() if dtype is None else linear.weight.detach().to(dtype)
        w = source.float()
        out, inp = w.shape
        if inp % group_size:
            raise FtuneError(f"method.group_size={group_size} does not divide the input width {inp} of a target layer",
                             hint="Pick a group size that divides every target layer's in_features (e.g. 32 or 64).")
        groups = w.view(out, inp // group_size, group_size)
        low, high = groups.amin(-1), groups.amax(-1)
        levels = 2 ** bits - 1
        scale = ((high - low) / levels).clamp(min=1e-8)
        zero = torch.round(-low / scale)
        codes = torch.clamp(torch.round(groups / scale[..., None] + zero[..., None]), 0, levels)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(codes.view(out, inp).to(torch.uint8), scale, zero, bias, str(source.dtype).removeprefix("torch."))

    def weight_dequantized(self) -> torch.Tensor:
        g = self.codes.view(self.out_features, -1, self.group_size).float()
        return ((g - self.zero[..., None]) * self.scale[..., None]).view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight_dequantized().to(x.dtype), bias)


class QALoraLinear(nn.Module):
    """base(x) + (alpha / r) B A pool(x), pool = mean over each quantisation group of the input."""

    def __init__(self, base: GroupQuantLinear, r: int, alpha: float):
        super().__init__()
        self.base, self.scaling = base, alpha / r
        device = base.codes.device
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features // base.group_size, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.view(*x.shape[:-1], -1, self.base.group_size).mean(-1)
        update = (pooled.to(self.lora_A.dtype) @ self.lora_A.T) @ self.lora_B.T
        out = self.base(x)
        return out + self.scaling * update.to(out.dtype)

    def merged(self) -> GroupQuantLinear:
        """The base with the update folded into its zero-points (codes and scales unchanged)."""
        base = self.base
        per_group = self.scaling * (self.lora_B @ self.lora_A).detach().float() / base.group_size
        zero = base.zero - per_group / base.scale
        bias = None if base.bias is None else base.bias.detach()
        return GroupQuantLinear(base.codes, base.scale, zero, bias, base.quantised_from)


def apply_qalora(model: Any, cfg: Any, setup: Setup) -> Any:
    m = cfg.method
    freeze_all(model)
    wrap_linears(model, m.target_modules,
                 lambda linear: QALoraLinear(GroupQuantLinear.from_linear(linear, m.group_size, m.bits), m.r, m.alpha))
    return model


def merge_qalora(model: Any) -> Any:
    return unwrap_modules(model, QALoraLinear, lambda module: module.merged())


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Two codes a byte (even column in the low nibble) when they fit in 4 bits and rows are even."""
    if bits > 4 or codes.shape[1] % 2:
        return codes
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_codes(stored: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of pack_codes; a packed row is half as wide as the layer's input, so the width tells."""
    if stored.shape[1] == in_features:
        return stored
    return torch.stack((stored & 15, stored >> 4), dim=-1).view(stored.shape[0], in_features)


def save_base_state(model: Any, folder: Path, bits: int) -> Path:
    """The codes, scales and zero-points of every QA-LoRA layer, keyed by the layer's module name."""

    tensors, sources = {}, set()
    for name, module in model.named_modules():
        if isinstance(module, QALoraLinear):
            base = module.base
            tensors[f"{name}.codes"] = pack_codes(base.codes.detach().cpu(), bits).contiguous()
            tensors[f"{name}.scale"] = base.scale.detach().cpu().contiguous()
            tensors[f"{name}.zero"] = base.zero.detach().cpu().contiguous()
            sources.add(base.quantised_from)
    path = Path(folder) / BASE_STATE
    save_file(tensors, str(path), metadata={"format": STATE_FORMAT, "bits": str(bits),
                                            "quantised_from": ",".join(sorted(sources))})
    return path


def apply_saved(model: Any, method: Any, folder: Path) -> Any:
    """QA-LoRA layers (adapters still untrained) on a freshly loaded base, their groups the ones
    saved in `folder`; a folder without them is re-quantised in its run's training dtype."""
    folder = Path(folder)
    freeze_all(model)
    if (folder / BASE_STATE).is_file():
        saved = SavedGroups(model, method.group_size, folder / BASE_STATE)
        wrap_linears(model, method.target_modules,
                     lambda linear: QALoraLinear(saved.build(linear), method.r, method.alpha))
        saved.check_all_used()
        return model
    dtype = _requantise_dtype(folder)
    wrap_linears(model, method.target_modules, lambda linear: QALoraLinear(
        GroupQuantLinear.from_linear(linear, method.group_size, method.bits, dtype), method.r, method.alpha))
    return model


class SavedGroups:
    """A base state file, turned into GroupQuantLinear layers by the module name of each target linear."""

    def __init__(self, model: Any, group_size: int, path: Path):

        with safe_open(str(path), "pt") as f:
            self.meta = f.metadata() or {}
            self.tensors = {key: f.get_tensor(key) for key in f.keys()}
        if self.meta.get("format") != STATE_FORMAT:
            raise FtuneError(f"{path}: not a QA-LoRA base state (format {self.meta.get('format')})")
        self.path, self.group_size = path, group_size
        self.names = {id(module): name for name, module in model.named_modules()}
        self.unused = {key.rsplit(".", 1)[0] for key in self.tensors}

    def build(self, linear: nn.Linear) -> GroupQuantLinear:
        name = self.names[id(linear)]
        if f"{name}.codes" not in self.tensors:
            raise FtuneError(f"{self.path}: no saved groups for layer {name}",
                             hint="The folder is damaged or from another base model; train the run again.")
        codes = unpack_codes(self.tensors[f"{name}.codes"], linear.in_features)
        scale, zero = self.tensors[f"{name}.scale"], self.tensors[f"{name}.zero"]
        groups = (linear.out_features, linear.in_features // self.group_size)
        if codes.shape != linear.weight.shape or scale.shape != groups or zero.shape != groups:
            raise FtuneError(f"{self.path}: the saved groups of {name} do not fit the layer",
                             [f"codes {tuple(codes.shape)}, scale {tuple(scale.shape)} vs weight "
                              f"{tuple(linear.weight.shape)} in groups of {self.group_size}"])
        self.unused.discard(name)
        device = linear.weight.device
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return GroupQuantLinear(codes.to(device), scale.to(device), zero.to(device), bias,
                                self.meta.get("quantised_from", "unknown"))

    def check_all_used(self) -> None:
        if self.unused:  # groups of layers this model does not have: saved from another base
            raise FtuneError(f"{self.path}: {len(self.unused)} saved layers are not in the base model",
                             [sorted(self.unused)[0]], "Load the adapter on the base model its run trained.")


def _requantise_dtype(folder: Path) -> torch.dtype | None:
    """The dtype the run behind `folder` loaded its base in (None: unknown), with a note to the user."""


    run_dir = folder.parent
    dtype = weight_dtype(run_config(run_dir)) if is_run_dir(run_dir) else None
    how = (f"from the base in {str(dtype).removeprefix('torch.')}, the dtype its run trained in" if dtype else
           "from the base as loaded: no run config beside it gives the training dtype, so codes may differ "
           "from training by one step")
    Console(stderr=True).print(f"[yellow]note:[/] {folder} has no saved QA-LoRA groups ({BASE_STATE}, kept by "
                               f"newer runs): re-quantised {how}", soft_wrap=True)
    return dtype


def _save_base(model: Any, folder: Path, method: QALoraConfig) -> None:
    save_base_state(model, folder, method.bits)  # its quantised base is part of the trained model


def merged_groups(model: Any, method: QALoraConfig) -> tuple[dict[str, torch.Tensor], int]:
    """Every merged GroupQuantLinear as `<module>.codes|scale|zero` tensors, and the group size;
    only 4-bit groups, the one case a GGUF type (q4_1) holds exactly."""
    tensors: dict[str, torch.Tensor] = {}
    sizes = set()
    if method.bits != 4:
        return tensors, 0
    for name, module in model.named_modules():
        if isinstance(module, GroupQuantLinear):
            tensors[f"{name}.codes"] = module.codes.detach().to(torch.uint8).contiguous()
            tensors[f"{name}.scale"] = module.scale.detach().float().contiguous()
            tensors[f"{name}.zero"] = module.zero.detach().float().contiguous()
            sizes.add(module.group_size)
    if len(sizes) > 1:  # one method.group_size per run, so this would be a bug, not a user error
        raise FtuneError(f"QA-LoRA layers have different group sizes: {sorted(sizes)}")
    return tensors, sizes.pop() if sizes else 0


register(MethodSpec(QALoraConfig, apply_qalora, merge=merge_qalora, save_extra=_save_base, rebuild=apply_saved,
                    merged_groups=merged_groups))
