"""OpenAILLM: an LLM provider over the `openai` client and any OpenAI-compatible endpoint.

Guarantees, on top of those of `core.llm`:

- Retries happen only before the first token. `stream()` returns once the request is open AND the
  first piece of text has arrived, so every retry, every fallback and the first-token timeout are
  over before the caller shows anything. A 429, a 5xx, a 408 or 409, a connection error or a
  timeout, an error the provider sends inside the stream, or a stream that cannot be read is
  retried on the same model up to `max_attempts` times, with exponential backoff and
  full jitter (a 429's `Retry-After` is honoured instead, capped at `backoff_cap`); then the next
  model of the chain `[model, *fallback_models]` is tried. Any other 4xx is not retried on the same
  model: the next model is tried at once. When every model failed, `LLMError` names the last
  failure.
- After the first token nothing is retried: a dropped connection, a stream that sends nothing (or
  only keep-alive comments) for `request_timeout` seconds, an error event or a malformed chunk
  raises `LLMError` from the iterator, after the pieces that came before it. The caller keeps the
  partial text it has and ends the answer as failed.
- `aclose()` on a stream, or cancelling the task that iterates it, closes the HTTP response, so the
  provider sees the client go away and stops generating. It is safe to call more than once and
  after the end.
- Per business (`business_id`; `None` is one shared bucket): at most `max_concurrency_per_business`
  requests at once, and at most `requests_per_minute_per_business` HTTP requests a minute (every
  attempt counts, retries included). Callers over a limit wait; they are not refused. A stream
  holds its concurrency slot until it ends, fails or is closed.
- `complete()` is the non-streaming call (stage selection, data extraction), with the same
  retries, fallbacks and limits; `request_timeout` bounds each attempt as a whole.

The `openai` client is configured once (base URL, key, timeouts, its aiohttp HTTP client) and its
HTTP client sends every request; the request is built here, once per call, from the client's own
URL and headers, and a failed one is raised as the client's own exception (its
`_make_status_error_from_response`, the same object `create()` raises). Going through
`chat.completions.create()` cost about 2 ms of CPU per request in the client's request machinery
(option models, its TypedDict transform, URL building), more than relaying the whole answer's tokens
(bench/README.md, "The model request"). A streamed answer's body is read by `core.openai_sse` (one
JSON parse per event instead of the client's object per chunk).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import math
import random
import time
import types
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

import httpx2
import openai
import orjson
from aiolimiter import AsyncLimiter
from openai.types.chat import ChatCompletionMessageParam
from openai.types.chat.completion_create_params import ResponseFormat

from core.errors import LLMError, Unavailable
from core.llm import ChatMessage, Completion, Usage  # Completion is re-exported from here too
from core.openai_sse import ChunkReader, StreamFormatError, transport_failure

__all__ = ["Completion", "LLMErrorObserver", "OpenAILLM", "OpenAIStream"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

_ROLES = frozenset({"system", "developer", "user", "assistant"})


class LLMErrorObserver(Protocol):
    """What OpenAILLM reports: one `error(code)` per failed attempt or failed stream.

    Codes: "llm_rate_limited", "llm_server_error" (also an error sent inside the stream),
    "llm_timeout", "llm_connection", "llm_rejected" (a 4xx that is not retried), "llm_conflict"
    (409) and "llm_bad_response" (a stream that cannot be read).
    `core.observer.Observer` satisfies this.
    """

    def error(self, code: str) -> None: ...


@dataclass(frozen=True, slots=True)
class _Failure:
    model: str
    code: str
    detail: str
    retryable: bool
    retry_after: float | None = None

    def describe(self) -> str:
        return f"model {self.model!r}: {self.detail} ({self.code})"


class _Bucket:
    """The limits of one business: a concurrency semaphore and a request-rate limiter."""

    __slots__ = ("limiter", "semaphore")

    def __init__(self, concurrency: int, per_minute: int) -> None:
        self.semaphore = asyncio.Semaphore(concurrency)
        self.limiter = AsyncLimiter(per_minute, 60.0)


class OpenAIStream:
    """One streamed answer; see the module docstring for its guarantees.

    Async-iterable once, by one consumer, as `str` pieces in order; the first piece has already
    arrived when `OpenAILLM.stream()` returns. `usage` is set when the stream ends normally and the
    provider reported it. `model` names the model of the chain that answers.
    """

    def __init__(
        self,
        *,
        model: str,
        first: list[str],
        reader: ChunkReader | None,
        usage: Usage | None,
        release: Callable[[], None],
        report: Callable[[str], None],
    ) -> None:
        self.model = model
        self.usage: Usage | None = None
        self._first = first
        self._reader = reader
        self._pending_usage = usage
        self._release: Callable[[], None] | None = release
        self._report = report
        self._closed = False
        self._iterator: AsyncGenerator[str, None] | None = None
        if reader is None:  # the answer ended before any text
            self._finish()

    def __aiter__(self) -> AsyncIterator[str]:
        if self._iterator is None:
            self._iterator = self._pieces()
        return self._iterator

    async def _pieces(self) -> AsyncGenerator[str, None]:
        # The finally runs on normal end, on error, on the consumer's cancellation (raised at the
        # await below) and when the generator is closed: each closes the HTTP response.
        try:
            pieces, self._first = self._first, []
            while not self.is_closed():
                for piece in pieces:
                    yield piece
                    if self.is_closed():  # closed by another task while the consumer held this piece
                        return
                reader = self._reader
                if reader is None:
                    return
                try:
                    pieces = await reader.read()
                except openai.APIError as exc:
                    if self.is_closed():  # closed by another task while we waited: a quiet end
                        return
                    failure = _classify(exc, self.model)
                    self._report(failure.code)
                    raise LLMError(
                        f"the answer stream failed after its first token: {failure.describe()}"
                    ) from exc
                if not pieces:  # [DONE], or the end of the body
                    self._pending_usage = reader.usage
                    self._finish()
                    return
        finally:
            await self.aclose()

    def is_closed(self) -> bool:
        """True once the stream has ended, failed or been closed."""
        return self._closed

    def _finish(self) -> None:
        self.usage = self._pending_usage
        self._closed = True
        self._free_slot()

    def _free_slot(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    async def aclose(self) -> None:
        """Stop the answer: close the HTTP response (the provider sees the disconnect and stops
        generating) and free the business's concurrency slot. Idempotent; safe after the end."""
        self._closed = True
        reader, self._reader = self._reader, None
        try:
            if reader is not None:
                await reader.aclose()
        finally:
            self._free_slot()
        # Finish our own generator too when no one is inside it (a consumer that stopped reading),
        # rather than leaving that to the garbage collector.
        iterator = self._iterator
        if isinstance(iterator, types.AsyncGeneratorType) and not iterator.ag_running:
            await iterator.aclose()


