"""Token windows: the newest messages of a chat history that fit a model's context budget.

A model reads a bounded number of tokens, so a long conversation has to be cut
before it is sent. :func:`fit_messages` keeps the leading system message and
the newest contiguous run of messages whose estimated cost fits ``max_tokens``;
an optional ``summarize`` hook turns what was cut into one short message.

Costs come from a :class:`TokenCounter`. :func:`token_counter` gives an exact
one backed by ``tiktoken`` when that package and the encoding file are both
already on this machine, and otherwise a dependency-free approximation. It
never downloads anything. Messages are OpenAI-style dicts; the functions
accept the library's proxies and always return plain lists and dicts.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import ModuleType
from typing import Any

from .proxies import plain

__all__ = [
    "APPROXIMATE",
    "TokenCounter",
    "approximate_tokens",
    "clear_token_counter_cache",
    "fit_messages",
    "message_tokens",
    "token_counter",
]

log = logging.getLogger("redis_memory")

#: Encoding used when neither a model nor an encoding is named, or the model is unknown.
DEFAULT_ENCODING = "cl100k_base"
#: Tokens every message costs besides its field values (OpenAI's chat format accounting).
MESSAGE_OVERHEAD = 3
#: Extra token for a message that carries a ``name``.
NAME_OVERHEAD = 1


class TokenCounter:
    """Counts the tokens of a string: ``counter(text) -> int``.

    ``name`` says what does the counting (``"tiktoken:cl100k_base"``,
    ``"approximate"``); ``exact`` is true only when it is the model's own
    tokenizer.
    """

    __slots__ = ("_count", "exact", "name")

    def __init__(self, count: Callable[[str], int], *, name: str, exact: bool) -> None:
        self._count = count
        self.name = name
        self.exact = exact

    def __call__(self, text: str) -> int:
        return self._count(text)

    def __repr__(self) -> str:
        return f"TokenCounter(name={self.name!r}, exact={self.exact})"


# One match per run of: ASCII letters, digits, ASCII whitespace, non-ASCII
# characters, or anything else (ASCII punctuation and control characters).
_RUNS = re.compile(r"([A-Za-z]+)|([0-9]+)|([ \t\n\r\f\v]+)|([^\x00-\x7f]+)|([\x00-\x7f])")


def approximate_tokens(text: str) -> int:
    """Estimate the tokens of ``text`` the way BPE tokenizers split English, erring high.

    The text is cut into runs, each costing:

    * a word of ASCII letters: one token per 4 letters, rounded up;
    * a number: one token per 3 digits, rounded up (GPT tokenizers group digits by 3);
    * whitespace: nothing for a single space (it joins the next word), else one per 4 characters, rounded up;
    * each non-ASCII character (accents, CJK, emoji...): one token;
    * each other ASCII character (punctuation, symbols, control): one token.

    It is deterministic, never decreases when text is appended, and gives 0 for
    ``""``. English prose usually comes out above ``cl100k_base`` (which has
    single tokens for many longer common words); emoji and rare scripts can
    cost a real tokenizer more than one token per character.
    """
    total = 0
    for match in _RUNS.finditer(text):
        word, digits, space, foreign, _other = match.groups()
        if word is not None:
            total += -(-len(word) // 4)
        elif digits is not None:
            total += -(-len(digits) // 3)
        elif space is not None:
            total += 0 if space == " " else -(-len(space) // 4)
        elif foreign is not None:
            total += len(foreign)
        else:
            total += 1
    return total


APPROXIMATE = TokenCounter(approximate_tokens, name="approximate", exact=False)

_lock = threading.Lock()


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()  # one another thread held at the fork (loading an encoding) stays held here


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

_counters: dict[tuple[str | None, str | None], TokenCounter] = {}
_reported: set[str] = set()


class _DownloadRefused(RuntimeError):
    """Raised in place of tiktoken's file download while an encoding loads."""


def token_counter(model: str | None = None, encoding: str | None = None) -> TokenCounter:
    """The best counter available offline for ``model`` or ``encoding``.

    Exact (``tiktoken``) when the package is installed and the encoding file is
    already in tiktoken's local cache; otherwise :data:`APPROXIMATE`, with the
    reason logged once at INFO on the ``redis_memory`` logger. An explicit
    ``encoding`` wins over ``model``; an unknown model gets ``cl100k_base``.
    No network call is ever made: while the encoding loads, tiktoken's
    downloader is replaced (process-wide, under a lock) by one that refuses.
    The answer is cached per ``(model, encoding)``; see
    :func:`clear_token_counter_cache`.
    """
    key = (model, encoding)
    counter = _counters.get(key)
    if counter is None:
        with _lock:
            counter = _counters.get(key)
            if counter is None:
                counter = _counters[key] = _load_counter(model, encoding)
    return counter


