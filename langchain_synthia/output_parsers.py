"""The output parser that removes the user turns the model goes on to invent."""

from collections.abc import AsyncIterator, Iterator

from langchain_core.messages import BaseMessage
from langchain_core.output_parsers import BaseTransformOutputParser

from langchain_synthia._stops import StopMatcher
from langchain_synthia.prompts import USER_MARKER


class SynthiaOutputParser(BaseTransformOutputParser[str]):
    r"""Keep Synthia's answer, drop a ``USER:`` continuation, strip surrounding whitespace.

    `parse` is the model card's ``answer.split("USER:")[0].strip()``. Streamed, the parser gives
    the same text piece by piece: it never emits a partial ``USER:`` (a tail such as ``"US"`` is
    held back until it turns out to be text), nor leading or trailing whitespace.

    `ChatSynthia` and `SynthiaLLM` already stop generating at ``USER:``, so with them the parser
    mostly trims whitespace; it earns its keep on text from other sources (other runtimes,
    ``stop_at_user_turn=False``, stored transcripts).

    Example:
        ```python
        from langchain_synthia import ChatSynthia, SynthiaOutputParser, synthia_chat_prompt

        chain = synthia_chat_prompt() | ChatSynthia() | SynthiaOutputParser()
        for piece in chain.stream({"question": "Name three moons of Jupiter."}):
            print(piece, end="", flush=True)

        SynthiaOutputParser().parse("  Paris.\nUSER: And Germany?\nASSISTANT: Berlin.")
        ```

        ```txt
        'Paris.'
        ```
    """

    @property
    def _type(self) -> str:
        return "synthia"

    def parse(self, text: str) -> str:
        """Return the answer in `text`: everything before the first ``USER:``, stripped."""
        return text.split(USER_MARKER)[0].strip()

    def get_format_instructions(self) -> str:
        """No instructions: the parser only cleans up free text."""
        return ""

    def _transform(self, input: Iterator[str | BaseMessage]) -> Iterator[str]:
        answer = _StreamedAnswer()
        for chunk in input:
            if piece := answer.feed(_text(chunk)):
                yield piece
        if piece := answer.finish():
            yield piece

    async def _atransform(
        self,
        input: AsyncIterator[str | BaseMessage],
    ) -> AsyncIterator[str]:
        answer = _StreamedAnswer()
        async for chunk in input:
            if piece := answer.feed(_text(chunk)):
                yield piece
        if piece := answer.finish():
            yield piece


def _text(chunk: str | BaseMessage) -> str:
    return chunk.text if isinstance(chunk, BaseMessage) else chunk


class _StreamedAnswer:
    """`SynthiaOutputParser.parse`, applied to text that arrives in pieces."""

    def __init__(self) -> None:
        self._cut = StopMatcher([USER_MARKER])
        self._started = False  # leading whitespace is dropped until the first visible character
        self._spaces = ""  # whitespace held back: emitted only if more text follows it

    def feed(self, text: str) -> str:
        return self._trim(self._cut.feed(text))

    def finish(self) -> str:
        """The stream ended: release a held tail that never became ``USER:``; drop end spaces."""
        return self._trim(self._cut.flush())

    def _trim(self, text: str) -> str:
        if not self._started:
            text = text.lstrip()
            if not text:
                return ""
            self._started = True
        body = text.rstrip()
        if not body:
            self._spaces += text
            return ""
        out = self._spaces + body
        self._spaces = text[len(body) :]
        return out
