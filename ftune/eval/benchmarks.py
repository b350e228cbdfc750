"""Benchmarks through lm-eval-harness: the standard ones by name (ARC, HellaSwag, MMLU,
TruthfulQA, or any lm-eval task name) when their data is in the local Hugging Face cache or the
network is on, and local multiple-choice / generation files described by a small task config (eval_tasks/*.yaml), so
offline users can evaluate on their own data.

A local task config (shipped ones in eval_tasks/, or any YAML path):

    name: smol-mc                 # reported as local_smol-mc
    type: multiple_choice         # or: generate
    file: data/smol-mc.jsonl      # json/jsonl rows; relative paths are from the config's folder
    question: question            # column with the question
    choices: choices              # multiple_choice: column with the list of answer texts
    answer: answer                # index into choices, or the right choice's text (generate: the text)
    prompt: "Question: {question}\\nAnswer:"

Rows are checked before anything loads (a bad row is named with its line number) and handed to
lm-eval as a plain task: multiple choice is scored by the log-likelihood of each choice (acc,
acc_norm), generation by greedy decoding and exact match (case and punctuation ignored).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ftune.errors import FtuneError
from ftune.resources import data_root, eval_tasks_dir

# Short names users type -> lm-eval task names.
ALIASES = {"arc": "arc_challenge", "arc_challenge": "arc_challenge", "arc_easy": "arc_easy",
           "hellaswag": "hellaswag", "mmlu": "mmlu", "truthfulqa": "truthfulqa_mc2",
           "truthfulqa_mc1": "truthfulqa_mc1", "truthfulqa_mc2": "truthfulqa_mc2"}


@dataclass
class LocalTask:
    """A benchmark on a local file (see the module docstring for the YAML form)."""

    name: str = "?"
    file: str = "?"
    type: str = "multiple_choice"  # multiple_choice | generate
    question: str = "question"
    choices: str = "choices"
    answer: str = "answer"
    prompt: str = "Question: {question}\nAnswer:"
    num_fewshot: int = 0
    max_new_tokens: int = 32  # generate: answer length limit
    stop: list[str] = field(default_factory=lambda: ["\n"])  # generate: where an answer ends


def has_lm_eval() -> bool:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


def require_lm_eval() -> None:
    if not has_lm_eval():
        raise FtuneError("benchmarks need lm-eval-harness, which is not installed",
                         hint="pip install 'ftune[eval]' (or: pip install lm-eval), then rerun.")


def load_task_config(spec: str) -> LocalTask:
    """A task config by path, or by name from the shipped eval_tasks/."""


    path = Path(spec)
    if not path.is_file():
        path = eval_tasks_dir() / f"{spec}.yaml"
    if not path.is_file():
        shipped = sorted(p.stem for p in eval_tasks_dir().glob("*.yaml"))
        raise FtuneError(f"tasks: {spec} is neither a YAML file nor a shipped task config",
                         [f"shipped: {', '.join(shipped) or 'none'}"], "Give a path to a task YAML.")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path))
        task = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(LocalTask), raw))
    except Exception as exc:  # unknown key, wrong type, malformed YAML
        raise FtuneError(f"{path}: not a valid task config", [str(exc).splitlines()[0][:200]],
                         f"Valid keys: {', '.join(f.name for f in dataclasses.fields(LocalTask))}.") from None
    problems = []
    if task.type not in ("multiple_choice", "generate"):
        problems.append(f"type must be multiple_choice or generate (got {task.type!r})")
    for key in ("name", "file"):
        if getattr(task, key) == "?":
            problems.append(f"{key} is required")
    if "{question}" not in task.prompt:
        problems.append("prompt must contain {question}")
    if problems:
        raise FtuneError(f"{path}: invalid task config", problems)
    task.file = str(_data_file(task.file, path))
    return task


def _data_file(spec: str, config: Path) -> Path:
    """`ftune:<file>` names shipped data; a relative path is from the config's folder, then the cwd."""
    if spec.startswith("ftune:"):
        return data_root() / "data" / spec.removeprefix("ftune:")
    path = Path(spec)
    if path.is_absolute() or (config.parent / path).is_file() or not path.is_file():
        return path if path.is_absolute() else (config.parent / path).resolve()
    return path.resolve()


