"""Rewards for PPO: a trained reward model (a stage=rm run) or a rule (verifiable rewards).

Every reward is a function scores(prompts, responses, references) -> list of floats, where a
prompt is the message list the answer replies to and a reference is the dataset's answer (or
None). Rules: length, regex, reference, or a user function named python:<file.py|module>:<fn>
with the signature fn(prompt: str, response: str, reference: str | None) -> float.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
from pathlib import Path
from typing import Any, Callable

import torch

from ftune.data import templates
from ftune.data.collate import collate
from ftune.data.tokenize import tokenize_all
from ftune.errors import FtuneError
from ftune.methods.runs import load_run
from ftune.models.runs import is_run_dir, run_config, trained_folder
from ftune.train.heads import HEAD_FILE, WithScalarHead, last_token_scores, load_head

Scores = Callable[[list[list[dict]], list[str], list[Any]], list[float]]


def length_reward(target: int) -> Callable[[str, str, Any], float]:
    """1 at `target` words, falling linearly to 0 at 0 and at 2 x target words."""
    def score(prompt: str, response: str, reference: Any) -> float:
        return max(0.0, 1.0 - abs(len(response.split()) - target) / target)
    return score


def regex_reward(pattern: str) -> Callable[[str, str, Any], float]:
    compiled = re.compile(pattern)
    return lambda prompt, response, reference: 1.0 if compiled.search(response) else 0.0


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s.-]", " ", text.lower()).split()).strip(" .")


def reference_reward(prompt: str, response: str, reference: Any) -> float:
    """1 when the reference answer (normalised: case, punctuation, spaces) appears in the answer."""
    if not reference:
        return 0.0
    return 1.0 if normalise(str(reference)) in normalise(response) else 0.0


def python_reward(spec: str) -> Callable[[str, str, Any], float]:
    """python:<file.py or module>:<function>."""
    target, _, name = spec.removeprefix("python:").rpartition(":")
    try:
        if target.endswith(".py"):
            path = Path(target).expanduser()
            module_spec = importlib.util.spec_from_file_location(f"ftune_reward_{path.stem}", path)
            if module_spec is None or not path.is_file():
                raise FileNotFoundError(str(path))
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            module = importlib.import_module(target)
    except Exception as exc:  # noqa: BLE001  (any failure to import the user's code)
        raise FtuneError(f"stage.reward={spec}: could not load '{target}' ({type(exc).__name__}: {exc})",
                         hint="Give an existing .py file or an importable module: python:rewards.py:score") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise FtuneError(f"stage.reward={spec}: '{target}' has no function '{name}'",
                         hint="Define def score(prompt, response, reference) -> float in that file.")
    return fn


def rule_scores(rule: Callable[[str, str, Any], float], label: str) -> Scores:
    def scores(prompts: list[list[dict]], responses: list[str], references: list[Any]) -> list[float]:
        out = []
        for messages, response, reference in zip(prompts, responses, references):
            value = rule(messages[-1]["content"], response, reference)
            if not isinstance(value, (int, float)) or not math.isfinite(float(value)):
                raise FtuneError(f"stage.reward={label} returned {value!r} for the prompt {messages[-1]['content'][:60]!r}",
                                 hint="A reward function must return a finite number.")
            out.append(float(value))
        return out
    return scores


class RewardModelScores:
    """Scores answers with the reward model of a stage=rm run, rendered with that run's template
    and tokenised exactly as it was trained (segment by segment)."""

    def __init__(self, run_dir: str, device: torch.device, precision: str):
        folder = self.check(run_dir)
        lm, self.tokenizer, saved = load_run(Path(run_dir), device)
        self.model = WithScalarHead(lm)
        load_head(self.model, folder)
        self.model.eval().requires_grad_(False)
        self.template = templates.load_template(saved.dataset.template)
        self.max_len = saved.dataset.max_seq_len
        self.device, self.precision = device, precision

    @staticmethod
    def check(run_dir: str) -> Path:
        """The reward model run's trained folder; a clear error when it is not a finished rm run."""
        if not is_run_dir(run_dir):
            raise FtuneError(f"reward model: {run_dir} is not a run directory",
                             hint="Give the directory of a stage=rm run (ftune train recipe=smollm2-rm).")
        saved = run_config(Path(run_dir))
        folder = trained_folder(Path(run_dir), saved)
        if saved.stage.scalar_head != "reward":
            raise FtuneError(f"reward model: {run_dir} is a stage={saved.stage.name} run, not a reward model",
                             hint="Train one first: ftune train recipe=smollm2-rm, then give its run directory.")
        if not (folder / HEAD_FILE).is_file():
            raise FtuneError(f"reward model: {folder} has no {HEAD_FILE} (the reward head)",
                             hint="The run did not finish saving; train it again.")
        return folder

    @torch.no_grad()
    def __call__(self, prompts: list[list[dict]], responses: list[str], references: list[Any]) -> list[float]:
        convs = [templates.render({"messages": [*p, {"role": "assistant", "content": r}]}, self.template, self.tokenizer)
                 for p, r in zip(prompts, responses)]
        samples, _ = tokenize_all(convs, self.tokenizer, self.max_len, "all", drop_empty=False)
        batch = collate([s for s in samples if s is not None], self.tokenizer.pad_token_id)
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16 if self.precision == "fp16" else None
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            per_token = self.model.scores(ids, mask)
        return last_token_scores(per_token, mask).tolist()


def build(stage: Any, device: torch.device, precision: str) -> Scores:
    """The stage's reward as a batch scoring function."""
    if stage.reward == "model":
        return RewardModelScores(stage.reward_model, device, precision)
    if stage.reward == "length":
        return rule_scores(length_reward(stage.reward_target_length), "length")
    if stage.reward == "regex":
        return rule_scores(regex_reward(stage.reward_pattern), "regex")
    if stage.reward == "reference":
        return rule_scores(reference_reward, "reference")
    return rule_scores(python_reward(stage.reward), stage.reward)
