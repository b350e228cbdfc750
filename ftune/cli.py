"""The command line: maps commands to functions, nothing more. Overrides are Hydra overrides."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ftune.errors import FtuneError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Config-driven fine-tuning for causal language models.")
config_app = typer.Typer(no_args_is_help=True, help="Inspect composed configs.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect datasets as the trainer sees them.")
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")
import_app = typer.Typer(no_args_is_help=True, help="Another tool's training config -> an ftune recipe file.")
app.add_typer(import_app, name="import")
console = Console()

OVERRIDES = typer.Argument(None, help="recipe=NAME and Hydra overrides, e.g. method=lora train.lr=1e-4")


@app.command()
def train(overrides: Optional[List[str]] = OVERRIDES,
          print_launch: bool = typer.Option(False, "--print-launch", help="Print the launch command (torchrun for "
                                            "several processes) and exit; for SLURM scripts."),
          force: bool = typer.Option(False, "--force", help="Train even when the memory preflight says it will not fit."),
          overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run directory of the same "
                                         "train.run_name (same as train.overwrite=true).")
          ) -> None:
    """Train: compose the recipe, validate it, check memory, then run the trainer (relaunched under
    torchrun when the hardware profile asks for several processes)."""
    from ftune.config.compose import compose
    from ftune.runtime import world_size
    from ftune.train import distributed

    overrides = [*(overrides or []), *(["train.overwrite=true"] if overwrite else [])]
    composed = compose(overrides)
    cfg = composed.cfg
    several = world_size(cfg) > 1 and not distributed.in_launcher()
    if several or print_launch:
        cmd, env = (distributed.launch_command(cfg, list(overrides or [])) if world_size(cfg) > 1
                    else ([sys.executable, "-m", "ftune.cli", "train", *(overrides or [])], {}))
        if print_launch:
            print(distributed.shell(cmd, env))
            return
    if distributed.is_main() and not os.environ.get(distributed.LAUNCHED):  # checked once, before launching
        from ftune.plan import preflight

        preflight(cfg, console, force)
    if several:
        console.print(f"launching {world_size(cfg)} processes: {distributed.shell(cmd, env)}")
        code, error = distributed.relaunch(cmd, env, debug=os.environ.get("FTUNE_DEBUG") == "1")
        if error:  # once, whichever process failed first
            show_panel(error["title"], error["text"])
        elif code:
            show_panel("ftune: error", f"a training process ended with exit code {code} and left no message "
                       "(killed by the system, e.g. out of memory?). Run the same command with --debug for "
                       "every process's output.")
        sys.exit(code)
    from ftune.train.run import train as run_train

    result = run_train(composed, console)
    if result.get("signal"):  # stopped on SIGINT/SIGTERM after writing a checkpoint
        sys.exit(130 if result["signal"] == "SIGINT" else 143)


@app.command()
def merge(args: Optional[List[str]] = typer.Argument(None, help="run=<run dir> [out=<dir>] [dtype=bfloat16|float16|float32]"),
          overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty out folder.")) -> None:
    """Fold a run's adapter into its base and save a standard Hugging Face model."""
    from ftune.export.merge import merge_run

    opts = key_values(args or [], ("run", "out", "dtype"))
    if "run" not in opts:
        raise FtuneError("ftune merge needs run=<run dir>", hint="e.g. ftune merge run=outputs/smollm2-lora-sft-… out=merged/")
    with console.status("merging"):
        target = merge_run(opts["run"], opts.get("out"), opts.get("dtype", "bfloat16"), overwrite)
    console.print(f"merged model: {target}")


EVAL_KEYS = ("run", "model", "n", "max_new_tokens", "benchmarks", "tasks", "limit", "chat", "base", "out", "judge", "tie")


