"""The ``synthia`` command: chat, one-shot generation, branches, download, system info.

A thin face over the library. ``chat`` and ``generate`` build a `ChatSynthia` from their options
(validated by its own fields, so the CLI accepts exactly what the class accepts) and answer
through `ChatSynthia.stream` and `SynthiaOutputParser`. Heavy imports wait until a command
runs, so ``synthia --help`` does not import torch.

Exit codes: 0 success; 1 an error while loading or generating; 2 a usage error (bad option or
value); 3 the model is not available (not downloaded and the Hub not reachable, or offline);
130 interrupted by Ctrl-C.

Every error ends the command with one ``Error: ...`` message and its exit code, never a
traceback (``SYNTHIA_VERBOSE=1`` shows one for an error the CLI does not expect). What the
model, a server or a file says is cleaned by `printable` before it is shown.
"""

import errno
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from langchain_synthia._console import printable, printable_json, printable_line, verbose
from langchain_synthia._version import __version__
from langchain_synthia.variants import DEFAULT_BRANCH, DEFAULT_REPO, VARIANTS

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_INTERRUPTED = 130

DEMO_MAX_TOKENS = 32
"""``--max-tokens`` under ``--demo`` when none is given: a few lines of the tiny model's words."""


class _Failure(click.ClickException):
    """An error with its exit code, printed as ``Error: ...`` without a traceback.

    The message is cleaned by `printable`: it may quote a server or a file.
    """

    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(printable(message))
        self.exit_code = exit_code


class _Synthia(click.Group):
    """The command group: every command ends with its result, or one error and its exit code.

    Ctrl-C anywhere ends the command with exit code 130. An error no command expects ends it
    with exit code 1 and a one-line ``Error: ...`` naming the exception's type
    (``SYNTHIA_VERBOSE=1`` raises it, traceback and all). A closed pipe on standard output
    (``synthia generate ... | head -c 10``) ends it quietly, as Unix tools do (click's own
    handling: exit code 1).
    """

    def invoke(self, ctx: click.Context) -> Any:
        _open_standard_descriptors()
        if sys.stdout is None:
            raise _Failure(
                "Standard output is closed: redirect it (> FILE, or > /dev/null to discard "
                "what the command prints) instead of closing it."
            )
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("\nInterrupted.", err=True)
            ctx.exit(EXIT_INTERRUPTED)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except OSError as error:
            if error.errno == errno.EPIPE or verbose():
                raise
            raise _Failure(_unexpected(error)) from None
        except Exception as error:
            if verbose():
                raise
            raise _Failure(_unexpected(error)) from None


def _unexpected(error: BaseException) -> str:
    reason = printable_line(str(error))
    where = f"{type(error).__name__}; SYNTHIA_VERBOSE=1 shows where"
    return f"{reason} ({where})" if reason else f"({where})"


def _open_standard_descriptors() -> None:
    """Put /dev/null on standard descriptors the command was started with closed.

    Otherwise the next file opened (a checkpoint, the log) would take descriptor 0, 1 or 2,
    and what is written to the stream would land in it. With standard error closed, its
    messages are dropped; standard input and output stay ``None`` for the commands to refuse.
    """
    for descriptor in (0, 1, 2):
        try:
            os.fstat(descriptor)
        except OSError:
            opened = os.open(os.devnull, os.O_RDWR)  # the lowest free descriptor: this one
            if opened != descriptor:
                os.dup2(opened, descriptor)
                os.close(opened)
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115  kept to the end


def _valid_text(text: str, what: str, encoding: str) -> str:
    """`text` decoded with ``surrogateescape``, its undecodable bytes shown as U+FFFD, said."""
    replaced = len(re.findall("[\ud800-\udfff]", text))
    if not replaced:
        return text
    click.echo(
        f"Warning: {what} is not valid {encoding}: {replaced} undecodable "
        f"byte{'s' if replaced > 1 else ''} replaced with U+FFFD (\N{REPLACEMENT CHARACTER}).",
        err=True,
    )
    return re.sub("[\ud800-\udfff]", "\N{REPLACEMENT CHARACTER}", text)


def _tolerant_stdin() -> str:
    """Standard input's encoding, read with undecodable bytes kept for `_valid_text`."""
    stdin = sys.stdin
    if hasattr(stdin, "reconfigure"):
        stdin.reconfigure(errors="surrogateescape")
    return getattr(stdin, "encoding", None) or "utf-8"


