"""Token windows: which messages fit a budget, the summarize hook, and the token counters (no Redis)."""

from __future__ import annotations

import importlib
import logging
import socket
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from redis_memory import window
from redis_memory.window import (
    TokenCounter,
    approximate_tokens,
    clear_token_counter_cache,
    fit_messages,
    message_tokens,
    token_counter,
)

Message = dict[str, Any]


def chars(text: str) -> int:
    """A counter whose costs are easy to reason about: one token per character."""
    return len(text)


def cost(messages: list[Message]) -> int:
    return sum(message_tokens(m, chars) for m in messages)


def msg(role: str, content: str) -> Message:
    return {"role": role, "content": content}


@pytest.fixture(autouse=True)
def fresh_counters() -> Iterator[None]:
    clear_token_counter_cache()
    yield
    clear_token_counter_cache()


SYSTEM = msg("system", "be brief")
HISTORY = [msg("user", f"question {i}") if i % 2 == 0 else msg("assistant", f"answer {i}") for i in range(8)]


# --- fit_messages ---------------------------------------------------------


def test_keeps_the_newest_messages_in_order() -> None:
    budget = cost(HISTORY[-3:])
    assert fit_messages(HISTORY, budget, counter=chars) == HISTORY[-3:]
    assert fit_messages(HISTORY, 10_000, counter=chars) == HISTORY


def test_window_is_contiguous_a_big_message_stops_it() -> None:
    big = msg("user", "x" * 500)
    history = [msg("user", "old"), big, msg("assistant", "new")]
    budget = cost([history[0], history[2]]) + 10  # room for both small ones, not for the big one
    assert fit_messages(history, budget, counter=chars) == [history[2]]


def test_exact_budget_boundary() -> None:
    last_two = HISTORY[-2:]
    budget = cost(last_two)
    assert fit_messages(HISTORY, budget, counter=chars) == last_two
    assert fit_messages(HISTORY, budget - 1, counter=chars) == HISTORY[-1:]
    lone = [msg("user", "hello")]
    assert fit_messages(lone, cost(lone), counter=chars) == lone
    assert fit_messages(lone, cost(lone) - 1, counter=chars) == []


def test_system_message_is_kept_first_and_counted() -> None:
    history = [SYSTEM, *HISTORY]
    budget = cost([SYSTEM, *HISTORY[-2:]])
    assert fit_messages(history, budget, counter=chars) == [SYSTEM, *HISTORY[-2:]]
    assert fit_messages(history, budget - 1, counter=chars) == [SYSTEM, HISTORY[-1]]
    assert fit_messages(history, cost([SYSTEM]), counter=chars) == [SYSTEM]


def test_keep_system_false_treats_it_like_any_message() -> None:
    history = [SYSTEM, *HISTORY]
    assert fit_messages(history, cost(HISTORY[-1:]), counter=chars, keep_system=False) == HISTORY[-1:]
    assert fit_messages(history, cost(history), counter=chars, keep_system=False) == history


def test_system_message_over_budget_raises_with_both_numbers() -> None:
    need = cost([SYSTEM])
    with pytest.raises(ValueError, match=rf"{need} tokens.*max_tokens={need - 1}"):
        fit_messages([SYSTEM, *HISTORY], need - 1, counter=chars)


def test_empty_history_and_zero_budget() -> None:
    def never(dropped: list[Message]) -> str:
        raise AssertionError("summarize must not be called")

    assert fit_messages([], 100, counter=chars, summarize=never) == []
    assert fit_messages([], 0, counter=chars) == []
    assert fit_messages(HISTORY, 0, counter=chars) == []
    with pytest.raises(ValueError, match="max_tokens=0"):
        fit_messages([SYSTEM, *HISTORY], 0, counter=chars)


def test_summarize_gets_exactly_the_dropped_messages() -> None:
    calls: list[list[Message]] = []

    def summarize(dropped: list[Message]) -> Message:
        calls.append(dropped)
        return {"role": "assistant", "content": "S"}

    summary = {"role": "assistant", "content": "S"}
    kept = HISTORY[-2:]
    budget = cost([SYSTEM, summary, *kept])
    out = fit_messages([SYSTEM, *HISTORY], budget, counter=chars, summarize=summarize)
    assert out == [SYSTEM, summary, *kept]
    assert calls == [HISTORY[:-2]]  # oldest first, never the system message
    assert all(type(m) is dict for m in calls[0])


def test_summarize_is_not_called_when_everything_fits() -> None:
    calls: list[list[Message]] = []

    def summarize(dropped: list[Message]) -> str:
        calls.append(dropped)
        return "x"

    out = fit_messages(HISTORY, cost(HISTORY), counter=chars, summarize=summarize)
    assert out == HISTORY and calls == []


