"""The DPO family on preference pairs: DPO (sigmoid), conservative DPO (label smoothing), IPO,
SimPO and ORPO; and KTO on unpaired feedback. Chosen and rejected answers (KTO: answers and their
mismatched KL rows) go through the model in one concatenated forward.

Reference log-probs come from the same model with its adapter disabled (no second copy of the
base), or are computed once before training (stage.precompute_reference, and always for a
separate stage.reference model, which is then freed); SimPO and ORPO need no reference. Every
loss is a function of per-sequence summed log-probs and token counts, so the formulas below can
be checked against the papers on plain numbers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F

from ftune.config.rules import choice, positive
from ftune.config.stage_schema import StageConfig
from ftune.data.collate import collate
from ftune.data.tokenize import IGNORE
from ftune.errors import FtuneError
from ftune.methods.runs import load_model
from ftune.train import distributed
from ftune.train.objectives import Objective, StageSpec, register

LOSSES = ("sigmoid", "cdpo", "ipo", "simpo", "orpo", "kto")
REFERENCE_FREE = ("simpo", "orpo")


# Each sample's rows, in the order its collate puts them, and where their reference log-prob is kept.
PAIR_ROWS = (("chosen", "ref_chosen"), ("rejected", "ref_rejected"))
KTO_ROWS = ((None, "ref"), ("kl", "ref_kl"))


def _rows(samples: list[dict], spec: tuple) -> tuple[list[dict], torch.Tensor | None]:
    """Rows grouped by kind (all first rows, then all second rows) and their precomputed
    reference log-probs when every sample has them."""
    rows = [s if key is None else s[key] for key, _ in spec for s in samples]
    have = all(ref in s for _, ref in spec for s in samples)
    refs = torch.tensor([s[ref] for _, ref in spec for s in samples], dtype=torch.float32) if have else None
    return rows, refs


def collate_pairs(pairs: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows first, then rejected rows, padded together: one forward for both."""
    rows, refs = _rows(pairs, PAIR_ROWS)
    batch = collate(rows, pad_id)
    batch["n_pairs"] = torch.tensor(len(pairs))
    if refs is not None:
        batch["ref_logps"] = refs
    return batch