# -- options shared by `chat` and `generate`: each one is a ChatSynthia field -----------------

_MODEL_OPTIONS = (
    click.option(
        "--model",
        help=f"Hub repo id or checkpoint folder. [default: $SYNTHIA_MODEL or {DEFAULT_REPO}]",
    ),
    click.option(
        "--revision",
        help="Branch (see `synthia variants`) or a 40-character commit hash. [default: main]",
    ),
    click.option("--device", help="auto, cpu, cuda or cuda:N. [default: auto]"),
    click.option("--kernel", help="GPTQ kernel, e.g. gptq_marlin or triton. [default: by device]"),
    click.option(
        "--context-window", type=int, help="Tokens of prompt plus answer. [default: 4096]"
    ),
    click.option(
        "--max-batch-size",
        type=int,
        default=1,
        show_default=True,
        help="Calls decoded at once at most (KV memory is held by the token).",
    ),
    click.option(
        "--offline",
        "local_files_only",
        is_flag=True,
        default=None,
        help="Never download: use the Hugging Face cache only.",
    ),
    click.option("--cache-dir", help="Hugging Face cache folder. [default: HF_HUB_CACHE]"),
    click.option(
        "--base-url",
        help="Remote mode: the /v1 URL of a server that serves Synthia (vLLM, llama.cpp, ...); "
        "--model is then the served name. [default: $SYNTHIA_BASE_URL]",
    ),
)

_SAMPLING_OPTIONS = (
    click.option("--temperature", type=float, help="0 is greedy; 0 to 5. [default: 0.7]"),
    click.option("--top-p", type=float, help="Nucleus sampling, above 0 up to 1. [default: 0.95]"),
    click.option(
        "--top-k", type=int, help="Keep the k most likely tokens; 0 is off. [default: 40]"
    ),
    click.option(
        "--repetition-penalty", type=float, help="1 is off; above 0 up to 10. [default: 1.1]"
    ),
    click.option(
        "--max-tokens",
        type=int,
        help=f"Most new tokens per answer. [default: 512; with --demo: {DEMO_MAX_TOKENS}]",
    ),
    click.option("--seed", type=int, help="Seed for reproducible sampling."),
    click.option("--stop", multiple=True, help="A stop sequence (repeat for more)."),
    click.option("--timeout", type=float, help="Seconds an answer may take."),
)

_DEMO_OPTION = click.option(
    "--demo",
    is_flag=True,
    help="Run on a tiny random-weight checkpoint built offline on the CPU (no GPU, no "
    f"download): it shows the plumbing works and answers gibberish ({DEMO_MAX_TOKENS} tokens "
    "unless --max-tokens; chat keeps a log only with --log).",
)


def _options(*decorators: Callable) -> Callable:
    def apply(function: Callable) -> Callable:
        for decorator in reversed(decorators):
            function = decorator(function)
        return function

    return apply


def _chat_model(fields: dict[str, Any], *, demo: bool) -> Any:
    """A `ChatSynthia` from the command's options; a bad value is a usage error naming it."""
    from pydantic import ValidationError

    from langchain_synthia import ChatSynthia

    fields = {name: value for name, value in fields.items() if value not in (None, ())}
    if "stop" in fields:
        fields["stop"] = list(fields["stop"])
    if demo:
        for name in ("model", "revision", "device"):
            if name in fields:
                raise click.UsageError(f"--demo runs its own checkpoint on the CPU: drop --{name}.")
        from langchain_synthia.testing import demo_checkpoint

        fields = {"max_tokens": DEMO_MAX_TOKENS, **fields}
        click.echo(
            "Demo mode: a tiny random-weight checkpoint on the CPU; gibberish answers of "
            f"{fields['max_tokens']} tokens at most.",
            err=True,
        )
        fields |= {"model": str(demo_checkpoint()), "device": "cpu"}
    try:  # the CLI sends its system message itself, so "none" means no SYSTEM: line
        return ChatSynthia(**fields, system_message=None)
    except ValidationError as error:
        reasons = []
        for detail in error.errors():
            reason = detail["msg"].removeprefix("Value error, ")
            option = "-".join(map(str, detail["loc"])).replace("_", "-")
            reasons.append(f"--{option}: {reason}" if option else reason)
        raise click.UsageError("; ".join(reasons)) from None


