"""The interactive chat of ``synthia chat``: reading messages, slash commands, the conversation.

The session holds the conversation as LangChain messages and answers through `stream_answer`,
the same `ChatSynthia.stream` and `SynthiaOutputParser` a user's own chain would use. Each
exchange is appended to a JSONL log, as the model card's own loop does; the log and the files
``/save`` writes are created readable by their owner only.
"""

import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage

from langchain_synthia._console import printable, printable_json, printable_line
from langchain_synthia.chat_models import ChatSynthia
from langchain_synthia.output_parsers import SynthiaOutputParser
from langchain_synthia.prompts import DEFAULT_SYSTEM_MESSAGE, TREE_OF_THOUGHT_SYSTEM_MESSAGE

PROMPT = "You: "
MORE = "...  "
BLOCK = '"""'

HELP = f"""\
Type a message and press Enter. A line that ends in \\ continues on the next line; a line that
starts with {BLOCK} opens a block that a line ending in {BLOCK} closes.
  /tot [on|off]          the card's Tree-of-Thought system message on or off
  /system [TEXT]         show the system message, or set it (/system default, /system none)
  /reset                 forget the conversation (the system message stays)
  /save [FILE]           write the conversation to FILE as JSON
  /help                  this list
  /exit, /quit, Ctrl-D   leave (Ctrl-C stops an answer; at the prompt it leaves)"""


def read_message(read_line: Callable[[str], str]) -> str:
    """Read one message: a line, lines joined by a trailing backslash, or a triple-quote block.

    Raises:
        EOFError: When input ends before a message is complete.
    """
    first = read_line(PROMPT)
    if first.lstrip().startswith(BLOCK):
        lines = []
        line = first.lstrip()[len(BLOCK) :]
        while not line.rstrip().endswith(BLOCK):
            lines.append(line)
            line = read_line(MORE)
        lines.append(line.rstrip()[: -len(BLOCK)])
        return "\n".join(lines).strip("\n")
    lines = [first]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        lines.append(read_line(MORE))
    return "\n".join(lines)


@dataclass
class Answer:
    """What the model answered: the parsed text, and the last chunk's metadata."""

    text: str
    finish_reason: str | None = None
    usage: dict[str, int] | None = None


def stream_answer(
    model: ChatSynthia, messages: list[BaseMessage], write: Callable[[str], None]
) -> Answer:
    """Stream the model's answer to `messages` through the output parser, piece by piece.

    The one way the CLI gets an answer, for ``chat`` and ``generate`` alike. If `write` or the
    wait is interrupted (Ctrl-C), the stream is closed, which ends the request in the engine.
    """
    last: AIMessageChunk | None = None  # the final chunk carries finish_reason and usage
    source = model.stream(messages)

    def chunks() -> Any:
        nonlocal last
        for chunk in source:
            last = chunk
            yield chunk

    inner = chunks()
    pieces = SynthiaOutputParser().transform(inner)
    text = []
    try:
        for piece in pieces:
            text.append(piece)
            write(piece)
    finally:
        # innermost first: closing the parser's generator while the model's stream is open
        # makes langchain-core read that stream to its end (it drains its input on
        # GeneratorExit), so a Ctrl-C in `write` waited for the whole answer
        for generator in (source, inner, pieces):
            generator.close()
    return Answer(
        text="".join(text),
        finish_reason=last.response_metadata.get("finish_reason") if last else None,
        usage=dict(last.usage_metadata) if last and last.usage_metadata else None,
    )