@app.command("eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def eval_run(args: Optional[List[str]] = typer.Argument(
        None, help="run=<run dir> or model=<path>, then optionally n=16 max_new_tokens=128 "
                   "benchmarks=arc,hellaswag,mmlu,truthfulqa tasks=smol-mc,my-task.yaml limit=N chat=true base=false "
                   "out=DIR; with model= also config overrides (dataset=…). With --compare: runs or models, "
                   "judge=<rm run>, optionally n=32 tie=0 out=DIR."),
             compare: bool = typer.Option(False, "--compare", help="Compare runs/models judged by a reward model run.")
             ) -> None:
    """Report: held-out loss vs base, answers with error analysis, benchmarks; or --compare runs by a reward model."""
    items = args or []
    if compare:
        from ftune.eval.compare import compare as run_compare
        from ftune.eval.compare import markdown as compare_markdown

        entries = [a for a in items if "=" not in a]
        opts = key_values([a for a in items if "=" in a], ("judge", "n", "max_new_tokens", "tie", "out"))
        with console.status("answering and judging"):
            report = run_compare(entries, opts.get("judge", ""), _int(opts, "n", 32), _int(opts, "max_new_tokens", 128),
                                 float(opts.get("tie", 0.0)), opts.get("out"))
        console.print(compare_markdown(report))
        console.print(f"written: {report['out']}/compare.md and compare.json")
        return
    from ftune.eval.report import EvalOptions, evaluate, markdown

    mine = [a for a in items if a.partition("=")[0] in EVAL_KEYS]
    overrides = [a for a in items if a.partition("=")[0] not in EVAL_KEYS]
    opts = key_values(mine, EVAL_KEYS)
    if "model" not in opts and overrides:  # a typo of one of eval's own keys, or overrides given to a run
        key_values(overrides, EVAL_KEYS)
    listed = lambda key: tuple(x for x in opts.get(key, "").split(",") if x)  # noqa: E731
    options = EvalOptions(n_prompts=_int(opts, "n", 16), max_new=_int(opts, "max_new_tokens", 128),
                          benchmarks=listed("benchmarks"), tasks=listed("tasks"),
                          limit=_int(opts, "limit", 0) or None, chat=_flag(opts, "chat", False),
                          base=_flag(opts, "base", True), out=opts.get("out"))
    with console.status("evaluating"):
        report = evaluate(opts.get("run"), opts.get("model"), overrides, options)
    console.print(markdown(report))
    console.print(f"written: {report['out']}/report.md, report.json" + (", summary.png" if report.get("plot") else ""))


def _int(opts: dict[str, str], key: str, default: int) -> int:
    try:
        return int(opts.get(key, default))
    except ValueError:
        raise FtuneError(f"{key}={opts[key]!r} is not a whole number") from None


def _flag(opts: dict[str, str], key: str, default: bool) -> bool:
    value = opts.get(key)
    if value is None:
        return default
    if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise FtuneError(f"{key}={value!r} must be true or false")
    return value.lower() in ("true", "1", "yes")


@app.command()
def serve(runs: List[str] = typer.Argument(..., help="Run directories of LoRA-family adapters on one base."),
          port: int = typer.Option(8000, "--port"), host: str = typer.Option("127.0.0.1", "--host"),
          max_loaded: int = typer.Option(4, "--max-loaded", help="Adapters kept on the device at once (LRU)."),
          window_ms: int = typer.Option(20, "--batch-window-ms", help="How long to gather requests into one batch."),
          engine: str = typer.Option("ftune", "--engine", help="ftune (CPU or GPU) or vllm (CUDA, vllm installed)."),
          print_command: bool = typer.Option(False, "--print-command", help="vllm: print the command, do not start it.")
          ) -> None:
    """OpenAI-compatible server: the request's `model` picks the adapter (run directory name)."""
    import time

    if engine not in ("ftune", "vllm"):
        raise FtuneError(f"--engine {engine} is unknown", ["engines: ftune, vllm"])
    if engine == "vllm":
        import os

        from ftune.serve import vllm

        cmd = vllm.command(runs, host, port, max_loaded, Path("outputs") / "serve")
        if print_command:
            print(vllm.shell(cmd))
            return
        vllm.check_available()
        console.print(f"starting vLLM: {vllm.shell(cmd)}")
        os.execv(cmd[0], cmd) if Path(cmd[0]).is_file() else os.execvp(cmd[0], cmd)

    from ftune.serve.engine import AdapterPool
    from ftune.serve.server import serve as start

    with console.status("loading"):
        pool = AdapterPool(runs, max_loaded)
    server = start(pool, host, port, window_ms)
    console.print(f"serving {', '.join(pool.names)} on http://{host}:{port}/v1 (Ctrl-C stops)")
    try:
        while True:
            time.sleep(3600)
    finally:
        server.shutdown()