def _load(chat_model: Any) -> None:
    """Fetch the checkpoint if needed (with its progress bars), then load with a progress line."""
    from langchain_synthia._console import progress
    from langchain_synthia._loading import download

    if chat_model.base_url:
        try:
            chat_model.load()  # asks the server for its models
        except RuntimeError as error:
            raise _Failure(str(error), EXIT_UNAVAILABLE) from None
        return
    try:
        if not Path(chat_model.model).expanduser().is_dir():
            download(
                chat_model.model,
                chat_model.revision,
                chat_model.cache_dir,
                chat_model.local_files_only,
            )
        with progress(f"Loading {chat_model.model} ({chat_model.revision})"):
            chat_model.load()
    except FileNotFoundError as error:
        raise _Failure(str(error), EXIT_UNAVAILABLE) from None
    except (ImportError, OSError, RuntimeError, ValueError) as error:
        raise _Failure(str(error)) from None


def _system_message(system: str | None, tree_of_thought: bool) -> str | None:
    from langchain_synthia.prompts import (
        DEFAULT_SYSTEM_MESSAGE,
        TREE_OF_THOUGHT_SYSTEM_MESSAGE,
    )

    if system is not None and tree_of_thought:
        raise click.UsageError(
            "--system and --tree-of-thought both set the system message: pick one."
        )
    if tree_of_thought:
        return TREE_OF_THOUGHT_SYSTEM_MESSAGE
    return DEFAULT_SYSTEM_MESSAGE if system is None else system or None


def _default_log() -> Path:
    data = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return data / "langchain-synthia" / "conversations.jsonl"


# -- the commands ---------------------------------------------------------------------------


@click.group(cls=_Synthia)
@click.version_option(__version__, prog_name="synthia")
def main() -> None:
    """Synthia-7B-v1.3 (GPTQ) on your own GPU, through LangChain.

    Exit codes: 0 success, 1 error, 2 bad usage, 3 model not available, 130 Ctrl-C.
    """


@main.command()
@_options(*_MODEL_OPTIONS, *_SAMPLING_OPTIONS, _DEMO_OPTION)
@click.option(
    "--tree-of-thought", is_flag=True, help="Start with the card's Tree-of-Thought message."
)
@click.option("--system", help="Your own system message ('' for none).")
@click.option(
    "--log",
    "log_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="SYNTHIA_CHAT_LOG",
    help="JSONL file each exchange is appended to, as the card's loop does. "
    "[default: $SYNTHIA_CHAT_LOG or ~/.local/share/langchain-synthia/conversations.jsonl]",
)
@click.option("--no-log", is_flag=True, help="Keep no conversation log.")
def chat(
    tree_of_thought: bool,
    system: str | None,
    log_path: Path | None,
    no_log: bool,
    demo: bool,
    **fields: Any,
) -> None:
    """Chat with Synthia: answers stream as they come; /help lists the commands."""
    from langchain_synthia._repl import ChatSession, read_message

    if sys.stdin is None:
        raise click.UsageError("Standard input is closed: chat reads your messages from it.")
    encoding = _tolerant_stdin()
    system_message = _system_message(system, tree_of_thought)
    chat_model = _chat_model(fields, demo=demo)
    log_source = click.get_current_context().get_parameter_source("log_path")
    from_command_line = log_source == click.core.ParameterSource.COMMANDLINE
    if no_log and from_command_line:
        raise click.UsageError("--log and --no-log contradict each other: pick one.")
    # the demo's gibberish stays out of the real conversation log unless --log asks for a file
    keep_log = not no_log and (from_command_line or not demo)
    log = (log_path or _default_log()) if keep_log else None
    _load(chat_model)
    click.echo("Type a message; /help lists the commands; /exit or Ctrl-D leaves.", err=True)
    if log is not None:
        click.echo(f"Conversation log: {log} (--no-log keeps none)", err=True)
    elif demo and not no_log:
        click.echo("Demo mode keeps no conversation log (--log FILE keeps one).", err=True)
    session = ChatSession(chat_model, system_message=system_message, log_path=log, write=click.echo)
    if sys.stdin.isatty():
        import readline  # noqa: F401  line editing and history for input()
    while True:
        try:
            message = _valid_text(read_message(input), "the message", encoding)
        except EOFError:
            click.echo()
            return
        if not session.handle(message):
            return


