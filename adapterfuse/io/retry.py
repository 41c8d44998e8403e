"""Retries and one-line errors for the Hub client: backoff, ``Retry-After``, offline mode, scrubbed messages.

A network step is retried with exponential backoff (``backoff * 2**attempt``) on HTTP 5xx, 429 and connection
errors, and fails at once on any other status (401/403/404 cannot heal by waiting). When the server says how long
to wait (a ``Retry-After`` header on a 429 or 503), that wait is used instead, up to ``Retry.max_wait``; a longer
one fails at once, saying when to try again. Offline mode (``HF_HUB_OFFLINE``) is never retried.

Errors are :class:`HubError` with a one-line message naming the repo, the step, the HTTP status and a fix. The
token never appears in them: messages are built here, scrubbed of the token, and raised without chaining the
client's exception (whose request object holds the ``Authorization`` header).
"""

from __future__ import annotations

import email.utils
import functools
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

from adapterfuse.errors import AdapterFuseError

logger = logging.getLogger("adapterfuse.io.hub")

T = TypeVar("T")

# Hub tokens and bearer headers, scrubbed from any text we put in a message even if we did not know the token.
_TOKEN_RES = (re.compile(r"hf_[A-Za-z0-9]{6,}"), re.compile(r"(?i)(bearer\s+)\S+"))


class HubError(AdapterFuseError):
    """A push to or pull from the Hub failed: bad arguments, a refusing or unreachable server, or remote files
    that do not match the local ones."""


@dataclass(frozen=True)
class Retry:
    """How a push or pull retries a network step on HTTP 5xx/429 or a connection error.

    Attributes:
        max_retries: retries per network step (0 disables them).
        backoff: the first retry waits ``backoff`` seconds, then ``backoff * 2**attempt``.
        sleep: the function used to wait between retries (injectable for tests).
        max_wait: the longest ``Retry-After`` wait honoured, in seconds; a server asking for more fails at once.
    """

    max_retries: int = 4
    backoff: float = 1.0
    sleep: Callable[[float], None] = time.sleep
    max_wait: float = 120.0


@dataclass(frozen=True)
class Policy:
    """Everything a network step needs to retry and to explain a failure.

    Attributes:
        action: ``push`` or ``pull``.
        repo_id: the repo.
        endpoint: the Hub URL, for messages.
        retry: the retry settings.
        secrets: strings never to show (the token).
    """

    action: Literal["push", "pull"]
    repo_id: str
    endpoint: str
    retry: Retry
    secrets: tuple[str, ...]


@dataclass(frozen=True)
class _Failure:  # what one failed attempt tells
    status: int | None
    retryable: bool
    connection: bool
    detail: str
    retry_after: float | None = None
    offline: bool = False


def check_retry(retry: object) -> None:
    """Refuse retry settings that are not a :class:`Retry` of sane numbers, before any request.

    Args:
        retry: the value given.

    Raises:
        HubError: naming the field, the expected and the actual value.
    """
    if not isinstance(retry, Retry):
        raise HubError(
            f"retry {retry!r}: expected an adapterfuse.io.hub.Retry (e.g. Retry(max_retries=4, "
            "backoff=1.0)); fix the argument"
        )
    max_retries = retry.max_retries
    if not isinstance(max_retries, int) or isinstance(max_retries, bool) or max_retries < 0:
        raise HubError(f"retry.max_retries {max_retries!r}: expected an integer >= 0 (e.g. 4); fix the argument")
    for name, value, example in (("backoff", retry.backoff, "1.0"), ("max_wait", retry.max_wait, "120")):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < float("inf"):
            raise HubError(
                f"retry.{name} {value!r}: expected a number of seconds >= 0 (e.g. {example}); fix the argument"
            )


def known_secrets(token: str | None) -> tuple[str, ...]:
    """The token that requests will carry (given, or the stored login), to scrub from every message.

    Args:
        token: the token passed by the caller, or ``None`` for the stored one.

    Returns:
        A tuple of zero or one secret.
    """
    if isinstance(token, str) and token:
        return (token,)
    try:  # token=None means the client sends the stored one: scrub that one too
        from huggingface_hub import get_token

        stored = get_token()
    except Exception:  # a broken token file must not hide the real error
        stored = None
    return (stored,) if stored else ()


def _scrub(text: str, secrets: tuple[str, ...], limit: int = 240) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    text = _TOKEN_RES[1].sub(r"\1***", _TOKEN_RES[0].sub("hf_***", text))
    text = " ".join(text.split())  # one line
    return text if len(text) <= limit else text[:limit] + "..."