@app.command()
def chat(run: str = typer.Argument(..., help="A run directory (LoRA-family adapter)."),
         max_tokens: int = typer.Option(256, "--max-tokens")) -> None:
    """Interactive chat with a trained run, streamed token by token (empty line or Ctrl-D ends)."""

    from ftune.serve.engine import AdapterPool, Request

    with console.status("loading"):
        pool = AdapterPool([run], max_loaded=1)
    name, history = Path(run).name, []
    console.print(f"chatting with {name} (template {pool.cfg.dataset.template}); empty line ends")
    while True:
        try:
            text = console.input("[bold]you>[/] ")
        except EOFError:
            break
        if not text.strip():
            break
        history.append({"role": "user", "content": text})
        console.print("[bold]model>[/] ", end="")
        answer = ""
        for piece in pool.stream(Request(name, history, max_tokens)):
            answer += piece
            console.print(piece, end="", markup=False, highlight=False)
        console.print()
        history.append({"role": "assistant", "content": answer.strip()})


@app.command("export-gguf")
def export_gguf(source: str = typer.Argument(..., help="A merged model folder (ftune merge) or a run directory."),
                quant: str = typer.Option("q8_0", "--quant", help="f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1, or a k-quant "
                                                                   "(q4_k_m, q5_k_m, q6_k, …) with llama-cpp-python."),
                out: Optional[str] = typer.Option(None, "--out", help="The .gguf file (default gguf/<name>-<quant>.gguf)."),
                check: bool = typer.Option(True, "--verify/--no-verify", help="Load the file again and compare logits."),
                ollama: bool = typer.Option(False, "--modelfile", help="Also write an ollama Modelfile.")) -> None:
    """Write a GGUF file for llama.cpp / ollama, then load it again and compare with the HF model."""
    from ftune.export.gguf import export

    notes: list[str] = []
    with console.status(f"exporting {quant}"):
        path, result = export(source, quant, out, check, ollama, notes=notes)
    for note in notes:
        console.print(note)
    console.print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    if result is not None:
        console.print(f"verified with {result.verifier}: top-1 agreement {result.top1_agreement:.3f}, "
                      f"max logit difference {result.max_logit_diff:.3f}")
        for prompt, answer in zip(("capital of France", "42 in words", "three colours"), result.answers):
            console.print(f"  {prompt}: {answer!r}")


