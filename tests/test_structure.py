"""The structure the code promises: a method is one module (its spec and schema registered once)
and nothing outside it names the method; the layer contracts themselves run in `make lint`."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from ftune import resources
from ftune.config.registry import schemas
from ftune.methods import SPECS

ROOT = Path(__file__).resolve().parents[1]


def _method_modules() -> dict[str, Path]:
    """method name -> the module that registers it."""
    import sys

    return {name: Path(sys.modules[SPECS.get(name).apply.__module__].__file__) for name in SPECS.names()}


def test_every_method_is_one_registered_spec_with_a_yaml():
    registered = set(SPECS.names())
    assert registered == set(schemas("method"))
    named = set()
    for path in (resources.configs_dir() / "method").glob("*.yaml"):
        defaults = yaml.safe_load(path.read_text())["defaults"]
        schema = next(d for d in defaults if isinstance(d, str) and d.startswith("/schema/method/"))
        named.add(schema.removeprefix("/schema/method/").removesuffix("@_here_"))
    assert named == registered, (named ^ registered)
    for name in registered:  # the spec and its schema live in one module
        assert SPECS.get(name).schema.__module__ == SPECS.get(name).apply.__module__, name


def _names_a_method(node: ast.AST, methods: set[str]) -> bool:
    """`….method.name == "x"`, `method.name in ("x", …)`, or a literal tuple/set/list of two or more
    method names (a hand-kept list such as the old PEFT_METHODS)."""
    if isinstance(node, ast.Compare):
        left = node.left
        is_method_name = isinstance(left, ast.Attribute) and left.attr in ("name",) and (
            (isinstance(left.value, ast.Attribute) and left.value.attr == "method")
            or (isinstance(left.value, ast.Name) and left.value.id in ("method", "m")))
        if is_method_name:
            for right in node.comparators:
                values = right.elts if isinstance(right, (ast.Tuple, ast.List, ast.Set)) else [right]
                if any(isinstance(v, ast.Constant) and v.value in methods for v in values):
                    return True
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        found = [e.value for e in node.elts if isinstance(e, ast.Constant) and e.value in methods]
        return len(found) >= 2
    return False


def test_no_module_but_its_own_names_a_method():
    methods = set(SPECS.names()) - {"prompt"}  # "prompt" is also a data format and a row field
    own = set(_method_modules().values())
    offenders = []
    for path in sorted((ROOT / "ftune").rglob("*.py")):
        if path in own or path.parent.name == "migrate":  # importers translate other tools' names to ftune's
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if _names_a_method(node, methods):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders


def test_the_check_finds_a_hand_kept_method_list():
    """The scan above must be able to fail: the old code's patterns are caught."""
    methods = set(SPECS.names())
    old = ['cfg.method.name == "dylora"', 'method.name in ("full", "freeze")',
           'PEFT_METHODS = ("lora", "qlora", "ia3")']
    for text in old:
        assert any(_names_a_method(n, methods) for n in ast.walk(ast.parse(text))), text
    assert not any(_names_a_method(n, methods) for n in ast.walk(ast.parse('cfg.stage.name == "dpo"')))


def _names_a_stage(node: ast.AST, stages: set[str]) -> bool:
    """`….stage.name == "x"`, `stage in ("x", …)` (a variable holding the stage's name)."""
    if not isinstance(node, ast.Compare):
        return False
    left = node.left
    is_stage = (isinstance(left, ast.Attribute) and left.attr == "name" and isinstance(left.value, ast.Attribute)
                and left.value.attr == "stage") or (isinstance(left, ast.Name) and left.id == "stage")
    if not is_stage:
        return False
    for right in node.comparators:
        values = right.elts if isinstance(right, (ast.Tuple, ast.List, ast.Set)) else [right]
        if any(isinstance(v, ast.Constant) and v.value in stages for v in values):
            return True
    return False


def test_no_module_outside_the_stages_names_a_stage():
    """What differs between stages comes from their schemas' facts and specs (train/objectives/)."""
    from ftune.train.objectives import STAGES

    stages = set(STAGES.names())
    offenders = []
    for path in sorted((ROOT / "ftune").rglob("*.py")):
        if path.parent.name in ("objectives", "migrate"):  # migrate: other tools' stage names -> ftune's
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if _names_a_stage(node, stages):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders
    old = ['cfg.stage.name == "dpo"', 'stage in ("pt", "sft")', 'if stage != "ppo": pass']
    for text in old:  # the check catches the patterns it replaced
        assert any(_names_a_stage(n, stages) for n in ast.walk(ast.parse(text))), text


# Modules a function may import late: optional extras, or imports slow enough (0.5-7 s: peft pulls
# bitsandbytes, transformers' model classes, accelerate, torch's compiler and distributed stack)
# that config checks, `ftune plan` and the error paths should not pay for them.
DEFERRED = ("peft", "transformers", "bitsandbytes", "lm_eval", "llama_cpp", "vllm", "gguf", "matplotlib",
            "triton", "flash_attn", "datasets", "torch._dynamo", "torch._inductor", "torch.distributed",
            "torch.utils.tensorboard", "deepspeed", "pyarrow", "accelerate", "trl", "liger_kernel",
            "huggingface_hub")


def _late_imports(source: str) -> list[tuple[int, str]]:
    """(line, module) of each import inside a function whose module is not in DEFERRED."""
    found = []
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or "."] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                if not any(name == d or name.startswith(d + ".") for d in DEFERRED):
                    found.append((node.lineno, name))
    return found


def test_imports_inside_functions_only_for_optional_or_slow_dependencies():
    """Everything else is imported at the top, where a reader sees a module's dependencies. The CLI
    is the exception: it imports a command's modules when the command runs, so `ftune --help` and
    a config error answer in a fraction of a second."""
    offenders = []
    for path in sorted([*(ROOT / "ftune").rglob("*.py"), *(ROOT / "scripts").glob("*.py")]):
        if path.name == "cli.py":
            continue
        offenders += [f"{path.relative_to(ROOT)}:{line} {name}" for line, name in _late_imports(path.read_text())]
    assert not offenders, offenders
    assert _late_imports("def f():\n    import json\n    from ftune import errors\n") == [(2, "json"), (3, "ftune")]
    assert _late_imports("def f():\n    import peft\n    from transformers import AutoConfig\n") == []
