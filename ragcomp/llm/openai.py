"""A small, dependency-free client for OpenAI-compatible chat-completions endpoints.

Works with OpenAI and with the servers that speak its protocol (vLLM, llama.cpp, Ollama,
TGI, LM Studio...). Retries 408/409/429/5xx and dropped connections with exponential
backoff and jitter, honouring `Retry-After` (seconds or an HTTP date) and `retry-after-ms`;
does not retry other 4xx. An unreachable host fails at once with the URL in the message.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import os
import random
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from ragcomp.llm.base import Reader, clean_answer, system_prompt, user_prompt

DEFAULT_BASE_URL = "https://api.openai.com/v1"
RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


class OpenAIError(RuntimeError):
    """A request failed; `status` is the HTTP status (None when no response came back)."""

    def __init__(self, message: str, url: str, status: int | None = None, attempts: int = 1) -> None:
        super().__init__(message)
        self.url = url
        self.status = status
        self.attempts = attempts


class OpenAIClient:
    """POST JSON to `{base_url}/chat/completions` and friends.

    `timeout` bounds the connection and every read (seconds); `max_retries` is the number of
    retries after the first attempt; the wait before retry n is `backoff * 2**n` (with
    jitter, at most `max_backoff`) unless the server says how long to wait.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 4,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        connect_timeout: float = 5.0,
    ) -> None:
        url = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).strip().rstrip("/")
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url must be an http(s) URL like http://localhost:8000/v1, got {url!r}")
        if timeout <= 0 or connect_timeout <= 0:
            raise ValueError("timeouts must be > 0 seconds")
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an integer >= 0, got {max_retries!r}")
        self.base_url = url
        # The environment's key only when none is given; local servers usually need none.
        self._api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.timeout = float(timeout)
        self.connect_timeout = float(connect_timeout)
        self.max_retries = max_retries
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.retries_done = 0  # across all calls, for reports

    def __repr__(self) -> str:
        return (f"OpenAIClient(base_url={self.base_url!r}, timeout={self.timeout}, "
                f"max_retries={self.max_retries})")

    # -- public -------------------------------------------------------------------------------
    def check(self) -> None:
        """Open (and close) a TCP connection to the server, so a wrong URL fails in seconds."""
        parts = urllib.parse.urlsplit(self.base_url)
        host = parts.hostname or ""
        if urllib.request.getproxies().get(parts.scheme) and not urllib.request.proxy_bypass(host):
            return  # a proxy will carry the request; the host itself may be unreachable from here
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            with socket.create_connection((host, port), timeout=self.connect_timeout):
                pass
        except OSError as e:
            raise OpenAIError(
                f"cannot reach the chat endpoint at {self.base_url} ({host}:{port}): {_reason(e)}",
                self.base_url,
            ) from None

    def chat(
        self,
        model: str,
        messages: list[dict[str, str]],
        *,
        max_tokens: int | None = None,
        temperature: float | None = 0.0,
        **extra: Any,
    ) -> str:
        """The assistant message of one chat completion ('' when the server sent no text)."""
        payload: dict[str, Any] = {"model": model, "messages": messages}
        if max_tokens is not None:
            payload["max_tokens"] = max_tokens
        if temperature is not None:
            payload["temperature"] = temperature
        payload.update(extra)
        data = self.post("/chat/completions", payload)
        url = self.base_url + "/chat/completions"
        try:
            content = data["choices"][0]["message"].get("content")
        except (KeyError, IndexError, TypeError, AttributeError):
            raise OpenAIError(
                f"unexpected chat-completions response from {url}: {json.dumps(data)[:300]}", url, 200
            ) from None
        return content if isinstance(content, str) else ""

    def post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        """POST JSON to base_url + path with retries; the decoded JSON object that came back."""
        url = self.base_url + path
        body = json.dumps(payload).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json",
                   "User-Agent": "ragcomp"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        attempt = 0
        while True:
            attempt += 1
            req = urllib.request.Request(url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
                    status = resp.status
            except urllib.error.HTTPError as e:
                raw = _read_quietly(e)
                msg = _error_message(raw)
                retry = e.code in RETRY_STATUS
                if not retry or attempt > self.max_retries:
                    hint = " (does base_url need a /v1 suffix?)" if e.code == 404 else ""
                    tried = f" after {attempt} attempts" if attempt > 1 else ""
                    raise OpenAIError(
                        f"{url} answered HTTP {e.code}{tried}: {msg}{hint}", url, e.code, attempt
                    ) from None
                self._sleep(attempt, e.headers)
                continue
            except urllib.error.URLError as e:
                reason = e.reason
                if isinstance(reason, TimeoutError) and attempt <= self.max_retries:
                    self._sleep(attempt, None)
                    continue
                if isinstance(reason, TimeoutError):
                    raise OpenAIError(
                        f"{url} did not answer within {self.timeout:g} s ({attempt} attempts)", url,
                        None, attempt,
                    ) from None
                # Refused, unknown host, TLS failure: retrying will not help; fail fast.
                raise OpenAIError(f"cannot reach {url}: {_reason(reason)}", url, None, attempt) from None
            except TimeoutError:
                # A read that timed out after the headers came (urllib does not wrap it).
                if attempt <= self.max_retries:
                    self._sleep(attempt, None)
                    continue
                raise OpenAIError(
                    f"{url} did not answer within {self.timeout:g} s ({attempt} attempts)", url, None, attempt
                ) from None
            except (http.client.HTTPException, OSError) as e:
                # Dropped or reset mid-exchange: the server is there, a retry may succeed.
                if attempt <= self.max_retries:
                    self._sleep(attempt, None)
                    continue
                raise OpenAIError(
                    f"{url} dropped the connection ({attempt} attempts): {_reason(e)}", url, None, attempt
                ) from None
            try:
                data = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise OpenAIError(
                    f"{url} answered HTTP {status} with a body that is not JSON: {raw[:200]!r}", url, status
                ) from None
            if not isinstance(data, dict):
                raise OpenAIError(
                    f"{url} answered with JSON that is not an object: {raw[:200]!r}", url, status
                )
            return data

    # -- internals ----------------------------------------------------------------------------
    def _sleep(self, attempt: int, headers: Any) -> None:
        self.retries_done += 1
        wait = _retry_after(headers)
        if wait is None:
            # Exponential backoff with jitter, so many clients do not retry in lockstep.
            wait = self.backoff * (2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
        time.sleep(min(max(wait, 0.0), self.max_backoff))


def _retry_after(headers: Any) -> float | None:
    """Seconds the server asked us to wait, from retry-after-ms or Retry-After, if any."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return float(ms) / 1000.0
        except ValueError:
            pass
    value = headers.get("Retry-After")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return when.timestamp() - time.time()


def _read_quietly(e: urllib.error.HTTPError) -> bytes:
    try:
        return e.read() or b""
    except OSError:
        return b""


def _error_message(raw: bytes) -> str:
    """The server's own explanation: OpenAI's {"error": {"message"}} or the raw text."""
    text = raw.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return text[:300] or "(empty body)"
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:300]
        if isinstance(err, str):
            return err[:300]
        if data.get("message"):
            return str(data["message"])[:300]
    return text[:300]


def _reason(e: BaseException | str) -> str:
    if isinstance(e, str):
        return e
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, socket.gaierror):
        return f"unknown host ({e.strerror or e})"
    if isinstance(e, TimeoutError):
        return "timed out"
    return str(e) or type(e).__name__


class OpenAIReader(Reader):
    """Answers with a model behind an OpenAI-compatible endpoint (greedy: temperature 0).

    Tokens are counted with cl100k unless `tokenizer` names another counter (o200k for
    newer OpenAI models, or the served model's Hugging Face tokenizer).
    """

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        tokenizer: str | None = None,
        max_tokens: int = 32,
        timeout: float = 60.0,
        max_retries: int = 4,
        client: OpenAIClient | None = None,
    ) -> None:
        if not model:
            raise ValueError("OpenAIReader needs a model name")
        self.model = model
        self.name = f"openai:{model}"
        self.client = client or OpenAIClient(base_url, api_key, timeout=timeout, max_retries=max_retries)
        self.tokenizer = tokenizer or "cl100k"
        self.max_tokens = max_tokens

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "tokenizer": self.tokenizer, "base_url": self.client.base_url,
                "max_tokens": self.max_tokens, "temperature": 0.0}

    def check(self) -> None:
        self.client.check()

    def answer(self, question: str, context: str | None) -> str:
        messages = [
            {"role": "system", "content": system_prompt(context)},
            {"role": "user", "content": user_prompt(question, context)},
        ]
        text = self.client.chat(self.model, messages, max_tokens=self.max_tokens, temperature=0.0)
        return clean_answer(text)