def test_str_summary_becomes_a_system_message_placed_first_without_a_system_prompt() -> None:
    out = fit_messages(HISTORY, cost(HISTORY[-1:]) + 50, counter=chars, summarize=lambda d: "earlier: greetings")
    assert out[0] == {"role": "system", "content": "earlier: greetings"}
    assert out[-1] == HISTORY[-1]
    assert cost(out) <= cost(HISTORY[-1:]) + 50


def test_summary_pushing_over_budget_drops_more_and_summarizes_again() -> None:
    calls: list[int] = []

    def summarize(dropped: list[Message]) -> str:
        calls.append(len(dropped))
        return f"{len(dropped)} earlier messages"

    budget = cost(HISTORY[-3:])  # the last 3 fit alone, not with a summary
    out = fit_messages(HISTORY, budget, counter=chars, summarize=summarize)
    assert calls[0] == 5 and calls == sorted(calls) and len(calls) >= 2
    assert cost(out) <= budget
    assert out[0] == {"role": "system", "content": f"{calls[-1]} earlier messages"}
    assert out[1:] == HISTORY[len(HISTORY) - (len(out) - 1) :]  # still the newest, contiguous
    assert len(out) - 1 == len(HISTORY) - calls[-1]


def test_summary_that_never_fits_raises() -> None:
    with pytest.raises(ValueError, match=r"summary costs \d+ tokens but only 20 of max_tokens=20"):
        fit_messages(HISTORY, 20, counter=chars, summarize=lambda d: "z" * 100)
    budget = cost([SYSTEM]) + 5
    with pytest.raises(ValueError, match=rf"only 5 of max_tokens={budget}"):
        fit_messages([SYSTEM, *HISTORY], budget, counter=chars, summarize=lambda d: "z" * 100)


def test_summarize_must_return_a_message_or_str() -> None:
    with pytest.raises(TypeError, match="summarize must return"):
        fit_messages(HISTORY, 30, counter=chars, summarize=lambda d: 42)  # type: ignore[arg-type,return-value]


class ProxyList(list):  # type: ignore[type-arg]
    pass


class ProxyDict(dict):  # type: ignore[type-arg]
    pass