def collate_kto(samples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Answers first, then their mismatched KL rows (prompt i with answer i+1)."""
    rows, refs = _rows(samples, KTO_ROWS)
    batch = collate([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows], pad_id)
    batch["n_pairs"] = torch.tensor(len(samples))
    batch["desirable"] = torch.tensor([s["label"] for s in samples])
    if refs is not None:
        batch["ref_logps"] = refs
    return batch


def sequence_logps(model: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob of the labelled tokens, their count) per row."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    labels = batch["labels"][:, 1:]
    logits = logits[:, -batch["labels"].shape[1]:][:, :-1].float()
    nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
    mask = labels != IGNORE
    return -(nll * mask).sum(-1), mask.sum(-1)


def reference_logps(model: Any, batch: dict) -> torch.Tensor:
    if "ref_logps" in batch:  # computed once before training
        return batch["ref_logps"]
    # Under DDP the model is a wrapper that forwards only forward(): the reference pass needs no
    # gradient sync, so it runs on the wrapped model itself.
    inner = distributed.unwrap_parallel(model)
    if not hasattr(inner, "disable_adapter"):
        raise FtuneError("stage=dpo needs reference log-probs: train an adapter method (lora, …), whose disabled "
                         "adapter is the reference, or use stage.loss=simpo|orpo (reference-free)")
    with torch.no_grad(), inner.disable_adapter():
        return sequence_logps(inner, batch)[0]


def pair_losses(stage: Any, pc: torch.Tensor, pr: torch.Tensor, lc: torch.Tensor, lr: torch.Tensor,
                rc: torch.Tensor | None, rr: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per pair, reward of chosen, reward of rejected) from summed log-probs p*, token counts
    l*, and reference log-probs r* (None for reference-free losses)."""
    beta = stage.beta
    if stage.loss in ("sigmoid", "cdpo"):
        h = (pc - rc) - (pr - rr)
        eps = stage.label_smoothing
        loss = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
        return loss, beta * (pc - rc), beta * (pr - rr)
    if stage.loss == "ipo":  # IPO on length-averaged log-ratios, as in the reference implementation
        h = (pc - rc) / lc - (pr - rr) / lr
        return (h - 1 / (2 * beta)) ** 2, beta * (pc - rc) / lc, beta * (pr - rr) / lr
    avg_c, avg_r = pc / lc, pr / lr
    if stage.loss == "simpo":
        gamma = stage.simpo_gamma_ratio * beta
        return -F.logsigmoid(beta * (avg_c - avg_r) - gamma), beta * avg_c, beta * avg_r
    if stage.loss == "orpo":
        log_odds = (avg_c - avg_r) - (torch.log1p(-torch.exp(avg_c)) - torch.log1p(-torch.exp(avg_r)))
        return -avg_c - stage.orpo_lambda * F.logsigmoid(log_odds), beta * avg_c, beta * avg_r
    raise FtuneError(f"stage.loss: unknown DPO-family loss '{stage.loss}'")


def kto_losses(stage: Any, logps: torch.Tensor, ref: torch.Tensor, z0: torch.Tensor,
               desirable: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss per answer, implicit reward per answer).

    KTO (Ethayarajh et al. 2024): r = log pi/pi_ref of the answer; z0 = the KL reference point
    (kl_estimate), held constant; desirable answers lose lambda_D (1 - sigmoid(beta (r - z0))),
    undesirable ones lambda_U (1 - sigmoid(beta (z0 - r)))."""
    beta = stage.beta
    reward = logps - ref
    good = stage.kto_desirable_weight * (1 - torch.sigmoid(beta * (reward - z0)))
    bad = stage.kto_undesirable_weight * (1 - torch.sigmoid(beta * (z0 - reward)))
    return torch.where(desirable, good, bad), beta * reward


def _rows_of(batch: dict, part: slice) -> dict:
    """Some rows of a KTO batch (answers, or their KL rows), with their precomputed reference."""
    return {k: batch[k][part] for k in ("input_ids", "attention_mask", "labels", "ref_logps") if k in batch}


def kl_sums(model: Any, batch: dict) -> tuple[torch.Tensor, int]:
    """(sum over the batch's mismatched KL rows of log pi/pi_ref, their count), without gradient:
    z0 is a constant of the loss, as in the reference implementation."""
    n = int(batch["n_pairs"])
    rows = _rows_of(batch, slice(n, None))
    with torch.no_grad():
        logps = sequence_logps(model, rows)[0]
        ref = reference_logps(model, rows)
    return (logps.float() - ref.float()).sum(), n


def kl_estimate(total: torch.Tensor, count: int) -> torch.Tensor:
    """z0 = max(0, mean KL estimate over the mismatched rows)."""
    return (total / max(count, 1)).clamp(min=0)


def kto_prepare_step(model: Any, batches: list[dict], accelerator: Any) -> None:
    """z0 of the whole optimiser step: the mean over every KL row of every micro-batch, summed over
    the processes (the reference gathers the estimate over the processes). One step in N
    processes then equals the step in one, and accumulated micro-batches equal one batch."""
    total, count = 0.0, 0
    for batch in batches:
        with accelerator.autocast():
            kl, n = kl_sums(model, batch)
        total, count = total + float(kl), count + n
    totals = torch.tensor([total, count], dtype=torch.float64, device=accelerator.device)
    if distributed.world() > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    z0 = kl_estimate(totals[0], int(totals[1]))
    for batch in batches:
        batch["kto_z0"] = z0.float()


def make_kto(stage: Any) -> Objective:
    def loss(model: Any, batch: dict) -> tuple[torch.Tensor, int, dict[str, float]]:
        n = int(batch["n_pairs"])
        # Held-out batches carry no step-level z0: their own KL rows give it.
        z0 = batch["kto_z0"] if "kto_z0" in batch else kl_estimate(*kl_sums(model, batch))
        answers = _rows_of(batch, slice(0, n))
        logps, _ = sequence_logps(model, answers)
        ref = reference_logps(model, answers)
        desirable = batch["desirable"].bool()
        losses, rewards = kto_losses(stage, logps, ref, z0.to(logps.dtype), desirable)
        rewards = rewards.detach()
        metrics = {"accuracy": float(((rewards > 0) == desirable).float().sum()), "kl": float(z0) * n,
                   "rewards_desirable": float(rewards[desirable].sum()),
                   "rewards_undesirable": float(rewards[~desirable].sum())}
        return losses.sum(), n, metrics

    return Objective(loss=loss, count=lambda batch: int(batch["n_pairs"]), collate=collate_kto,
                     prepare_step=kto_prepare_step)


def precompute_reference(samples: list[dict], reference: Any, mbs: int, pad_id: int, accelerator: Any,
                         kto: bool) -> None:
    """Store every row's reference log-prob in its sample (ref_chosen/ref_rejected or ref/ref_kl)."""
    spec = KTO_ROWS if kto else PAIR_ROWS
    jobs = [(s, ref, s if key is None else s[key]) for s in samples for key, ref in spec]
    was_training = reference.training
    reference.eval()
    with torch.no_grad():
        for i in range(0, len(jobs), 2 * mbs):
            chunk = jobs[i:i + 2 * mbs]
            batch = collate([{"input_ids": r["input_ids"], "labels": r["labels"]} for _, _, r in chunk], pad_id)
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with accelerator.autocast():
                logps = sequence_logps(reference, batch)[0].float().cpu().tolist()
            for (sample, ref, _), value in zip(chunk, logps):
                sample[ref] = value
    reference.train(was_training)


def prepare_reference(cfg: Any, model: Any, data: Any, pad: int, device: Any, accelerator: Any) -> str | None:
    """Reference log-probs computed once, when the stage asks for it; returns a note or None.
    A separate reference model is loaded, used for one pass and freed: it never sits in memory
    beside the trained model."""
    stage = cfg.stage
    if stage.loss in REFERENCE_FREE or not (stage.reference or stage.precompute_reference):
        return None


    kto, mbs = stage.loss == "kto", cfg.train.micro_batch_size
    data.train, data.eval = list(data.train), list(data.eval)  # the log-probs are written into the samples
    if stage.reference:
        ref_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=stage.reference))
        reference, _ = load_model(ref_cfg, device)
        for samples in (data.train, data.eval):
            precompute_reference(samples, reference, mbs, pad, accelerator, kto)
        del reference
        return f"reference log-probs computed once with {stage.reference}"
    with model.disable_adapter():
        for samples in (data.train, data.eval):
            precompute_reference(samples, model, mbs, pad, accelerator, kto)
    return "reference log-probs computed once (adapter disabled); no reference forward during training"


