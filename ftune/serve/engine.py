"""One base model, many LoRA adapters (S-LoRA style), for `ftune chat` and `ftune serve`.

- Adapters are kept in host memory (their state dicts on the CPU) and put on the model on demand;
  at most `max_loaded` sit on the model at once, the least recently used one is taken off first.
- Requests for different adapters are answered in one batched forward: peft's mixed-adapter batch
  (`adapter_names=[...]`, one name per row; "__base__" is the base model without adapter).
- Prompts are rendered with the run's template (the tokenizer's chat template by default).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file

from ftune.data import templates
from ftune.errors import FtuneError
from ftune.methods.runs import load_model
from ftune.models.runs import run_config, trained_folder

BASE = "__base__"


@dataclass
class Request:
    model: str
    messages: list[dict]
    max_tokens: int = 128
    temperature: float = 0.0


class AdapterPool:
    """Base model + named LoRA adapters from run directories that share that base."""

    def __init__(self, runs: list[str | Path], max_loaded: int = 4, device: str = "auto"):
        from peft import PeftConfig, get_peft_model


        if not runs:
            raise FtuneError("give at least one run=<run dir> to serve")
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   "cpu" if device == "auto" else device)
        self.host: dict[str, tuple[Any, dict]] = {}
        first = None
        for run in map(Path, runs):
            cfg = run_config(run)
            folder = trained_folder(run, cfg)
            if not (folder / "adapter_config.json").is_file():
                raise FtuneError(f"{run}: method={cfg.method.name} is not a peft LoRA-family adapter",
                                 hint="Serve LoRA-family runs, or merge this one (ftune merge) and serve the folder as a base.")
            first = first or cfg
            if cfg.model.path != first.model.path:
                raise FtuneError(f"{run}: its base {cfg.model.path} differs from {first.model.path}",
                                 hint="All served adapters must share one base model.")
            weights = load_file(str(folder / "adapter_model.safetensors"))
            self.host[run.name] = (PeftConfig.from_pretrained(folder), weights)
        self.cfg = first
        base, self.tokenizer = load_model(first, self.device)
        self.tokenizer.padding_side = "left"  # batched generation continues every row at its end
        name, (config, _) = next(iter(self.host.items()))
        self.model = get_peft_model(base, config, adapter_name="__placeholder__")
        self.model.eval()
        self.template = templates.load_template(first.dataset.template)
        self.stops = templates.stop_token_ids(self.tokenizer, first.dataset.template)
        self.loaded: OrderedDict[str, None] = OrderedDict()
        self.max_loaded = max(1, max_loaded)
        self.lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return [BASE, *self.host]

    def activate(self, name: str) -> None:
        """Put adapter `name` on the model (host -> device), evicting the least recently used."""
        from peft import set_peft_model_state_dict

        if name == BASE:
            return
        if name not in self.host:
            raise FtuneError(f"unknown model '{name}'", [f"served: {', '.join(self.names)}"])
        if name in self.loaded:
            self.loaded.move_to_end(name)
            return
        while len(self.loaded) >= self.max_loaded:
            old, _ = self.loaded.popitem(last=False)
            self.model.delete_adapter(old)
        config, weights = self.host[name]
        self.model.add_adapter(name, config)
        set_peft_model_state_dict(self.model, weights, adapter_name=name)
        self.loaded[name] = None

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        # rendered as the first run trained (dataset.system="" leaves a template's default out)
        text = templates.render_prompt(messages, self.template, self.tokenizer, templates.RenderOptions.of(self.cfg.dataset))
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(self, requests: list[Request]) -> list[dict]:
        """{text, ids, finish} per request, all in one batched generate."""
        with self.lock:
            names = list(dict.fromkeys(r.model for r in requests))
            if len([n for n in names if n != BASE]) > self.max_loaded:
                raise FtuneError(f"one batch asks for {len(names)} adapters; max_loaded is {self.max_loaded}")
            for name in names:
                self.activate(name)
            prompts = [self.prompt_ids(r.messages) for r in requests]
            batch = self.tokenizer.pad({"input_ids": prompts}, return_tensors="pt").to(self.device)
            sample = requests[0].temperature > 0
            with torch.no_grad():
                out = self.model.generate(**batch, adapter_names=[r.model for r in requests],
                                          max_new_tokens=max(r.max_tokens for r in requests),
                                          do_sample=sample, temperature=requests[0].temperature if sample else None,
                                          eos_token_id=self.stops, pad_token_id=self.tokenizer.pad_token_id)
        results = []
        for row, request, prompt in zip(out[:, batch["input_ids"].shape[1]:].tolist(), requests, prompts):
            row = row[:request.max_tokens]
            end = next((i for i, t in enumerate(row) if t in self.stops), None)
            body = row if end is None else row[:end]
            reason = "length" if end is None else "stop"
            results.append({"text": self.tokenizer.decode(body, skip_special_tokens=True).strip(), "ids": body,
                            "finish": reason, "prompt_tokens": len(prompt)})
        return results

    def stream(self, request: Request, usage: dict | None = None) -> Iterator[str]:
        """Text pieces of one answer as they are generated (one request at a time); at the end
        `usage`, when given, receives the prompt and completion token counts."""
        from transformers import TextIteratorStreamer

        with self.lock:
            self.activate(request.model)
            ids = torch.tensor([self.prompt_ids(request.messages)], device=self.device)
            out: list = []
            streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
            kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=[request.model],
                          max_new_tokens=request.max_tokens, do_sample=False, eos_token_id=self.stops,
                          pad_token_id=self.tokenizer.pad_token_id, streamer=streamer)
            thread = threading.Thread(target=self._generate_quietly, args=(out,), kwargs=kwargs)
            thread.start()
            yield from streamer
            thread.join()
            if usage is not None and out:
                new = out[0][0, ids.shape[1]:].tolist()
                end = next((i for i, t in enumerate(new) if t in self.stops), len(new))
                usage.update(prompt_tokens=ids.shape[1], completion_tokens=end,
                             finish="stop" if end < len(new) else "length")

    def _generate_quietly(self, out: list, **kwargs: Any) -> None:
        with torch.no_grad():
            out.append(self.model.generate(**kwargs))
