"""The process-wide model registry: one load per settings, shared across threads."""

import threading
import time

from langchain_synthia import _loading
from langchain_synthia._loading import ModelSettings, get_engine, loaded_engines


def test_concurrent_first_calls_load_once_and_share(monkeypatch) -> None:
    loads: list[ModelSettings] = []

    def slow_load(settings: ModelSettings) -> object:
        loads.append(settings)
        time.sleep(0.2)
        return object()

    monkeypatch.setattr(_loading, "_load", slow_load)
    monkeypatch.setattr(_loading, "_engines", {})
    settings = ModelSettings(model="owner/repo-a", device="cpu")
    other = ModelSettings(model="owner/repo-b", device="cpu")
    results: list[object] = []
    threads = [
        threading.Thread(target=lambda s=s: results.append(get_engine(s)))
        for s in [settings] * 6 + [other] * 2
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(s.model for s in loads) == ["owner/repo-a", "owner/repo-b"]
    assert len({id(r) for r in results}) == 2
    assert get_engine(settings) is get_engine(ModelSettings(model="owner/repo-a", device="cpu"))
    assert set(loaded_engines()) == {settings, other}
