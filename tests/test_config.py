"""Every shipped recipe and config composes and validates; bad input gets one clear message."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ftune.config.compose import GROUPS, compose, group_choices, recipe_names
from ftune.config.schema import FtuneConfig
from ftune.errors import FtuneError
from ftune.methods.lora import LoraConfig

EXPECTED_RECIPES = {"smollm2-lora-sft", "smollm2-full-sft", "smollm2-lora-pt", "qlora-llama7b", "lora-llama3-8b",
                    "qlora-qwen2.5-7b", "lora-mistral-7b", "smollm2-dpo", "dpo-llama3-8b-lora", "smollm2-rm", "smollm2-ppo",
                    "ppo-llama2-7b-qlora"}


@pytest.fixture(scope="module")
def rm_run(tmp_path_factory):
    """A folder that passes the compose-time check of stage.reward_model (a run's config.yaml)."""
    run = tmp_path_factory.mktemp("rm-run")
    (run / "config.yaml").write_text("stage:\n  name: rm\n")
    return run


def extras(recipe: str, rm_run) -> list[str]:
    """PPO recipes score with a reward model run, which a fresh checkout does not have yet."""
    return [f"stage.reward_model={rm_run}"] if "ppo" in recipe else []


def test_the_recipes_the_docs_promise_ship():
    assert EXPECTED_RECIPES <= set(recipe_names())


@pytest.mark.parametrize("recipe", recipe_names())
def test_every_recipe_composes_and_validates(recipe, rm_run):
    cfg = compose([f"recipe={recipe}", *extras(recipe, rm_run)]).cfg
    assert isinstance(cfg, FtuneConfig) and cfg.recipe == recipe
    assert cfg.dataset.template is not None  # derived from the model when unset


@pytest.mark.parametrize("group,choice", [(g, c) for g in GROUPS for c in group_choices(g)])
def test_every_group_choice_composes(group, choice):
    overrides = [f"{group}={choice}"]
    if group == "dataset" and choice == "smol-corpus":
        overrides.append("stage=pt")
    if group == "dataset" and choice == "smol-prefs" or group == "stage" and choice == "dpo":
        overrides += ["stage=dpo", "dataset=smol-prefs"]
    if group == "dataset" and choice == "smol-feedback":
        overrides += ["stage=dpo", "stage.loss=kto"]
    if group == "stage" and choice == "rm":
        overrides.append("dataset=smol-prefs")
    if group == "stage" and choice == "ppo":
        overrides.append("stage.reward=length")
    if group == "method" and choice == "qlora":
        overrides.append("hardware=single-gpu")
    cfg = compose(overrides).cfg
    # Method files may be variants of one schema (lora-attn is a lora); the rest carry their own name.
    assert getattr(cfg, group).name == choice or choice.startswith(getattr(cfg, group).name + "-")


@pytest.mark.parametrize("recipe", recipe_names())
@pytest.mark.parametrize("method", ["full", "lora", "freeze"])
def test_any_recipe_takes_any_method(recipe, method, rm_run):
    """Recipes set no method-specific keys, so `method=…` on the command line always composes."""
    # DPO with a method that has no adapter to disable needs a reference-free loss.
    extra = ["stage.loss=simpo"] if "dpo" in recipe and method != "lora" else []
    if "ppo" in recipe and method != "lora":  # PPO's KL reference is the base with the adapter disabled
        with pytest.raises(FtuneError, match="no adapter to disable"):
            compose([f"recipe={recipe}", f"method={method}", *extras(recipe, rm_run)])
        return
    cfg = compose([f"recipe={recipe}", f"method={method}", *extra, *extras(recipe, rm_run)]).cfg
    assert cfg.method.name == method


def test_adding_keys_is_refused_not_silently_dropped():
    with pytest.raises(FtuneError, match="not supported"):
        compose(["method=full", "+method.r=4"])
    with pytest.raises(FtuneError, match="Key 'r' not in 'FullConfig'"):
        compose(["method=full", "method.r=4"])


def test_qlora_derives_a_4bit_base_and_lora_fields_are_typed():
    cfg = compose(["recipe=qlora-llama7b"]).cfg
    assert cfg.model.quantization == "4bit" and cfg.method.name == "qlora"
    assert isinstance(cfg.method, LoraConfig) and cfg.method.r == 64


def test_stage_pt_trains_every_token():
    assert compose(["recipe=smollm2-lora-pt"]).cfg.dataset.train_on == "all"


def test_overrides_beat_the_recipe():
    cfg = compose(["recipe=lora-mistral-7b", "method.r=4", "train.lr=1e-3", "model=smollm2-135m"]).cfg
    assert (cfg.method.r, cfg.train.lr, cfg.model.name) == (4, 1e-3, "smollm2-135m")


def test_unknown_choice_lists_valid_names():
    with pytest.raises(FtuneError) as err:
        compose(["method=lorra"])
    text = err.value.render()
    assert "Did you mean 'lora'" in text
    assert all(name in text for name in ("freeze", "full", "lora", "lora-attn", "qlora"))


def test_unknown_recipe_lists_recipes():
    with pytest.raises(FtuneError, match="smollm2-lora-sft"):
        compose(["recipe=nope"])


def test_all_problems_reported_at_once():
    with pytest.raises(FtuneError) as err:
        compose(["method.r=0", "train.lr=-1", "dataset.template=chatmll", "train.optim=paged_adamw_8bit"])
    problems = err.value.problems
    assert len(problems) == 4
    assert "method.r must be > 0 (got 0)" in problems[0]
    assert any("Did you mean 'chatml'" in p for p in problems)
    assert any("train.optim=paged_adamw_8bit" in p for p in problems)


def test_unknown_key_and_bad_type_are_config_errors():
    with pytest.raises(FtuneError, match="method.rr"):
        compose(["method.rr=3"])
    with pytest.raises(FtuneError, match="method.r"):
        compose(["method.r=abc"])


def test_sft_on_raw_text_is_refused_with_the_fix():
    with pytest.raises(FtuneError) as err:
        compose(["dataset=smol-corpus"])
    assert any("stage=pt" in p for p in err.value.problems)


def test_cli_prints_a_panel_not_a_traceback():
    out = subprocess.run([sys.executable, "-m", "ftune.cli", "config", "show", "method.r=0"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "method.r must be > 0" in out.stderr and "Traceback" not in out.stderr + out.stdout


def test_cli_config_show_and_recipes():
    show = subprocess.run([sys.executable, "-m", "ftune.cli", "config", "show", "method.r=8"],
                          capture_output=True, text=True, timeout=120)
    assert show.returncode == 0 and "r: 8" in show.stdout
    listing = subprocess.run([sys.executable, "-m", "ftune.cli", "recipes"], capture_output=True, text=True,
                             timeout=120, env={"COLUMNS": "200", "PATH": ""})
    assert listing.returncode == 0 and "qlora-llama7b" in listing.stdout
