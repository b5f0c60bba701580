"""The ``synthia`` command: a chat with Synthia in the terminal.

A thin face: it builds a `ChatSynthia` (options are validated by its fields) and streams through
the same chain a user would write. Heavy imports wait until a command runs, so ``--help`` is fast.
"""

import sys

import click

from langchain_synthia._version import __version__
from langchain_synthia.variants import DEFAULT_BRANCH, DEFAULT_REPO

_EXIT_WORDS = ("/exit", "/quit")


@click.group()
@click.version_option(__version__, prog_name="synthia")
def main() -> None:
    """Synthia-7B-v1.3 (GPTQ) on your own GPU, through LangChain."""


@main.command()
@click.option("--model", default=DEFAULT_REPO, show_default=True, help="Hub repo id or folder.")
@click.option("--revision", default=DEFAULT_BRANCH, show_default=True, help="Branch or commit.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--temperature", type=float, default=0.7, show_default=True)
@click.option("--max-tokens", type=int, default=512, show_default=True)
@click.option("--seed", type=int, default=None, help="Seed for reproducible sampling.")
@click.option(
    "--tree-of-thought", is_flag=True, help="Use the card's Tree-of-Thought system message."
)
@click.option("--system", "system_message", default=None, help="A system message of your own.")
@click.option(
    "--demo",
    is_flag=True,
    help="Run the same pipeline on a tiny random-weight checkpoint built offline (no GPU, no "
    "download): it checks the plumbing and answers gibberish.",
)
def chat(
    model: str,
    revision: str,
    device: str,
    temperature: float,
    max_tokens: int,
    seed: int | None,
    tree_of_thought: bool,
    system_message: str | None,
    demo: bool,
) -> None:
    """Chat with Synthia: type a message, get a streamed answer; /exit or Ctrl-D to leave."""
    from langchain_core.messages import AIMessage, HumanMessage
    from pydantic import ValidationError

    from langchain_synthia import ChatSynthia, SynthiaOutputParser, synthia_chat_prompt

    if demo:
        from langchain_synthia.testing import demo_checkpoint

        click.echo("Demo mode: a tiny random-weight checkpoint on the CPU (answers are gibberish).")
        model, device = str(demo_checkpoint()), "cpu"
    try:
        chat_model = ChatSynthia(
            model=model,
            revision=revision,
            device=device,
            temperature=temperature,
            max_tokens=max_tokens,
            seed=seed,
        )
        prompt = synthia_chat_prompt(system_message, tree_of_thought=tree_of_thought)
    except ValidationError as error:
        reasons = "; ".join(f"--{'-'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise click.UsageError(reasons.replace("_", "-")) from None
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    chain = prompt | chat_model | SynthiaOutputParser()
    history: list = []
    click.echo("Loading the model... (type /exit or press Ctrl-D to leave)", err=True)
    try:
        chat_model.load()
    except (ImportError, OSError, RuntimeError, ValueError) as error:
        raise click.ClickException(str(error)) from None
    while True:
        try:
            question = click.prompt("You", prompt_suffix=": ")
        except (EOFError, click.Abort):
            click.echo()
            return
        if question.strip() in _EXIT_WORDS:
            return
        click.echo("Synthia: ", nl=False)
        answer = ""
        for piece in chain.stream({"question": question, "history": history}):
            answer += piece
            click.echo(piece, nl=False)
            sys.stdout.flush()
        click.echo()
        history += [HumanMessage(question), AIMessage(answer)]


if __name__ == "__main__":
    main()