@functools.lru_cache(maxsize=1)
def _connection_error_types() -> tuple[type[BaseException], ...]:
    """Transport-level errors of whichever HTTP stack this huggingface_hub version uses."""
    kinds: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, names in (
        ("httpx2", ("TimeoutException", "NetworkError", "RemoteProtocolError")),
        ("httpx", ("TimeoutException", "NetworkError", "RemoteProtocolError")),
        ("requests.exceptions", ("ConnectionError", "Timeout")),
    ):
        try:
            imported = __import__(module, fromlist=list(names))
        except ImportError:
            continue
        kinds.extend(getattr(imported, name) for name in names if hasattr(imported, name))
    return tuple(kinds)


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: a number of seconds or an HTTP date.

    Args:
        value: the header's value, or ``None``.
        now: the current time (seconds since the epoch; default: now).

    Returns:
        The wait (>= 0), or ``None`` when there is no usable header.
    """
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    return max(0.0, seconds) if seconds == seconds and seconds != float("inf") else None


def _chain(err: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen and len(chain) < 8:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _classify(err: BaseException, secrets: tuple[str, ...]) -> _Failure:
    """What ``err`` (or one of its causes) says: HTTP status, retryable or not, the server's wait, offline mode."""
    chain = _chain(err)
    # The client's offline error is a ConnectionError, but waiting cannot end offline mode: never retry it.
    if any(type(exc).__name__ == "OfflineModeIsEnabled" for exc in chain):
        return _Failure(None, False, False, "", offline=True)
    for exc in chain:  # wrappers (e.g. snapshot_download's) keep the HTTP error as their cause
        try:
            status = exc.response.status_code  # type: ignore[attr-defined]
            headers = exc.response.headers  # type: ignore[attr-defined]
        except Exception:
            continue
        if isinstance(status, int):
            detail = _scrub(str(getattr(exc, "server_message", None) or ""), secrets)
            wait = retry_after_seconds(headers.get("Retry-After")) if headers is not None else None
            return _Failure(status, status == 429 or status >= 500, False, detail, wait)
    for exc in chain:
        if isinstance(exc, _connection_error_types()):
            return _Failure(None, True, True, f"{type(exc).__name__}: {_scrub(str(exc), secrets)}")
    return _Failure(None, False, False, f"{type(err).__name__}: {_scrub(str(err), secrets)}")


def offline_message(action: str, repo_id: str) -> str:
    """The one line for a push or pull refused because the client is in offline mode.

    Args:
        action: ``push`` or ``pull``.
        repo_id: the repo.

    Returns:
        The message.
    """
    return (
        f"{action} of repo '{repo_id}': the Hugging Face client is in offline mode (HF_HUB_OFFLINE or "
        f"TRANSFORMERS_OFFLINE is set) and refuses every request; expected online mode; unset "
        f"HF_HUB_OFFLINE and TRANSFORMERS_OFFLINE to {action}"
    )


def _explain(step: str, policy: Policy, failure: _Failure, attempts: int) -> str:
    repo, access, status = policy.repo_id, "write" if policy.action == "push" else "read", failure.status
    head, tries = f"{policy.action} of repo '{repo}' failed at step '{step}'", f"after {attempts} attempt(s)"
    said = f" (server said: {failure.detail})" if failure.detail else ""
    if failure.offline:
        return offline_message(policy.action, repo)
    if failure.retry_after is not None and failure.retry_after > policy.retry.max_wait:
        return (
            f"{head}: HTTP {status}; the Hub asks to wait {failure.retry_after:.0f} s (Retry-After), more than "
            f"retry.max_wait = {policy.retry.max_wait:g} s; try again after that wait"
        )
    if status == 401:
        return (
            f"{head}: HTTP 401 unauthorized{said}; the token is missing, invalid or expired: pass token=..., "
            "set HF_TOKEN or run `hf auth login` with a valid token"
        )
    if status == 403:
        return (
            f"{head}: HTTP 403 forbidden{said}; check that the token has {access} permission on '{repo}' "
            "(a token with the 'write' role for that user or organisation)"
        )
    if status == 404:
        return (
            f"{head}: HTTP 404 not found{said}; check the repo id (and revision), and that the token can "
            f"see '{repo}' if it is private"
        )
    if status == 429:
        return (
            f"{head}: HTTP 429 rate limited {tries}; wait a few minutes and retry, or raise "
            "retry.max_retries/retry.backoff"
        )
    if status is not None and status >= 500:
        return (
            f"{head}: HTTP {status} server error {tries}{said}; the Hub is having trouble: retry later, "
            "or raise retry.max_retries/retry.backoff"
        )
    if status is not None:
        return f"{head}: HTTP {status}{said}; check the repo id, the files and the token"
    if failure.connection:
        return (
            f"{head}: could not reach {policy.endpoint} {tries} ({failure.detail}); check the network and "
            "HF_ENDPOINT, then retry"
        )
    return f"{head}: {failure.detail}"


def with_retries(step: str, policy: Policy, fn: Callable[[], T]) -> T:
    """Run ``fn``; retry it on 5xx/429/connection errors (waiting ``Retry-After`` when the server gives one).

    Args:
        step: the step's name, for messages (``commit``, ``verify`` …).
        policy: the retry settings and what messages name.
        fn: the network step.

    Returns:
        What ``fn`` returns.

    Raises:
        HubError: a failure that cannot heal by waiting (4xx, offline mode, a wait longer than
            ``retry.max_wait``), or the last failure once ``retry.max_retries`` retries are spent.
    """
    attempt = 0
    while True:
        try:
            return fn()
        except HubError:
            raise
        except Exception as err:  # every client error is turned into our own scrubbed message below
            failure = _classify(err, policy.secrets)
        too_long = failure.retry_after is not None and failure.retry_after > policy.retry.max_wait
        # Raised outside the `except` block (and `from None`) so that neither __cause__ nor __context__ carries
        # the client's exception, whose request holds the Authorization header.
        if not failure.retryable or too_long or attempt >= policy.retry.max_retries:
            raise HubError(_explain(step, policy, failure, attempt + 1)) from None
        delay = policy.retry.backoff * 2**attempt if failure.retry_after is None else failure.retry_after
        logger.warning(
            "%s of %s: step '%s' got %s; retrying in %.1fs%s (retry %d/%d)",
            policy.action,
            policy.repo_id,
            step,
            f"HTTP {failure.status}" if failure.status else "a connection error",
            delay,
            " (the server's Retry-After)" if failure.retry_after is not None else "",
            attempt + 1,
            policy.retry.max_retries,
        )
        policy.retry.sleep(delay)
        attempt += 1