def make_dpo(stage: Any) -> Objective:
    if stage.loss == "kto":
        return make_kto(stage)

    def loss(model: Any, batch: dict) -> tuple[torch.Tensor, int, dict[str, float]]:
        n = int(batch["n_pairs"])
        logps, counts = sequence_logps(model, batch)
        counts = counts.clamp(min=1).to(logps.dtype)
        ref = None if stage.loss in REFERENCE_FREE else reference_logps(model, batch)
        rc, rr = (None, None) if ref is None else (ref[:n], ref[n:])
        losses, rew_c, rew_r = pair_losses(stage, logps[:n], logps[n:], counts[:n], counts[n:], rc, rr)
        rew_c, rew_r, logps = rew_c.detach(), rew_r.detach(), logps.detach()
        metrics = {"rewards_chosen": float(rew_c.sum()), "rewards_rejected": float(rew_r.sum()),
                   "margin": float((rew_c - rew_r).sum()), "accuracy": float((rew_c > rew_r).float().sum()),
                   "logps_chosen": float(logps[:n].sum()), "logps_rejected": float(logps[n:].sum()),
                   # The policy's own preference, comparable with the starting model (whose DPO
                   # rewards are all zero): does it give the chosen answer more probability per token?
                   "logp_accuracy": float((logps[:n] / counts[:n] > logps[n:] / counts[n:]).float().sum())}
        return losses.sum(), n, metrics

    return Objective(loss=loss, count=lambda batch: int(batch["n_pairs"]), collate=collate_pairs)