@main.command()
@click.argument("prompt", required=False)
@_options(*_MODEL_OPTIONS, *_SAMPLING_OPTIONS, _DEMO_OPTION)
@click.option("--tree-of-thought", is_flag=True, help="Use the card's Tree-of-Thought message.")
@click.option("--system", help="Your own system message ('' for none).")
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object: text, finish reason, usage."
)
def generate(
    prompt: str | None,
    tree_of_thought: bool,
    system: str | None,
    as_json: bool,
    demo: bool,
    **fields: Any,
) -> None:
    """Answer PROMPT (or standard input, or '-') once, streamed to standard output.

    For scripts: the answer goes to stdout, messages to stderr.
    """
    from langchain_core.messages import HumanMessage, SystemMessage

    from langchain_synthia._repl import stream_answer

    if prompt is None or prompt == "-":
        if sys.stdin is None:
            raise click.UsageError("Give a PROMPT: standard input is closed.")
        if prompt is None and sys.stdin.isatty():
            raise click.UsageError("Give a PROMPT, or pipe the prompt into standard input.")
        encoding = _tolerant_stdin()
        prompt = _valid_text(sys.stdin.read(), "the prompt", encoding)
    else:
        prompt = _valid_text(prompt, "the prompt", sys.getfilesystemencoding())
    if not prompt.strip():
        raise click.UsageError("The prompt is empty.")
    system_message = _system_message(system, tree_of_thought)
    chat_model = _chat_model(fields, demo=demo)
    _load(chat_model)
    messages = [*([SystemMessage(system_message)] if system_message else []), HumanMessage(prompt)]

    started = False

    def write(piece: str) -> None:
        nonlocal started
        if not as_json:
            click.echo(printable(piece), nl=False)
            started = True

    try:
        answer = stream_answer(chat_model, messages, write)
    except BrokenPipeError:
        raise
    except Exception as error:
        if started:  # the partial answer's line ends before the error
            click.echo()
        if not isinstance(error, (RuntimeError, ValueError, TimeoutError)):
            raise  # the group says what it is
        raise _Failure(str(error)) from None
    if as_json:
        click.echo(printable_json({
            "text": answer.text,
            "finish_reason": answer.finish_reason,
            "usage": answer.usage,
            "model": chat_model.model,
            "revision": chat_model.revision,
        }))  # fmt: skip
    else:
        click.echo()
    if answer.finish_reason == "length":
        click.echo(f"[cut off at {chat_model.max_tokens} tokens: --max-tokens raises it]", err=True)