def read_rows(task: LocalTask) -> list[dict]:
    """The task's rows as {query, choices, label} (multiple choice) or {query, answer}; bad rows are named."""
    path = Path(task.file)
    if not path.is_file():
        raise FtuneError(f"task {task.name}: data file {path} does not exist", hint="Fix `file:` in the task config.")
    text = path.read_text(encoding="utf-8", errors="strict")
    try:
        rows = json.loads(text) if text.lstrip().startswith("[") else [
            json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise FtuneError(f"{path}: not valid JSON / JSON lines (line {exc.lineno}: {exc.msg})") from None
    out, problems = [], []
    for i, row in enumerate(rows, 1):
        q = row.get(task.question) if isinstance(row, dict) else None
        if not isinstance(q, str) or not q.strip():
            problems.append(f"row {i}: column {task.question!r} missing or not text")
            continue
        query = task.prompt.format(question=q)
        if task.type == "generate":
            answer = row.get(task.answer)
            if not isinstance(answer, (str, int, float)):
                problems.append(f"row {i}: column {task.answer!r} missing")
                continue
            out.append({"query": query, "answer": str(answer)})
            continue
        choices, answer = row.get(task.choices), row.get(task.answer)
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            problems.append(f"row {i}: column {task.choices!r} must be a list of at least two texts")
            continue
        label = answer if isinstance(answer, int) and not isinstance(answer, bool) else (
            choices.index(answer) if answer in choices else None)
        if label is None or not 0 <= label < len(choices):
            problems.append(f"row {i}: {task.answer!r} = {answer!r} is neither an index into nor one of the choices")
            continue
        out.append({"query": query, "choices": choices, "label": label})
    if problems:
        raise FtuneError(f"{path}: {len(problems)} bad row(s) for task {task.name}", problems[:8],
                         "Fix the rows, or the column names in the task config.")
    if not out:
        raise FtuneError(f"{path}: task {task.name} has no rows")
    return out


def lm_eval_config(task: LocalTask, data_file: Path) -> dict[str, Any]:
    """The lm-eval task config for a checked local task (rows already in fixed columns)."""
    base = {"task": f"local_{task.name}", "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data_file)}}, "test_split": "test",
            "doc_to_text": "query", "num_fewshot": task.num_fewshot}
    if task.type == "multiple_choice":
        return base | {"output_type": "multiple_choice", "doc_to_choice": "choices", "doc_to_target": "label",
                       "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                                       {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}
    return base | {"output_type": "generate_until", "doc_to_target": "answer", "target_delimiter": " ",
                   "generation_kwargs": {"until": task.stop, "do_sample": False, "max_gen_toks": task.max_new_tokens},
                   "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                                    "ignore_case": True, "ignore_punctuation": True,
                                    "regexes_to_ignore": [r"^\s+", r"\s+$"]}]}


@dataclass
class Plan:
    """Checked benchmarks, ready to run: lm-eval task names and configs, and the temp folder of rows."""

    tasks: list[Any]
    names: list[str]
    folder: tempfile.TemporaryDirectory


def prepare(names: list[str], task_files: list[str]) -> Plan | None:
    """Check every benchmark before a model loads: names known to lm-eval and their data reachable,
    local task configs and rows valid. None when nothing was asked."""
    if not names and not task_files:
        return None
    require_lm_eval()
    folder = tempfile.TemporaryDirectory(prefix="ftune-tasks-")
    tasks: list[Any] = [ALIASES.get(n.lower(), n) for n in names]
    shown = list(tasks)
    for spec in task_files:
        task = load_task_config(spec)
        data_file = Path(folder.name) / f"{task.name}.jsonl"
        data_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in read_rows(task)))
        tasks.append(lm_eval_config(task, data_file))
        shown.append(f"local_{task.name}")
    _check_available(tasks)
    return Plan(tasks, shown, folder)


@functools.lru_cache(maxsize=1)
def _task_manager() -> Any:
    """lm-eval's index of its task configs (thousands of YAML files: built once per process)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(verbosity="ERROR")


def _check_available(tasks: list[Any]) -> None:
    """Build every task once (this loads its data): unknown names and unreachable data fail here."""
    from lm_eval.tasks import get_task_dict

    manager = _task_manager()
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if isinstance(t, str) and t not in known]
    if unknown:

        close = [m for u in unknown for m in difflib.get_close_matches(u, known, n=3)]
        raise FtuneError(f"benchmarks: unknown task(s) {', '.join(unknown)}",
                         [f"did you mean: {', '.join(close)}"] if close else [f"short names: {', '.join(sorted(ALIASES))}"],
                         "Use an lm-eval task name (lm-eval ls tasks) or a local task config via tasks=.")
    for task in tasks:
        try:
            get_task_dict([task], manager)
        except Exception as exc:
            name = task if isinstance(task, str) else task["task"]
            raise FtuneError(f"benchmark {name}: its data could not be loaded",
                             [f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"],
                             "Named benchmarks need their dataset in the local Hugging Face cache or the network "
                             "(HF_DATASETS_OFFLINE=0). Offline, describe your own file with a task config (tasks=…).") from None


def run(plan: Plan, model: Any, tokenizer: Any, batch_size: int = 8, limit: int | None = None,
        chat: bool = False) -> dict[str, dict[str, float]]:
    """Scores per task: {task: {metric: value}}; stderr entries dropped, groups (mmlu) included."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=plan.tasks, task_manager=_task_manager(), limit=limit,
                                  apply_chat_template=chat, bootstrap_iters=0, log_samples=False,
                                  verbosity="ERROR")
    scores = {}
    for name, metrics in (out or {}).get("results", {}).items():
        values = {k.split(",")[0]: float(v) for k, v in metrics.items()
                  if "," in k and "stderr" not in k and isinstance(v, (int, float))}
        if values:
            scores[name] = values
    return scores