def key_values(items: list[str], keys: tuple[str, ...]) -> dict[str, str]:
    """key=value arguments of a command; unknown keys are refused with the valid ones."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or key not in keys:
            raise FtuneError(f"'{item}' is not one of this command's arguments",
                             [f"valid: {', '.join(k + '=…' for k in keys)}"])
        out[key] = value
    return out


@app.command()
def plan(overrides: Optional[List[str]] = OVERRIDES) -> None:
    """Estimate peak memory per device for the composed recipe (loads no model), and what would fit."""
    from ftune.config.compose import compose
    from ftune.plan import GIB, checkpoint_note, knobs, model_shape, render, resolve_checkpointing

    cfg = compose(overrides or []).cfg
    shape = model_shape(cfg)
    layers, est = resolve_checkpointing(cfg, shape)
    console.print(render(est))
    if layers:
        console.print(f"  {checkpoint_note(layers, shape.layers)} (train.gradient_checkpointing="
                      f"{cfg.train.gradient_checkpointing})")
    if not est.fits:
        console.print(f"[red]does not fit[/]: {est.total / GIB:.1f} GiB > {est.available / GIB:.1f} GiB")
        for fix in knobs(cfg, shape) or ["no single change found"]:
            console.print(f"  would fit: {fix}")


@app.command()
def recipes() -> None:
    """List the shipped recipes, one line each."""
    from ftune.config.compose import DEFAULT_RECIPE, recipe_description, recipe_names

    table = Table("recipe", "description", box=None)
    for name in recipe_names():
        table.add_row(name + (" (default)" if name == DEFAULT_RECIPE else ""), recipe_description(name))
    console.print(table)


@config_app.command("show")
def config_show(overrides: Optional[List[str]] = OVERRIDES) -> None:
    """Print the composed, validated config (loads no model or data)."""
    from ftune.config.compose import compose

    print(compose(overrides or []).to_yaml(), end="")


@data_app.command("preview")
def data_preview(overrides: Optional[List[str]] = OVERRIDES,
                 n: int = typer.Option(3, "--n", "-n", help="How many samples to render.")) -> None:
    """Render samples through the template: trained tokens highlighted, with counts."""
    from ftune.config.compose import compose
    from ftune.data.preview import preview

    preview(compose(overrides or []).cfg, n, console)


def _report_import(migration, out: Path) -> None:
    from ftune.migrate import write

    path = write(migration, out)
    console.print(f"wrote {path}  (train it: ftune train recipe={path})")
    for note in migration.assumed:
        console.print(Text(f"assumed: {note}"), soft_wrap=True)
    if migration.not_carried:
        console.print(f"[yellow]not carried over ({len(migration.not_carried)}):[/]")
        for key, why in migration.not_carried:
            console.print(Text(f"  {key}: {why}"), soft_wrap=True)


IMPORT_OUT = typer.Option(None, "--out", "-o", help="Recipe file to write (default: <config name>-ftune.yaml here).")


@import_app.command("llamafactory")
def import_llamafactory(config: Path = typer.Argument(..., help="LLaMA-Factory training YAML"),
                        dataset_info: Optional[Path] = typer.Option(None, "--dataset-info", help="its dataset_info.json "
                                                                    "(default: <dataset_dir>/dataset_info.json)"),
                        out: Optional[Path] = IMPORT_OUT) -> None:
    """A LLaMA-Factory training config (and its dataset_info.json) as an ftune recipe."""
    from ftune.migrate import llamafactory

    _report_import(llamafactory.convert(config, dataset_info), out or Path(f"{config.stem}-ftune.yaml"))


@import_app.command("axolotl")
def import_axolotl(config: Path = typer.Argument(..., help="axolotl config YAML"), out: Optional[Path] = IMPORT_OUT) -> None:
    """An axolotl config as an ftune recipe."""
    from ftune.migrate import axolotl

    _report_import(axolotl.convert(config), out or Path(f"{config.stem}-ftune.yaml"))


def show_panel(title: str, text: str) -> None:
    from ftune import safety

    # Text, not markup: "[i]" or "[0]" in a message is literal, not a style.
    Console(stderr=True).print(Panel(Text(safety.redact(text)), title=title, border_style="red", expand=False))


def exit_with_panel(title: str, text: str, code: int) -> None:
    """One panel and the exit code. In a process relaunched under torchrun the panel goes to the
    launching command, which shows the first process's once (train/distributed.report_error)."""
    from ftune import safety
    from ftune.train import distributed

    if not distributed.report_error(title, safety.redact(text)):
        show_panel(title, text)
    sys.exit(code)


def main() -> None:
    from ftune import safety
    from ftune.logs import quiet_libraries

    # --debug anywhere on the line: show tracebacks (also of FtuneErrors) instead of short panels.
    debug = "--debug" in sys.argv[1:] or os.environ.get("FTUNE_DEBUG") == "1"
    sys.argv = [a for a in sys.argv if a != "--debug"]
    if debug:
        os.environ["FTUNE_DEBUG"] = "1"  # processes relaunched under torchrun inherit it
    # Credentials from the environment never reach the screen or a log, whatever prints them.
    safety.install()
    quiet_libraries()

    def error_panel(exc: FtuneError) -> None:
        exit_with_panel("ftune: error", exc.render(), 2)

    try:
        app()
    except FtuneError as exc:
        if debug:
            raise
        error_panel(exc)
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted")
        sys.exit(130)
    except Exception as exc:  # a bug or an input ftune does not check yet: short, with the way to more
        if debug:
            raise
        if type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError: the run is too big, not a bug
            from ftune.errors import out_of_memory

            error_panel(out_of_memory(exc))
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        exit_with_panel("ftune: unexpected error", f"{type(exc).__name__}: {first}\nRun the same command with "
                        "--debug for the full traceback, and report it if the input looks right.", 1)


if __name__ == "__main__":
    main()