@main.command()
@click.option("--context-window", type=click.IntRange(16), default=4096, show_default=True)
@click.option(
    "--max-batch-size",
    type=click.IntRange(1, 256),
    default=1,
    show_default=True,
    help="Calls decoded at once, each holding a whole context window.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
def variants(context_window: int, max_batch_size: int, as_json: bool) -> None:
    """The six GPTQ branches: bits, group size, act order, download size, GPU memory needed.

    With a CUDA GPU present, marks which branches fit in its free memory.
    """
    from langchain_synthia._sysinfo import gpus

    found = gpus()
    free = found[0]["free_gib"] if found else None
    rows = []
    for variant in VARIANTS.values():
        need = variant.gpu_memory_gib(context_window, max_batch_size)
        rows.append({
            "branch": variant.branch,
            "bits": variant.bits,
            "group_size": variant.group_size,
            "act_order": variant.act_order,
            "download_gb": variant.size_gb,
            "gpu_memory_gib": round(need, 1),
            "fits": None if free is None else need <= free,
        })  # fmt: skip
    if as_json:
        click.echo(json.dumps({"gpu": found[0] if found else None, "variants": rows}, indent=2))
        return
    header = ("branch", "bits", "group", "act order", "download", "GPU memory", "fits")
    lines = [header] + [
        (
            r["branch"],
            str(r["bits"]),
            str(r["group_size"] or "none"),
            "yes" if r["act_order"] else "no",
            f"{r['download_gb']:.2f} GB",
            f"{r['gpu_memory_gib']:.1f} GiB",
            "-" if r["fits"] is None else "yes" if r["fits"] else "no",
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        cells = (cell.ljust(width) for cell, width in zip(line, widths, strict=True))
        click.echo("  ".join(cells).rstrip())
    calls = "1 call at a time" if max_batch_size == 1 else f"{max_batch_size} calls at once"
    click.echo(
        f"\nGPU memory: estimated for {context_window} tokens of context, {calls}\n"
        "(--context-window and --max-batch-size change it; the CUDA context comes on top)."
    )
    if found:
        gpu = found[0]
        click.echo(f"GPU: {gpu['name']}, {gpu['free_gib']} GiB free of {gpu['memory_gib']} GiB.")
    else:
        click.echo("No CUDA GPU found: 'fits' shows - (the CPU runs the model, slowly).")


@main.command()
@click.option("--model", default=DEFAULT_REPO, show_default=True, help="Hub repo id.")
@click.option(
    "--revision", default=DEFAULT_BRANCH, show_default=True, help="Branch or commit hash."
)
@click.option(
    "--local-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Put the checkpoint in this folder instead of the Hugging Face cache.",
)
@click.option("--cache-dir", help="Hugging Face cache folder. [default: HF_HUB_CACHE]")
def download(model: str, revision: str, local_dir: Path | None, cache_dir: str | None) -> None:
    """Fetch a branch (safetensors, configs, tokenizer) with progress bars; resumable.

    Prints the checkpoint folder on standard output once its weights files are checked
    (complete, readable, holding the tensors the model needs). Run it again after an
    interruption to resume where it stopped.
    """
    from langchain_synthia._loading import check_weights, fetch_again, validate_checkpoint
    from langchain_synthia._loading import download as fetch
    from langchain_synthia.variants import check_revision

    try:
        check_revision(model, revision)
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    size = (
        f", {VARIANTS[revision].size_gb} GB"
        if model == DEFAULT_REPO and revision in VARIANTS
        else ""
    )
    where = local_dir or cache_dir or "the Hugging Face cache"
    click.echo(f"Downloading {model} ({revision}{size}) into {where}.", err=True)
    try:
        folder = fetch(model, revision, cache_dir, local_dir=str(local_dir) if local_dir else None)
        # what a load would refuse is refused now: a file the Hub (or an earlier, broken
        # download) left truncated or corrupt, tensors missing, GPTQ settings that contradict
        # the weights (headers only: milliseconds)
        check_weights(folder, validate_checkpoint(folder), fetch_again(model, revision, folder))
    except FileNotFoundError as error:
        raise _Failure(str(error), EXIT_UNAVAILABLE) from None
    except Exception as error:  # the Hub's HTTP errors: unknown repo or revision, no access
        if type(error).__module__.startswith(("huggingface_hub", "requests", "httpx")):
            raise _Failure(f"Download failed: {error}", EXIT_UNAVAILABLE) from None
        if isinstance(error, ValueError):
            raise _Failure(str(error)) from None
        raise
    click.echo(str(folder))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def info(as_json: bool) -> None:
    """Versions, device, the engine and kernel a load picks, cache paths: for bug reports."""
    from langchain_synthia._sysinfo import report

    facts = report()
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    click.echo(f"langchain-synthia {facts['langchain-synthia']}")
    click.echo(f"python {facts['python']} on {facts['platform']}")
    for name, version in facts["packages"].items():
        click.echo(f"  {name}: {version or 'not installed'}")
    click.echo(f"torch CUDA build: {facts['torch_cuda'] or 'none (CPU build)'}")
    for gpu in facts["gpus"]:
        click.echo(
            f"GPU {gpu['index']}: {gpu['name']}, {gpu['memory_gib']} GiB "
            f"({gpu['free_gib']} free), compute capability {gpu['capability']}"
        )
    if not facts["gpus"]:
        click.echo("GPU: none found (device 'auto' runs on the CPU)")
    click.echo(
        f"device 'auto': {facts['device']}, {facts['engine']} engine, kernel {facts['kernel']}"
    )
    for name, path in facts["paths"].items():
        click.echo(f"{name.replace('_', ' ')}: {path}")
    for name, value in facts["environment"].items():
        click.echo(f"${name}={value}")


if __name__ == "__main__":
    main()