@dataclass
class DpoStageConfig(StageConfig):
    """Preference optimisation on prompt/chosen/rejected pairs (the DPO family)."""

    name: str = "dpo"
    formats: ClassVar[tuple[str, ...]] = ("preference", "feedback")
    whole_rows: ClassVar[str] = "compares whole answers pair by pair"
    base_comparable: ClassVar[bool] = False  # the base is its own reference: loss log 2, rewards 0
    loss: str = "sigmoid"
    """sigmoid (DPO, Rafailov et al. 2023) | cdpo (DPO with label_smoothing, conservative DPO) |
    ipo (Azar et al. 2023) | simpo (reference-free, length-normalised, Meng et al. 2024) |
    orpo (SFT loss + odds-ratio term, reference-free, Hong et al. 2024) |
    kto (unpaired desirable/undesirable answers, dataset format feedback, Ethayarajh et al. 2024)."""
    beta: float = 0.1
    """Strength of the implicit KL constraint (DPO, IPO's 1/(2 beta) target) or reward scale (SimPO)."""
    label_smoothing: float = 0.0
    """cdpo: assumed probability that a preference label is flipped (0 < eps < 0.5)."""
    simpo_gamma_ratio: float = 0.5
    """SimPO target margin gamma as a fraction of beta."""
    orpo_lambda: float = 0.1
    """ORPO weight of the odds-ratio term beside the SFT loss."""
    kto_desirable_weight: float = 1.0
    """KTO weight lambda_D of desirable answers (raise it when they are rarer than undesirable ones)."""
    kto_undesirable_weight: float = 1.0
    """KTO weight lambda_U of undesirable answers."""
    reference: Optional[str] = None
    """A separate reference model (hub id, folder, .gguf or run directory), e.g. for method=full.
    Its log-probs are computed once before training and the model is freed again. Unset: the
    trained model with its adapter disabled."""
    precompute_reference: bool = False
    """Compute the reference log-probs of every sample once before training (one extra pass over
    the data instead of one extra forward per step)."""

    def problems(self, cfg: Any) -> list[str]:
        problems: list[str] = []
        choice(problems, "stage.loss", self.loss, LOSSES)
        positive(problems, "stage.beta", self.beta)
        if self.loss == "cdpo" and not 0 < self.label_smoothing < 0.5:
            problems.append(f"stage.label_smoothing must be in (0, 0.5) for stage.loss=cdpo (got {self.label_smoothing})")
        if self.loss not in REFERENCE_FREE and not cfg.method.adapter_reference and not self.reference:
            problems.append(f"stage.loss={self.loss} needs a reference model: with method={cfg.method.name} there is "
                            "no adapter to disable; set stage.reference=<model path or run dir>, use an adapter "
                            "method (lora, …), or stage.loss=simpo|orpo")
        for i, src in enumerate(cfg.dataset.sources):
            if (self.loss == "kto") != (src.format == "feedback"):
                problems.append(f"dataset.sources[{i}].format={src.format}: stage.loss=kto takes format=feedback "
                                "(prompt, completion, label), the other DPO losses take format=preference")
        if self.loss == "kto":
            positive(problems, "stage.kto_desirable_weight", self.kto_desirable_weight)
            positive(problems, "stage.kto_undesirable_weight", self.kto_undesirable_weight)
        return problems


register(StageSpec(DpoStageConfig, make_dpo, prepare=prepare_reference))
