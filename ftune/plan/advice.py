"""What the estimate leads to: how many layers `gradient_checkpointing=auto` recomputes, single
changes that would fit, the printed breakdown and the preflight before training."""

from __future__ import annotations

import copy
import os
from typing import Any

from ftune.errors import FtuneError
from ftune.plan.estimate import AUTO_HEADROOM, GIB, Estimate, checkpoint_mode, estimate, fixed_checkpointed_layers
from ftune.plan.shape import Shape, model_shape, trainable_params
from ftune.runtime import world_size


def resolve_checkpointing(cfg: Any, shape: Shape | None = None, trainable: int | None = None
                          ) -> tuple[int, Estimate]:
    """(decoder layers to recompute, the estimate with them) for train.gradient_checkpointing.

    auto: none when the run fits in AUTO_HEADROOM of the device's memory, else the fewest layers
    that make it fit (each recomputed layer keeps only its input: activation memory falls
    linearly, compute grows by about one forward of that layer); every layer when nothing fits
    (the preflight then refuses and lists other changes)."""
    shape = shape or model_shape(cfg)
    trainable = trainable_params(cfg, shape) if trainable is None else trainable
    fixed = fixed_checkpointed_layers(cfg.train.gradient_checkpointing, shape.layers)
    if fixed is not None:
        return fixed, estimate(cfg, shape, trainable, fixed)
    def fits(e: Estimate) -> bool:
        return e.available <= 0 or e.total <= AUTO_HEADROOM * e.available

    # The estimate falls with every layer recomputed: bisect for the fewest that fit (each estimate
    # reads the device's memory and the checkpoint's files; 80 layers take 8 estimates, not 80).
    best = estimate(cfg, shape, trainable, 0)
    if fits(best):
        return 0, best
    low, high = 1, shape.layers
    best = estimate(cfg, shape, trainable, high)
    if not fits(best):
        return high, best
    while low < high:
        mid = (low + high) // 2
        trial = estimate(cfg, shape, trainable, mid)
        if fits(trial):
            high, best = mid, trial
        else:
            low = mid + 1
    return high, best


def knobs(cfg: Any, shape: Shape) -> list[str]:
    """Overrides that would make the run fit, each with its estimate (tried one at a time)."""


    def change(label: str, **settings: Any) -> None:
        other = copy.deepcopy(cfg)
        for dotted, value in settings.items():
            group, key = dotted.split("__")
            setattr(getattr(other, group), key, value)
        tries.append((label, other))

    tries: list[tuple[str, Any]] = []
    tr, hw = cfg.train, cfg.hardware
    if checkpoint_mode(tr.gradient_checkpointing) not in ("true", "auto"):  # auto has tried it already
        change("train.gradient_checkpointing=auto", train__gradient_checkpointing="auto")
    if tr.micro_batch_size > 1:
        mbs = max(1, tr.micro_batch_size // 2)
        change(f"train.micro_batch_size={mbs} train.grad_accum={tr.grad_accum * 2}", train__micro_batch_size=mbs)
    if cfg.method.quantised_variant and cfg.model.quantization == "none":
        change(f"method={cfg.method.quantised_variant} (4-bit base)", model__quantization="4bit")
    if tr.optim == "adamw" and hw.device != "cpu":
        change("train.optim=adamw_8bit", train__optim="adamw_8bit")
    if cfg.dataset.max_seq_len > 512:
        change(f"dataset.max_seq_len={cfg.dataset.max_seq_len // 2}", dataset__max_seq_len=cfg.dataset.max_seq_len // 2)
    if world_size(cfg) > 1 and hw.strategy != "fsdp":
        change("hardware=fsdp", hardware__strategy="fsdp", hardware__zero_stage=0)
    out = []
    trainable = trainable_params(cfg, shape)
    for label, other in tries:
        layers, e = resolve_checkpointing(other, shape, trainable)
        if e.fits:
            auto = checkpoint_mode(other.train.gradient_checkpointing) == "auto" and layers
            recomputed = f" (checkpointing {layers} layer{'s' if layers > 1 else ''})" if auto else ""
            out.append(f"{label}  ->  {e.total / GIB:.1f} GiB{recomputed}")
    return out


def checkpoint_note(layers: int, total: int) -> str:
    return (f"gradient checkpointing on {layers} of {total} decoder layers" if layers < total
            else "gradient checkpointing on every decoder layer")


def render(est: Estimate) -> str:
    lines = [f"memory per {est.device} process ({est.processes} process{'es' if est.processes > 1 else ''}):"]
    lines += [f"  {name:<20} {value / GIB:8.2f} GiB" for name, value in est.parts.items()]
    lines.append(f"  {'total':<20} {est.total / GIB:8.2f} GiB of {est.available / GIB:.1f} GiB available"
                 if est.available else f"  {'total':<20} {est.total / GIB:8.2f} GiB (device memory unknown)")
    if est.cpu_offloaded:
        lines.append(f"  offloaded to CPU RAM: {est.cpu_offloaded / GIB:.2f} GiB")
    lines += [f"  {n}" for n in est.notes]
    return "\n".join(lines)


def preflight(cfg: Any, console: Any, force: bool) -> Estimate | None:
    """Print the estimate; refuse when it does not fit (unless force). Skipped, with a note, when
    the model's config cannot be read without loading it."""
    if os.environ.get("FTUNE_NO_PREFLIGHT"):
        return None
    try:
        shape = model_shape(cfg)
        layers, est = resolve_checkpointing(cfg, shape)
    except FtuneError as exc:
        console.print(f"[yellow]note:[/] memory preflight skipped: {exc.title}")
        return None
    if est.fits:
        console.print(f"memory preflight: {est.total / GIB:.2f} GiB per process"
                      + (f" of {est.available / GIB:.1f} GiB" if est.available else "")
                      + (f"; {checkpoint_note(layers, shape.layers)}" if layers else ""))
        return est
    if force:
        console.print(f"[yellow]warning:[/] estimated {est.total / GIB:.1f} GiB per process, "
                      f"{est.available / GIB:.1f} GiB available; going on (--force)")
        return est
    fixes = knobs(cfg, shape)
    raise FtuneError(f"this run needs about {est.total / GIB:.1f} GiB per {est.device} process, "
                     f"{est.available / GIB:.1f} GiB is available",
                     render(est).splitlines()[1:] + ([f"would fit: {f}" for f in fixes] or ["no single change found"]),
                     "Apply one of the changes above, or run anyway with --force (ftune plan … shows the estimate).")