def clear_token_counter_cache() -> None:
    """Forget cached counters and reported fallbacks: the next :func:`token_counter` checks again.

    Useful after an encoding file was put in tiktoken's cache, and in tests.
    """
    with _lock:
        _counters.clear()
        _reported.clear()


def _report(reason: str) -> None:
    if reason not in _reported:
        _reported.add(reason)
        log.info("%s", reason)


def _load_counter(model: str | None, encoding: str | None) -> TokenCounter:
    try:
        tiktoken = importlib.import_module("tiktoken")
    except ImportError:
        _report("tiktoken is not installed: counting tokens approximately")
        return APPROXIMATE
    except Exception as exc:  # a broken install must not break the caller
        _report(f"tiktoken could not be imported ({type(exc).__name__}: {exc}): counting tokens approximately")
        return APPROXIMATE

    name = encoding
    by_model: Callable[[str], Any] | None = None
    if name is None and model is not None:
        name_for_model = getattr(tiktoken, "encoding_name_for_model", None)
        if callable(name_for_model):
            try:
                name = str(name_for_model(model))
            except KeyError:
                _report(f"tiktoken does not know model {model!r}: using encoding {DEFAULT_ENCODING}")
        else:
            found = getattr(tiktoken, "encoding_for_model", None)
            by_model = found if callable(found) else None
    wanted = name or DEFAULT_ENCODING

    refused: list[str] = []
    try:
        with _downloads_refused(tiktoken, refused):
            enc: Any = None
            if by_model is not None and model is not None:
                try:
                    enc = by_model(model)
                except KeyError:
                    _report(f"tiktoken does not know model {model!r}: using encoding {DEFAULT_ENCODING}")
            if enc is None:
                enc = tiktoken.get_encoding(wanted)
            else:
                wanted = str(getattr(enc, "name", wanted))
            encode = getattr(enc, "encode_ordinary", None) or enc.encode

            def count(text: str) -> int:
                return len(encode(text))

            count("probe")
    except Exception as exc:
        if refused:
            _report(
                f"tiktoken encoding {wanted} is not in the local cache: counting tokens approximately "
                "(no download is attempted)"
            )
        else:
            _report(
                f"tiktoken encoding {wanted} could not be loaded ({type(exc).__name__}: {exc}): "
                "counting tokens approximately"
            )
        return APPROXIMATE
    return TokenCounter(count, name=f"tiktoken:{wanted}", exact=True)


@contextlib.contextmanager
def _downloads_refused(tiktoken: ModuleType, refused: list[str]) -> Iterator[None]:
    """Swap ``tiktoken.load.read_file`` for a refusal that records each URL in ``refused``.

    ``read_file_cached`` calls ``read_file`` only on a cache miss, so a cached
    encoding still loads. Local paths pass through. An installed tiktoken
    without that hook is not trusted: the error makes the caller fall back.
    """
    loader = getattr(tiktoken, "load", None)
    if loader is None and hasattr(tiktoken, "__path__"):
        loader = importlib.import_module(f"{tiktoken.__name__}.load")
    if loader is None:  # a stand-in module with no downloader
        yield
        return
    original = getattr(loader, "read_file", None)
    if not callable(original):
        raise RuntimeError("tiktoken.load.read_file is missing: cannot rule out a download")

    def refuse(blobpath: str) -> bytes:
        if "://" not in blobpath:
            return bytes(original(blobpath))
        refused.append(blobpath)
        raise _DownloadRefused(f"redis_memory does not download tiktoken files ({blobpath})")

    loader.read_file = refuse
    try:
        yield
    finally:
        loader.read_file = original


def message_tokens(message: Mapping[str, Any], counter: Callable[[str], int]) -> int:
    """Estimate what one chat message costs in the prompt, after OpenAI's chat format accounting.

    3 tokens of framing, plus the tokens of every string value (``role``,
    ``content``, ``name``, ``tool_call_id``...), plus 1 when ``name`` is set.
    List content counts the ``text`` of each text part and the compact JSON of
    any other part; any other non-None value (``tool_calls``...) counts as its
    compact JSON. Real APIs add a few tokens per request to prime the reply,
    and inline images cost differently: leave a margin.
    """
    total = MESSAGE_OVERHEAD
    for key, value in message.items():
        if value is None:
            continue
        if key == "content" and isinstance(value, list):
            total += sum(_part_tokens(part, counter) for part in value)
        else:
            total += _value_tokens(value, counter)
    if message.get("name") is not None:
        total += NAME_OVERHEAD
    return total