class OpenAILLM:
    """An `LLMProvider` over `openai.AsyncOpenAI`; see the module docstring for its guarantees."""

    name = "openai"

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str | None,
        model: str,
        fallback_models: Sequence[str] = (),
        max_attempts: int = 3,
        backoff_base: float = 0.25,
        backoff_cap: float = 4.0,
        first_token_timeout: float = 20.0,
        request_timeout: float = 60.0,
        max_concurrency_per_business: int = 256,
        requests_per_minute_per_business: int = 3000,
        observer: LLMErrorObserver | None = None,
        transport: Literal["aiohttp", "httpx2"] = "aiohttp",
    ) -> None:
        if not isinstance(api_key, str) or not api_key:
            raise ValueError("api_key must be a non-empty string")
        if base_url is not None and not (
            isinstance(base_url, str) and base_url.startswith(("http://", "https://"))
        ):
            raise ValueError("base_url must be None or an http(s) URL")
        if isinstance(fallback_models, str):
            raise ValueError("fallback_models must be a sequence of model names, not a string")
        chain = [model, *fallback_models]
        if not all(isinstance(m, str) and m.strip() for m in chain):
            raise ValueError("model and fallback_models must be non-empty strings")
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if not (math.isfinite(backoff_base) and backoff_base >= 0):
            raise ValueError("backoff_base must be >= 0")
        if not (math.isfinite(backoff_cap) and backoff_cap >= backoff_base):
            raise ValueError("backoff_cap must be >= backoff_base")
        if not (math.isfinite(first_token_timeout) and first_token_timeout > 0):
            raise ValueError("first_token_timeout must be > 0")
        if not (math.isfinite(request_timeout) and request_timeout > 0):
            raise ValueError("request_timeout must be > 0")
        if max_concurrency_per_business < 1:
            raise ValueError("max_concurrency_per_business must be >= 1")
        if requests_per_minute_per_business < 1:
            raise ValueError("requests_per_minute_per_business must be >= 1")
        if transport not in ("aiohttp", "httpx2"):
            raise ValueError("transport must be 'aiohttp' or 'httpx2'")
        self.model = model
        self.models: tuple[str, ...] = tuple(chain)
        self._api_key = api_key
        self._base_url = base_url
        self._max_attempts = max_attempts
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._first_token_timeout = first_token_timeout
        self._request_timeout = request_timeout
        self._concurrency = max_concurrency_per_business
        self._per_minute = requests_per_minute_per_business
        self._observer = observer
        self._transport = transport
        self._client: openai.AsyncOpenAI | None = None
        self._http: httpx2.AsyncClient | None = None  # the client's HTTP client
        self._url = ""  # <base_url>/chat/completions
        self._headers: dict[str, str] = {}
        self._closed = False
        # One bucket per business seen; business ids are few and long-lived, so none is evicted.
        self._buckets: dict[str | None, _Bucket] = {}

    async def connect(self) -> None:
        """Create the HTTP client now rather than on the first request (optional)."""
        self._get_client()

    async def close(self) -> None:
        """Close the HTTP client. Streams still open fail; later calls raise `Unavailable`."""
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    def _get_client(self) -> openai.AsyncOpenAI:
        if self._closed:
            raise Unavailable("the LLM service is closed")
        if self._client is None:
            # `read` is the inactivity timeout between two reads of a response.
            timeout = openai.Timeout(
                self._request_timeout, connect=min(self._first_token_timeout, self._request_timeout)
            )
            # The client's aiohttp transport (openai[aiohttp]) reads a streamed body for about
            # half the CPU of its default one (bench/README.md); both behave the same here.
            http = (
                openai.DefaultAioHttpClient(timeout=timeout)
                if self._transport == "aiohttp"
                else openai.DefaultAsyncHttpxClient(timeout=timeout)
            )
            self._client = openai.AsyncOpenAI(
                api_key=self._api_key,
                base_url=self._base_url,
                # This service owns retries (only before the first token, with fallbacks and
                # per-business limits): the client must not retry on its own as well.
                max_retries=0,
                timeout=timeout,
                http_client=http,
            )
            self._http = http
            self._url = str(self._client.base_url).rstrip("/") + "/chat/completions"
            # What the client sends with every request: content type, user agent, its platform
            # headers and the key's Authorization header.
            headers = {k: v for k, v in self._client.default_headers.items() if isinstance(v, str)}
            self._headers = {**headers, **self._client.auth_headers}
        return self._client

    async def _post(self, client: openai.AsyncOpenAI, body: dict[str, object]) -> httpx2.Response:
        """POST `body` to the chat completions endpoint on the client's HTTP client, the response
        open for streaming; a timeout, a connection failure or an error status is raised as the
        exception the client would raise for it (`openai.APITimeoutError`,
        `openai.APIConnectionError`, `openai.APIStatusError` and its subclasses)."""
        http = self._http
        assert http is not None, "_get_client() first"
        request = http.build_request("POST", self._url, content=orjson.dumps(body), headers=self._headers)
        try:
            response = await http.send(request, stream=True)
        except openai.OpenAIError:
            raise
        except Exception as exc:  # whatever the transport raises: the request did not get through
            raise transport_failure(exc, request) from exc
        if response.status_code >= 400:
            try:
                await response.aread()
            except Exception:  # the body is only for the message: the status says enough
                log.debug("reading an error body failed", exc_info=True)
            finally:
                await response.aclose()
            raise client._make_status_error_from_response(response)
        return response

    def _bucket(self, business_id: str | None) -> _Bucket:
        bucket = self._buckets.get(business_id)
        if bucket is None:
            bucket = self._buckets[business_id] = _Bucket(self._concurrency, self._per_minute)
        return bucket

    def _report(self, code: str) -> None:
        if self._observer is None:
            return
        try:
            self._observer.error(code)
        except Exception:  # an observer must never break an answer
            log.exception("the LLM observer failed")

    async def stream(
        self, messages: Sequence[ChatMessage], *, business_id: str | None = None
    ) -> OpenAIStream:
        """Open a streamed answer and wait for its first piece of text (see the module docstring).

        Raises `LLMError` when every model of the chain failed before its first token.
        """
        params = _to_params(messages)
        self._get_client()
        bucket = self._bucket(business_id)
        await bucket.semaphore.acquire()
        try:
            return await self._run(lambda model: self._open_stream(model, params, bucket))
        except BaseException:
            bucket.semaphore.release()
            raise

    async def _open_stream(
        self, model: str, params: list[ChatCompletionMessageParam], bucket: _Bucket
    ) -> OpenAIStream:
        await bucket.limiter.acquire()
        client = self._get_client()
        reader: ChunkReader | None = None
        try:
            async with asyncio.timeout(self._first_token_timeout):
                reader = await self._request_stream(client, model, params)
                pieces = await reader.read()
        except BaseException:
            if reader is not None:
                await reader.aclose()
            raise
        if pieces:
            return self._new_stream(model, pieces, reader, None, bucket)
        await reader.aclose()  # the answer ended without any text
        return self._new_stream(model, [], None, reader.usage, bucket)

    async def _request_stream(
        self, client: openai.AsyncOpenAI, model: str, params: list[ChatCompletionMessageParam]
    ) -> ChunkReader:
        """Send the streamed request on the client's HTTP client (see the module docstring) and
        read its body ourselves: the client's per-chunk objects cost more than the rest of the
        gateway."""
        body: dict[str, object] = {
            "model": model,
            "messages": params,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        response = await self._post(client, body)
        closer = contextlib.AsyncExitStack()
        closer.push_async_callback(response.aclose)
        return ChunkReader(response, closer=closer, idle_timeout=self._request_timeout)

    def _new_stream(
        self,
        model: str,
        first: list[str],
        reader: ChunkReader | None,
        usage: Usage | None,
        bucket: _Bucket,
    ) -> OpenAIStream:
        return OpenAIStream(
            model=model,
            first=first,
            reader=reader,
            usage=usage,
            release=bucket.semaphore.release,
            report=self._report,
        )

    async def complete(
        self,
        messages: Sequence[ChatMessage],
        *,
        json_schema: Mapping[str, Any] | None = None,
        business_id: str | None = None,
    ) -> Completion:
        """One non-streaming answer, with the same retries, fallbacks and limits as `stream()`.

        With `json_schema`, asks for strict structured output (the text is then the JSON). Raises
        `LLMError` when every model of the chain failed.
        """
        params = _to_params(messages)
        response_format: ResponseFormat | None = None
        if json_schema is not None:
            response_format = {
                "type": "json_schema",
                "json_schema": {"name": "extraction", "schema": dict(json_schema), "strict": True},
            }
        self._get_client()
        bucket = self._bucket(business_id)
        async with bucket.semaphore:
            return await self._run(lambda model: self._complete_once(model, params, response_format, bucket))

    async def _complete_once(
        self,
        model: str,
        params: list[ChatCompletionMessageParam],
        response_format: ResponseFormat | None,
        bucket: _Bucket,
    ) -> Completion:
        await bucket.limiter.acquire()
        client = self._get_client()
        body: dict[str, object] = {"model": model, "messages": params}
        if response_format is not None:
            body["response_format"] = response_format
        async with asyncio.timeout(self._request_timeout):
            response = await self._post(client, body)
            try:
                raw = await response.aread()
            except Exception as exc:  # the connection broke while the body was read
                raise transport_failure(exc, response.request) from exc
            finally:
                await response.aclose()
        text, usage = _read_completion(raw, response.request)
        return Completion(text=text, usage=usage, model=model)

    async def _run(self, attempt: Callable[[str], Awaitable[_T]]) -> _T:
        """Try each model of the chain, up to `max_attempts` times each, until one succeeds."""
        last: _Failure | None = None
        last_exc: BaseException | None = None
        for model in self.models:
            for number in range(1, self._max_attempts + 1):
                try:
                    return await attempt(model)
                except (TimeoutError, openai.APIError) as exc:
                    failure = _classify(exc, model)
                    last, last_exc = failure, exc
                self._report(failure.code)
                log.warning("LLM attempt %d failed on %s", number, failure.describe())
                if not failure.retryable or number == self._max_attempts:
                    break
                await asyncio.sleep(self._delay(number, failure))
        assert last is not None  # the chain has at least one model and one attempt
        raise LLMError(f"every model failed; the last failure: {last.describe()}") from last_exc

    def _delay(self, number: int, failure: _Failure) -> float:
        if failure.retry_after is not None:
            return min(max(failure.retry_after, 0.0), self._backoff_cap)
        # Exponential backoff with full jitter.
        return random.uniform(0.0, min(self._backoff_cap, self._backoff_base * 2.0 ** (number - 1)))


def _read_completion(raw: bytes, request: httpx2.Request) -> tuple[str, Usage | None]:
    """The text (`choices[0].message.content`) and usage of a chat completion's JSON body; an
    `openai.APIError` naming the problem when it cannot be read (retried like a bad stream)."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise StreamFormatError("the completion is not JSON", request, body=None) from None
    if not isinstance(body, dict):
        raise StreamFormatError("the completion is not a JSON object", request, body=None)
    if body.get("error"):
        error = body["error"]
        message = error.get("message") if isinstance(error, dict) else error
        raise openai.APIError(str(message or "the provider returned an error"), request, body=body)
    text = ""
    choices = body.get("choices")
    if choices:
        first = choices[0] if isinstance(choices, list) else None
        message = first.get("message") if isinstance(first, dict) else None
        if not isinstance(message, dict):
            raise StreamFormatError("the completion's choices carry no message", request, body=None)
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            raise StreamFormatError("the completion's content is not a string", request, body=None)
        text = content or ""
    usage = body.get("usage")
    if isinstance(usage, dict):
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if type(prompt) is int and type(completion) is int:
            return text, Usage(prompt, completion)
    return text, None


def _to_params(messages: Sequence[ChatMessage]) -> list[ChatCompletionMessageParam]:
    params: list[ChatCompletionMessageParam] = []
    for message in messages:
        if message.role == "system":
            params.append({"role": "system", "content": message.content})
        elif message.role == "developer":
            params.append({"role": "developer", "content": message.content})
        elif message.role == "user":
            params.append({"role": "user", "content": message.content})
        elif message.role == "assistant":
            params.append({"role": "assistant", "content": message.content})
        else:
            raise ValueError(f"unknown chat role {message.role!r}; expected one of {sorted(_ROLES)}")
    return params


def _classify(exc: BaseException, model: str) -> _Failure:
    """What a failed attempt was, and whether it is worth trying again on the same model."""
    if isinstance(exc, TimeoutError):
        return _Failure(model, "llm_timeout", "no answer in time", retryable=True)
    if isinstance(exc, StreamFormatError):
        return _Failure(model, "llm_bad_response", exc.message, retryable=True)
    if isinstance(exc, openai.APITimeoutError):  # before APIConnectionError: it is a subclass
        return _Failure(model, "llm_timeout", "the request timed out", retryable=True)
    if isinstance(exc, openai.APIConnectionError):
        return _Failure(model, "llm_connection", f"connection error: {exc.message}", retryable=True)
    if isinstance(exc, openai.RateLimitError):
        return _Failure(
            model,
            "llm_rate_limited",
            "HTTP 429 rate limited",
            retryable=True,
            retry_after=_retry_after(exc.response.headers),
        )
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        detail = exc.message  # "Error code: <status> - <the provider's message>"
        if status >= 500:
            return _Failure(model, "llm_server_error", detail, retryable=True)
        if status == 408:
            return _Failure(model, "llm_timeout", detail, retryable=True)
        if status == 409:
            return _Failure(model, "llm_conflict", detail, retryable=True)
        return _Failure(model, "llm_rejected", detail, retryable=False)
    # Any other APIError: an error event inside the stream, an unparseable response.
    message = exc.message if isinstance(exc, openai.APIError) else str(exc)
    return _Failure(model, "llm_server_error", f"provider error: {message}", retryable=True)


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from `retry-after-ms` or `retry-after` (seconds or an HTTP date)."""
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / divisor
        except ValueError:
            continue
        return seconds if math.isfinite(seconds) else None
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        parsed = email.utils.parsedate_tz(value)
        return None if parsed is None else float(email.utils.mktime_tz(parsed) - time.time())
    except (TypeError, ValueError, OverflowError):
        return None