def test_inputs_are_not_mutated_and_outputs_are_plain() -> None:
    def proxied() -> ProxyList:
        return ProxyList(
            ProxyDict(role="user", content=ProxyList([ProxyDict(type="text", text=f"part {i}")]), meta=("tag", str(i)))
            for i in range(4)
        )

    history = proxied()
    dropped_seen: list[Message] = []

    def summarize(dropped: list[Message]) -> Message:
        dropped_seen.extend(dropped)
        dropped[0]["content"].append("mutated by summarize")
        return ProxyDict(role="system", content="S")

    budget = cost(history[-2:]) + message_tokens({"role": "system", "content": "S"}, chars)
    out = fit_messages(history, budget, counter=chars, summarize=summarize)
    assert history == proxied()  # nothing changed, not even by summarize
    assert out == [{"role": "system", "content": "S"}, *proxied()[-2:]]

    def assert_plain(value: Any) -> None:
        assert type(value) in (dict, list, tuple, str)
        if isinstance(value, dict):
            for item in value.values():
                assert_plain(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                assert_plain(item)

    assert type(out) is list
    for message in [*out, *dropped_seen]:
        assert type(message) is dict
        assert_plain(message)
    assert all(a is not b for a, b in zip(out[1:], history[-2:], strict=True))


def test_bad_arguments() -> None:
    for bad in (1.5, "10", None, True):
        with pytest.raises(TypeError, match="max_tokens must be an int"):
            fit_messages(HISTORY, bad, counter=chars)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_tokens must be 0 or more, not -1"):
        fit_messages(HISTORY, -1, counter=chars)
    with pytest.raises(TypeError, match="message 2 is a str"):
        fit_messages([*HISTORY[:2], "hello", *HISTORY[2:]], 1000, counter=chars)  # type: ignore[list-item]
    with pytest.raises(TypeError, match="list of message dicts"):
        fit_messages(HISTORY[0], 1000, counter=chars)  # type: ignore[arg-type]


def test_default_counter_is_token_counter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tiktoken", None)
    budget = sum(message_tokens(m, approximate_tokens) for m in HISTORY[-3:])
    assert fit_messages(HISTORY, budget) == HISTORY[-3:]
    assert fit_messages(HISTORY, budget - 1) == HISTORY[-2:]


# --- message_tokens -------------------------------------------------------


def test_message_tokens_counts_every_field_like_openai_accounting() -> None:
    assert message_tokens({"role": "user", "content": "hello"}, chars) == 3 + 4 + 5
    assert message_tokens({"role": "user", "content": None}, chars) == 3 + 4
    assert message_tokens({"role": "user", "content": "hi", "name": "bob"}, chars) == 3 + 4 + 2 + 3 + 1
    assert message_tokens({"role": "tool", "content": "4", "tool_call_id": "c1"}, chars) == 3 + 4 + 1 + 2
    calls = [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{}"}}]
    with_calls = {"role": "assistant", "content": None, "tool_calls": calls}
    compact = '[{"id":"c1","type":"function","function":{"name":"add","arguments":"{}"}}]'
    assert message_tokens(with_calls, chars) == 3 + len("assistant") + len(compact)


def test_list_of_parts_content_counts_text_parts() -> None:
    parts = [{"type": "text", "text": "look at"}, {"type": "text", "text": "this"}]
    assert message_tokens({"role": "user", "content": parts}, chars) == 3 + 4 + 7 + 4
    image = {"type": "image_url", "image_url": {"url": "u"}}
    with_image = message_tokens({"role": "user", "content": [*parts, image]}, chars)
    assert with_image == 3 + 4 + 7 + 4 + len('{"type":"image_url","image_url":{"url":"u"}}')
    assert message_tokens({"role": "user", "content": parts}, approximate_tokens) == 3 + 1 + 2 + 1


# --- the approximate counter ----------------------------------------------


def test_approximate_counter_basics() -> None:
    assert approximate_tokens("") == 0
    assert approximate_tokens("the") == 1
    assert approximate_tokens("tiktoken is great!") == 6  # tiktoken's own README example: 6 with cl100k_base
    assert approximate_tokens("internationalization") == 5  # ceil(20 / 4)
    assert approximate_tokens("1234567") == 3  # digits go by threes
    assert approximate_tokens("a, b; c.") == 6  # each punctuation mark is a token
    assert approximate_tokens("日本語") == 3 and approximate_tokens("日本語日本語") == 6
    assert approximate_tokens("café") == 2 and approximate_tokens("😀😀") == 2


def test_approximate_counter_is_deterministic_and_never_shrinks_when_text_grows() -> None:
    text = "Hello, world!  It's 2024\n\tnaïve café — 東京 42 tokens... antidisestablishmentarianism 😀"
    counts = [approximate_tokens(text[:i]) for i in range(len(text) + 1)]
    assert counts == [approximate_tokens(text[:i]) for i in range(len(text) + 1)]
    assert counts == sorted(counts)
    assert approximate_tokens("word " * 100) > approximate_tokens("word " * 10) > 0


def test_approximate_counter_is_a_named_token_counter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tiktoken", None)
    counter = token_counter()
    assert isinstance(counter, TokenCounter)
    assert (counter.name, counter.exact) == ("approximate", False)
    assert counter("tiktoken is great!") == approximate_tokens("tiktoken is great!")


# --- token_counter ----------------------------------------------------------


def test_without_tiktoken_falls_back_and_logs_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "tiktoken", None)
    with caplog.at_level(logging.INFO, logger="redis_memory"):
        first = token_counter()
        assert token_counter(model="gpt-4o") is first
        assert token_counter() is first
    assert (first.name, first.exact) == ("approximate", False)
    records = [r for r in caplog.records if r.name == "redis_memory"]
    assert [(r.levelno, r.getMessage()) for r in records] == [
        (logging.INFO, "tiktoken is not installed: counting tokens approximately")
    ]


def test_real_tiktoken_without_cached_encoding_never_touches_the_network(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    pytest.importorskip("tiktoken")
    load = importlib.import_module("tiktoken.load")
    registry = importlib.import_module("tiktoken.registry")
    attempts: list[Any] = []

    def guarded(original: Any) -> Any:
        def no_network(*args: Any, **kwargs: Any) -> Any:
            # The test session's own servers are on loopback, and their
            # threads (a proxy's, say) may connect while this runs.
            if any("127.0.0.1" in str(a) for a in args):
                return original(*args, **kwargs)
            attempts.append(args)
            raise OSError("network access in a test")

        return no_network

    monkeypatch.setattr(socket.socket, "connect", guarded(socket.socket.connect))
    monkeypatch.setattr(socket.socket, "connect_ex", guarded(socket.socket.connect_ex))
    monkeypatch.setattr(socket, "create_connection", guarded(socket.create_connection))
    monkeypatch.setattr(socket, "getaddrinfo", guarded(socket.getaddrinfo))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(registry, "ENCODINGS", {})  # as in a fresh process
    downloader = load.read_file

    with caplog.at_level(logging.INFO, logger="redis_memory"):
        counter = token_counter()
        by_model = token_counter(model="gpt-4o")
    assert attempts == []
    assert load.read_file is downloader  # restored
    assert list(tmp_path.iterdir()) == []
    assert (counter.name, counter.exact) == ("approximate", False)
    assert by_model.exact is False
    messages = [r.getMessage() for r in caplog.records if r.name == "redis_memory"]
    assert (
        "tiktoken encoding cl100k_base is not in the local cache: counting tokens approximately "
        "(no download is attempted)"
    ) in messages
    assert any("o200k_base is not in the local cache" in m for m in messages)


class FakeEncoding:
    def __init__(self, name: str) -> None:
        self.name = name

    def encode(self, text: str) -> list[int]:
        return [0] * len(text.split())  # one "token" per word


def fake_tiktoken(monkeypatch: pytest.MonkeyPatch, models: dict[str, str] | None = None) -> list[str]:
    """Install a stand-in ``tiktoken`` module; returns the list of encodings it was asked for."""
    loaded: list[str] = []
    module = types.ModuleType("tiktoken")

    def get_encoding(name: str) -> FakeEncoding:
        loaded.append(name)
        return FakeEncoding(name)

    def encoding_name_for_model(model: str) -> str:
        return (models or {})[model]

    module.get_encoding = get_encoding  # type: ignore[attr-defined]
    module.encoding_name_for_model = encoding_name_for_model  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tiktoken", module)
    return loaded


def test_tiktoken_encoding_available_gives_an_exact_counter(monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = fake_tiktoken(monkeypatch)
    counter = token_counter()
    assert (counter.name, counter.exact) == ("tiktoken:cl100k_base", True)
    assert counter("one two three") == 3
    assert token_counter() is counter and loaded == ["cl100k_base"]  # checked once, then cached
    budget = message_tokens(HISTORY[-1], counter)
    assert fit_messages(HISTORY, budget) == HISTORY[-1:]  # the default counter is this one
    assert token_counter(encoding="p50k_base").name == "tiktoken:p50k_base"


def test_model_picks_its_encoding_and_unknown_models_get_the_default(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fake_tiktoken(monkeypatch, {"gpt-4o": "o200k_base"})
    assert token_counter(model="gpt-4o").name == "tiktoken:o200k_base"
    assert token_counter(model="gpt-4o", encoding="r50k_base").name == "tiktoken:r50k_base"
    with caplog.at_level(logging.INFO, logger="redis_memory"):
        unknown = token_counter(model="my-local-llm")
    assert (unknown.name, unknown.exact) == ("tiktoken:cl100k_base", True)
    assert "tiktoken does not know model 'my-local-llm': using encoding cl100k_base" in caplog.messages


def test_download_hook_is_blocked_during_load_and_restored(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fake_tiktoken(monkeypatch)
    module = sys.modules["tiktoken"]
    fetched: list[str] = []

    def read_file(path: str) -> bytes:
        fetched.append(path)
        return b""

    load = types.SimpleNamespace(read_file=read_file)
    module.load = load  # type: ignore[attr-defined]

    def get_encoding(name: str) -> FakeEncoding:
        load.read_file("https://example.invalid/cl100k_base.tiktoken")  # what tiktoken does on a cache miss
        return FakeEncoding(name)

    module.get_encoding = get_encoding  # type: ignore[attr-defined]
    with caplog.at_level(logging.INFO, logger="redis_memory"):
        counter = token_counter()
    assert fetched == [] and load.read_file is read_file
    assert counter.exact is False
    assert any("cl100k_base is not in the local cache" in m for m in caplog.messages)


def test_clear_token_counter_cache_checks_again(monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "tiktoken", None)
        assert token_counter().exact is False
    fake_tiktoken(monkeypatch)
    assert token_counter().exact is False  # still the cached answer
    clear_token_counter_cache()
    assert token_counter().exact is True
    assert window.APPROXIMATE.exact is False


def test_a_tool_result_whose_call_was_cut_is_cut_too() -> None:
    """A window never starts with a tool result: its assistant message with the tool call was cut."""
    history = [
        {"role": "system", "content": "S"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "function": {"name": "f"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "result"},
        {"role": "assistant", "content": "done"},
    ]
    budget = message_tokens(history[0], chars) + message_tokens(history[2], chars) + message_tokens(history[3], chars)
    window = fit_messages(history, budget, counter=chars)
    assert [m["role"] for m in window] == ["system", "assistant"]
    seen: list[list[Message]] = []
    fit_messages(history, budget + 20, counter=chars, summarize=lambda dropped: seen.append(dropped) or "sum")
    assert [m["role"] for m in seen[-1]] == ["assistant", "tool"]