class ChatSession:
    """A conversation with the model, driven by the lines a user types."""

    def __init__(
        self,
        model: ChatSynthia,
        *,
        system_message: str | None,
        log_path: Path | None,
        write: Callable[..., None],
    ) -> None:
        """Start an empty conversation with `system_message` (``None``: no ``SYSTEM:`` line).

        The session sends its system message itself: give it a `model` whose own
        ``system_message`` is ``None``, or "none" would fall back to the model's.
        """
        self.model = model
        self.system_message = system_message
        self.history: list[BaseMessage] = []
        self.log_path = log_path
        self._write = write
        self._before_tree_of_thought: str | None = DEFAULT_SYSTEM_MESSAGE

    def handle(self, message: str) -> bool:
        """Answer a message or run a command; ``False`` when the user asked to leave.

        The answer streams through `write`, cleaned by `printable`; the conversation and the
        log keep it as the model gave it. When the model fails (any exception: a timeout, a
        prompt past the context window, a server's error), one line says why on `write`'s
        ``err`` stream and the conversation stays as it was before `message`, which is not
        kept, like an answer stopped with Ctrl-C.
        """
        text = message.strip()
        if not text:
            return True
        if text.startswith("/"):
            return self._command(*text.split(maxsplit=1))
        self._write("Synthia: ", nl=False)
        try:
            answer = stream_answer(self.model, self._messages(message), self._piece)
        except KeyboardInterrupt:
            self._write("\n[answer stopped; it is not kept in the conversation]")
            return True
        except BrokenPipeError:  # the output is gone: there is no one to answer
            raise
        except Exception as error:  # the model's: a timeout, a prompt past the context window,
            # a server's error, out of memory... The turn fails alone; the conversation stays.
            reason = printable_line(str(error)) or type(error).__name__
            self._write("")
            self._write(f"[error (message not kept): {reason}]", err=True)
            return True
        self._write("")
        if answer.finish_reason == "length":
            self._write(f"[cut off at {self.model.max_tokens} tokens: --max-tokens raises it]")
        self.history += [HumanMessage(message), AIMessage(answer.text)]
        self._log(message, answer.text)
        return True

    def _piece(self, piece: str) -> None:
        self._write(printable(piece), nl=False)

    def _messages(self, question: str) -> list[BaseMessage]:
        from langchain_core.messages import SystemMessage

        system = [SystemMessage(self.system_message)] if self.system_message else []
        return [*system, *self.history, HumanMessage(question)]

    def _command(self, name: str, argument: str = "") -> bool:
        if name in ("/exit", "/quit"):
            return False
        if name == "/help":
            self._write(HELP)
        elif name == "/reset":
            self.history.clear()
            self._write("[conversation cleared]")
        elif name == "/tot":
            self._tree_of_thought(argument.lower())
        elif name == "/system":
            self._system(argument)
        elif name == "/save":
            self._save(argument)
        else:
            self._write(f"[unknown command {name}: /help lists the commands]")
        return True

    def _tree_of_thought(self, argument: str) -> None:
        if argument not in ("", "on", "off"):
            self._write("[/tot takes on or off]")
            return
        on = self.system_message == TREE_OF_THOUGHT_SYSTEM_MESSAGE
        if not on and argument in ("", "on"):
            self._before_tree_of_thought = self.system_message
            self.system_message = TREE_OF_THOUGHT_SYSTEM_MESSAGE
        elif on and argument in ("", "off"):
            self.system_message = self._before_tree_of_thought
        state = "on" if self.system_message == TREE_OF_THOUGHT_SYSTEM_MESSAGE else "off"
        self._write(f"[Tree-of-Thought system message {state}]")

    def _system(self, argument: str) -> None:
        if argument == "default":
            self.system_message = DEFAULT_SYSTEM_MESSAGE
        elif argument == "none":
            self.system_message = None
        elif argument:
            self.system_message = argument
        shown = "(none)" if self.system_message is None else self.system_message
        self._write(f"[system message: {shown}]")

    def _save(self, argument: str) -> None:
        path = Path(argument or time.strftime("synthia-chat-%Y%m%d-%H%M%S.json")).expanduser()
        turns = [
            {"role": "user" if isinstance(m, HumanMessage) else "assistant", "content": m.text}
            for m in self.history
        ]
        document = {"system": self.system_message, "messages": turns}
        try:
            write_private(path, printable_json(document, indent=2) + "\n", append=False)
        except OSError as error:
            self._write(f"[not saved: {printable_line(str(error))}]")
            return
        self._write(f"[saved {len(turns)} messages to {path}]")

    def _log(self, prompt: str, answer: str) -> None:
        if self.log_path is None:
            return
        record = {
            "prompt": prompt,
            "answer": answer,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "system": self.system_message,
            "model": self.model.model,
            "revision": self.model.revision,
        }
        try:
            write_private(self.log_path, printable_json(record) + "\n", append=True)
        except OSError as error:
            reason = printable_line(str(error))
            self._write(f"[conversation log {self.log_path} not written: {reason}]")


def write_private(path: Path, text: str, *, append: bool) -> None:
    """Write `text` to `path` (appended, or in place of what it held), readable by its owner only.

    A new file is created with mode 0600, and its missing folders with mode 0700, whatever the
    umask. An existing regular file that the group or others may read is made 0600 first when
    `append`ing (the conversation log), so earlier records stop being readable too; a file
    that cannot be made private is not written (`OSError`).
    """
    missing = [folder for folder in (path.parent, *path.parent.parents) if not folder.exists()]
    for folder in reversed(missing):
        folder.mkdir(mode=0o700, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    descriptor = os.open(path, flags, 0o600)
    with os.fdopen(descriptor, "a" if append else "w", encoding="utf-8") as file:
        mode = os.fstat(descriptor).st_mode
        if append and stat.S_ISREG(mode) and mode & 0o077:
            os.fchmod(descriptor, stat.S_IMODE(mode) & 0o700)
        file.write(text)