def _part_tokens(part: Any, counter: Callable[[str], int]) -> int:
    if isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
        return counter(part["text"])
    return _value_tokens(part, counter)


def _value_tokens(value: Any, counter: Callable[[str], int]) -> int:
    if isinstance(value, str):
        return counter(value)
    return counter(json.dumps(value, default=str, ensure_ascii=False, separators=(",", ":")))


def fit_messages(
    messages: Iterable[Mapping[str, Any]],
    max_tokens: int,
    *,
    counter: Callable[[str], int] | None = None,
    keep_system: bool = True,
    summarize: Callable[[list[dict[str, Any]]], Mapping[str, Any] | str] | None = None,
) -> list[dict[str, Any]]:
    """The newest messages that fit ``max_tokens``, in their original order, as plain copies.

    With ``keep_system``, a leading ``"system"`` message is always kept first
    and counted; ``ValueError`` if it alone is over budget. The rest is taken
    newest first up to the first message that does not fit: the window is
    contiguous, an older message never replaces a big newer one. ``tool``
    results whose calling assistant message was cut are cut too.

    When messages were dropped and ``summarize`` is given, it receives them
    (copies, oldest first) and returns a message or a str (which becomes a
    system message). The summary goes right after the system message and
    counts against the budget: while it does not fit, the oldest kept
    messages join the dropped ones and ``summarize`` is called again;
    ``ValueError`` when it cannot fit even alone. ``counter`` defaults to
    :func:`token_counter`. The inputs are never modified.
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise TypeError(f"max_tokens must be an int, not {type(max_tokens).__name__}")
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be 0 or more, not {max_tokens}")
    if isinstance(messages, (str, bytes, Mapping)):
        raise TypeError(f"messages must be a list of message dicts, not a {type(messages).__name__}")
    history = list(messages)
    for index, message in enumerate(history):
        if not isinstance(message, Mapping):
            raise TypeError(f"message {index} is a {type(message).__name__}, not a dict")
    count = counter if counter is not None else token_counter()

    head: list[dict[str, Any]] = []
    used = 0
    if keep_system and history and history[0].get("role") == "system":
        system = plain(dict(history.pop(0)))
        used = message_tokens(system, count)
        if used > max_tokens:
            raise ValueError(f"the system message alone costs {used} tokens, more than max_tokens={max_tokens}")
        head.append(system)

    kept: list[tuple[dict[str, Any], int]] = []  # newest first until reversed
    room = max_tokens - used
    for message in reversed(history):
        copy = plain(dict(message))
        cost = message_tokens(copy, count)
        if cost > room:
            break
        kept.append((copy, cost))
        room -= cost
    kept.reverse()
    _drop_orphan_tool_results(kept)
    first_kept = len(history) - len(kept)
    if first_kept == 0 or summarize is None:
        return head + [copy for copy, _ in kept]

    dropped = [plain(dict(message)) for message in history[:first_kept]]
    while True:
        summary = _summary_message(summarize([plain(message) for message in dropped]))
        summary_cost = message_tokens(summary, count)
        room = max_tokens - used - summary_cost
        kept_cost = sum(cost for _, cost in kept)
        if kept_cost <= room:
            return [*head, summary, *(copy for copy, _ in kept)]
        if not kept:
            raise ValueError(
                f"the summary costs {summary_cost} tokens but only {max_tokens - used} of max_tokens={max_tokens} "
                "are left after the system message"
            )
        while kept and kept_cost > room:
            copy, cost = kept.pop(0)
            dropped.append(copy)
            kept_cost -= cost
        dropped += [copy for copy, _ in _drop_orphan_tool_results(kept)]


def _drop_orphan_tool_results(kept: list[tuple[dict[str, Any], int]]) -> list[tuple[dict[str, Any], int]]:
    """Remove (and return) ``tool`` messages at the start of the window.

    Their assistant message with the ``tool_calls`` was cut, and chat APIs
    refuse a tool result whose call they cannot see.
    """
    orphans = []
    while kept and kept[0][0].get("role") == "tool":
        orphans.append(kept.pop(0))
    return orphans


def _summary_message(result: Any) -> dict[str, Any]:
    if isinstance(result, str):
        return {"role": "system", "content": result}
    if isinstance(result, Mapping):
        message: dict[str, Any] = plain(dict(result))
        return message
    raise TypeError(f"summarize must return a message dict or a str, not {type(result).__name__}")
