"""What the fast engine tells an observer as it serves: a public hook for profiling.

Subclass `EngineObserver`, override the events you want (each is a no-op here), and watch an
engine with ``FastEngine.observe(observer)``::

    class Steps(EngineObserver):
        count = 0

        def step_launched(self, *, rows: int) -> None:
            self.count += 1

    with engine.observe(Steps()) as steps:
        chat.invoke("Hi")

`requests_arrived` runs on the caller's thread; every other event runs on the engine's
scheduler thread, between its steps, so an observer's methods must be quick and must not call
the engine. `bench/bench.py` times the scheduler and samples its queue this way.
"""


class EngineObserver:
    """The events of a serving engine, each a method that does nothing until overridden."""

    def requests_arrived(self, *, count: int) -> None:
        """`count` requests were handed to the engine (on the caller's thread)."""

    def scheduled(
        self, *, decoding: int, waiting: int, blocks_in_use: int, prefill_tokens: int
    ) -> None:
        """The scheduler planned a step.

        With the requests decoding and waiting before it, the KV blocks in use, and the prompt
        tokens it prefills.
        """

    def prefilled(self, *, seconds: float, chunks: int, tokens: int) -> None:
        """A step's prompt chunks were computed (launched, on a GPU).

        `seconds` is the scheduler thread's time for them.
        """

    def step_launched(self, *, rows: int) -> None:
        """A decode step of `rows` rows (the captured size, idle rows included) was launched."""

    def waited_for_device(self, *, seconds: float) -> None:
        """The scheduler thread waited `seconds` for a step's sampled tokens."""

    def finished(self, *, prompt_ids: list[int], generated: list[int], held_blocks: int) -> None:
        """A request ended (answered, failed or cancelled).

        With its prompt, the tokens it got, and the KV blocks it held just before they were
        given back.
        """
