"""A small OpenAI-compatible chat-completions client for VLM explainers and judges (standard library only).

What autointerp at scale needs and nothing more: image inputs (base64 PNG data URLs in the
messages), an on-disk response cache (key = sha256 of model + messages + generation
parameters, so a re-run costs nothing), retries with exponential backoff on 429 / 5xx /
timeouts / dropped connections (honouring Retry-After), a thread-pool concurrency limit, and a
token / cost tally from each response's `usage`. Failures come back as `ChatResult(ok=False)`,
never as exceptions, so one bad answer cannot stop a run of thousands.

The API key is sent in the Authorization header only, and only to the configured origin: redirects
are never followed (an answer 3xx is a failure naming where it pointed). It is never part of the
cache key, the cache files, the request log, error messages or `ClientConfig.public()`. `timeout` is
a total deadline per HTTP request (a server trickling bytes cannot hold a request longer). When most
requests of a batch fail, `complete_many` raises DifflensError with a summary, so a run cannot
silently report chance-level scores.

Transport: by default this file's standard-library client, which gives the guarantees above. With
`DIFFLENS_VLM_CLIENT=openai` (or `auto`: the SDK when installed, else this client) requests go
through the optional `openai` SDK instead, which many OpenAI-compatible servers are tested against
and which brings its own retries and backoff; the cache, tally, request log, key redaction in our
messages and the failure summary stay the same, but redirects, timeouts and response sizes are
then handled by the SDK (its timeout is per phase, not a total deadline; no size cap), so the
redirect and deadline guarantees above hold for the default transport only.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import random
import socket
import threading
import time
import sys
from urllib.parse import urlsplit
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from difflens.errors import DifflensError
from difflens.utils import atomic_write_text, progress

ENV_BASE_URL = "DIFFLENS_VLM_BASE_URL"
ENV_CLIENT = "DIFFLENS_VLM_CLIENT"
TRANSPORTS = ("http", "openai", "auto")
ENV_MODEL = "DIFFLENS_VLM_MODEL"
ENV_API_KEYS = ("DIFFLENS_VLM_API_KEY", "OPENAI_API_KEY")
RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
MAX_RESPONSE_BYTES = 16 * 1024 * 1024


@dataclass
class ClientConfig:
    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    timeout: float = 60.0  # seconds per HTTP request, in total (connect, send, wait, read)
    max_retries: int = 5  # retries after the first attempt
    backoff: float = 1.0  # first retry waits ~backoff s, then doubling
    max_backoff: float = 30.0
    concurrency: int = 4  # requests in flight
    max_tokens: int = 200
    temperature: float = 0.0
    price_input: float = 0.0  # USD per 1M prompt tokens (for the tally)
    price_output: float = 0.0  # USD per 1M completion tokens
    max_failure_fraction: float = 0.5  # complete_many stops the run when more requests than this fail
    transport: str = field(default_factory=lambda: os.environ.get(ENV_CLIENT, "http"))  # http | openai | auto

    @classmethod
    def from_env(cls, base_url: str | None = None, model: str | None = None, api_key: str | None = None, **kw) -> ClientConfig:
        """Flags win over the environment (DIFFLENS_VLM_BASE_URL, DIFFLENS_VLM_MODEL, DIFFLENS_VLM_API_KEY / OPENAI_API_KEY)."""
        base_url = base_url or os.environ.get(ENV_BASE_URL) or "https://api.openai.com/v1"
        model = model or os.environ.get(ENV_MODEL)
        if not model:
            raise DifflensError(f"no VLM model given: pass --vlm-model or set {ENV_MODEL} (e.g. gpt-4o-mini)")
        if api_key is None:
            api_key = next((os.environ[k] for k in ENV_API_KEYS if os.environ.get(k)), None)
        return cls(base_url=base_url, model=model, api_key=api_key, **{k: v for k, v in kw.items() if v is not None})

    def public(self) -> dict:
        """The settings safe to write into reports (everything but the key)."""
        return {k: v for k, v in self.__dict__.items() if k != "api_key"} | {"api_key_set": bool(self.api_key)}

    @property
    def url(self) -> str:
        u = self.base_url.rstrip("/")
        return u if u.endswith("/chat/completions") else u + "/chat/completions"


@dataclass
class ChatResult:
    ok: bool
    content: str | None = None
    usage: dict = field(default_factory=dict)
    cached: bool = False
    attempts: int = 0
    status: int | None = None
    error: str | None = None


class _Retryable(Exception):
    def __init__(self, msg: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(msg)
        self.status, self.retry_after = status, retry_after


def request_key(model: str, messages: list, max_tokens: int, temperature: float) -> str:
    blob = json.dumps({"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature},
                      sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _content_of(data) -> str:
    choice = data["choices"][0]
    content = choice["message"]["content"]
    if isinstance(content, list):  # some servers return content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str):
        raise TypeError(f"message content is {type(content).__name__}")
    return content


class ChatClient:
    """Thread-safe; `complete_many` runs up to `config.concurrency` requests at once."""

    def __init__(self, config: ClientConfig, *, cache_dir: str | Path | None = None, log_path: str | Path | None = None,
                 sleep=time.sleep, seed: int = 0):
        self.config = config
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.log_path = Path(log_path) if log_path else None
        self._sleep = sleep
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self.tally = {"calls": 0, "cached": 0, "http_requests": 0, "retries": 0, "failures": 0,
                      "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "cost_usd": 0.0}

    # ---- public -------------------------------------------------------------------------------
    def complete(self, messages: list) -> ChatResult:
        c = self.config
        key = request_key(c.model, messages, c.max_tokens, c.temperature)
        with self._lock:
            self.tally["calls"] += 1
        hit = self._cache_get(key)
        if hit is not None:
            with self._lock:
                self.tally["cached"] += 1
            self._log({"key": key, "cached": True, "ok": True})
            return ChatResult(True, hit["content"], hit.get("usage", {}), cached=True)
        res = self._call(key, messages)
        with self._lock:
            if not res.ok:
                self.tally["failures"] += 1
            u = res.usage or {}
            pt, ct = int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0)
            self.tally["prompt_tokens"] += pt
            self.tally["completion_tokens"] += ct
            self.tally["total_tokens"] += int(u.get("total_tokens") or pt + ct)
            self.tally["cost_usd"] += (pt * c.price_input + ct * c.price_output) / 1e6
        if res.ok:
            self._cache_put(key, res)
        return res

    def complete_many(self, requests: list[list], desc: str = "vlm") -> list[ChatResult]:
        """Results in the order of `requests`; identical requests are sent once."""
        c = self.config
        keys = [request_key(c.model, m, c.max_tokens, c.temperature) for m in requests]
        first: dict[str, int] = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        uniq = list(first.values())
        results: dict[int, ChatResult] = {}
        bar = progress(total=len(uniq), desc=desc, unit="req")
        with ThreadPoolExecutor(max_workers=max(1, int(c.concurrency))) as pool:
            futs = {pool.submit(self.complete, requests[i]): i for i in uniq}
            for fut in futs:
                results[futs[fut]] = fut.result()
                bar.update(1)
        bar.close()
        self._check_failures([results[i] for i in uniq], desc)
        return [results[first[k]] for k in keys]

    def _check_failures(self, results: list[ChatResult], desc: str) -> None:
        """Most requests failing means the scores would be noise: stop with a summary; warn on some."""
        failed = [r for r in results if not r.ok]
        if not failed:
            return
        errors: dict[str, int] = {}
        for r in failed:
            key = (r.error or "unknown error")[:160]
            errors[key] = errors.get(key, 0) + 1
        common = "; ".join(f"{n}x {e}" for e, n in sorted(errors.items(), key=lambda kv: -kv[1])[:3])
        summary = f"{desc}: {len(failed)} of {len(results)} VLM requests failed ({common})"
        if len(failed) > self.config.max_failure_fraction * len(results):
            raise DifflensError(
                f"{summary}. Stopping: scores from so few answers would be meaningless. Check --vlm-base-url, "
                "--vlm-model and the API key; answers that did arrive are cached, so a re-run does not pay for them again"
            )
        print(f"warning: {summary}; their scores count as failures", file=sys.stderr)

    # ---- HTTP ---------------------------------------------------------------------------------
    def _sdk(self):
        """The openai SDK client, or None to use the standard-library transport."""
        c = self.config
        if c.transport not in TRANSPORTS:
            raise DifflensError(f"VLM transport {c.transport!r} is unknown: set {ENV_CLIENT} to one of {', '.join(TRANSPORTS)}")
        if c.transport == "http":
            return None
        with self._lock:
            if getattr(self, "_openai", None) is None:
                try:
                    import openai
                except ImportError:
                    if c.transport == "openai":
                        raise DifflensError(f"{ENV_CLIENT}=openai needs the openai package: pip install openai "
                                            f"(or set {ENV_CLIENT}=http)") from None
                    self._openai = False
                    return None
                base = c.url[: -len("/chat/completions")]
                self._openai = (openai, openai.OpenAI(base_url=base, api_key=c.api_key or "unused", timeout=c.timeout,
                                                      max_retries=c.max_retries))
            return self._openai or None

    def _call_sdk(self, key: str, messages: list, sdk) -> ChatResult:
        openai, client = sdk
        c = self.config
        t0 = time.monotonic()
        with self._lock:
            self.tally["http_requests"] += 1
        try:
            resp = client.chat.completions.create(model=c.model, messages=messages, max_tokens=c.max_tokens,
                                                  temperature=c.temperature)
            data = resp.model_dump() if hasattr(resp, "model_dump") else dict(resp)
            content = _content_of(data)
        except openai.APIStatusError as e:
            err = self._clean(f"HTTP {e.status_code} {getattr(e, 'message', e)}")
            self._log({"key": key, "status": e.status_code, "ok": False, "error": err, "via": "openai"})
            return ChatResult(False, attempts=1, status=e.status_code, error=err)
        except openai.APIError as e:  # connection errors and timeouts, after the SDK's own retries
            err = f"{type(e).__name__}: {self._clean(str(e))} (after {c.max_retries} retries by the openai SDK)"
            self._log({"key": key, "ok": False, "error": err, "via": "openai"})
            return ChatResult(False, attempts=c.max_retries + 1, error=err)
        except (KeyError, IndexError, TypeError) as e:
            err = f"malformed response (no choices[0].message.content: {type(e).__name__} {e})"
            self._log({"key": key, "ok": False, "error": err, "via": "openai"})
            return ChatResult(False, attempts=1, error=err)
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        self._log({"key": key, "ok": True, "usage": usage, "latency_s": round(time.monotonic() - t0, 3), "via": "openai"})
        return ChatResult(True, content, usage, attempts=1, status=200)

    def _call(self, key: str, messages: list) -> ChatResult:
        c = self.config
        sdk = self._sdk()
        if sdk is not None:
            return self._call_sdk(key, messages, sdk)
        body = json.dumps({"model": c.model, "messages": messages, "max_tokens": c.max_tokens,
                           "temperature": c.temperature}).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if c.api_key:
            headers["Authorization"] = f"Bearer {c.api_key}"
        last = "no attempt made"
        status = None
        for attempt in range(c.max_retries + 1):
            t0 = time.monotonic()
            with self._lock:
                self.tally["http_requests"] += 1
                if attempt:
                    self.tally["retries"] += 1
            try:
                data, status = self._post(body, headers)
            except _Retryable as e:
                last, status = str(e), e.status
                self._log({"key": key, "attempt": attempt + 1, "status": e.status, "ok": False, "error": last,
                           "latency_s": round(time.monotonic() - t0, 3)})
                if attempt < c.max_retries:
                    delay = min(c.max_backoff, c.backoff * 2**attempt) * (0.5 + 0.5 * self._rng.random())
                    if e.retry_after is not None:
                        delay = max(delay, min(e.retry_after, c.max_backoff))
                    self._sleep(delay)
                continue
            except _Fatal as e:
                self._log({"key": key, "attempt": attempt + 1, "status": e.status, "ok": False, "error": str(e)})
                return ChatResult(False, attempts=attempt + 1, status=e.status, error=str(e))
            try:
                content = _content_of(data)
            except (KeyError, IndexError, TypeError) as e:
                err = f"malformed response (no choices[0].message.content: {type(e).__name__} {e})"
                self._log({"key": key, "attempt": attempt + 1, "status": status, "ok": False, "error": err})
                return ChatResult(False, attempts=attempt + 1, status=status, error=err)
            usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
            self._log({"key": key, "attempt": attempt + 1, "status": status, "ok": True, "usage": usage,
                       "latency_s": round(time.monotonic() - t0, 3)})
            return ChatResult(True, content, usage, attempts=attempt + 1, status=status)
        return ChatResult(False, attempts=c.max_retries + 1, status=status, error=f"gave up after {c.max_retries + 1} attempts: {last}")

    def _post(self, body: bytes, headers: dict) -> tuple[dict, int]:
        """One POST with a total deadline of `config.timeout` seconds; redirects are never followed."""
        c = self.config
        u = urlsplit(c.url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise _Fatal(f"the VLM base URL must be http(s)://host[:port]/..., got scheme {u.scheme!r}")
        conn_cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
        conn = conn_cls(u.hostname, u.port, timeout=c.timeout)
        fired = threading.Event()

        def abort() -> None:  # the deadline: unblock whatever read or write is in progress
            fired.set()
            sock = conn.sock
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

        deadline = time.monotonic() + c.timeout
        timer = threading.Timer(c.timeout, abort)
        timer.daemon = True
        timer.start()
        try:
            conn.request("POST", u.path + (f"?{u.query}" if u.query else ""), body=body, headers=headers)
            resp = conn.getresponse()
            status = resp.status
            parts, total = [], 0
            while chunk := resp.read1(65536):
                parts.append(chunk)
                total += len(chunk)
                if total > MAX_RESPONSE_BYTES:
                    raise _Fatal(f"response larger than {MAX_RESPONSE_BYTES} bytes: refused", status)
                if time.monotonic() > deadline:
                    raise TimeoutError("deadline passed while reading the answer")
            raw = b"".join(parts)
            location = resp.getheader("Location")
            retry_after_h = resp.getheader("Retry-After")
        except _Fatal:
            raise
        except (TimeoutError, socket.timeout) as e:
            raise _Retryable(f"timeout: no complete answer within {c.timeout:g} s ({e})") from None
        except (ConnectionError, http.client.HTTPException, OSError) as e:
            if fired.is_set():
                raise _Retryable(f"timeout: no complete answer within {c.timeout:g} s") from None
            raise _Retryable(f"connection error: {type(e).__name__} {self._clean(str(e))}") from None
        finally:
            timer.cancel()
            conn.close()
        if 300 <= status < 400:
            to = urlsplit(location or "")
            where = f"{to.scheme}://{to.netloc}" if to.netloc else "a relative location"
            raise _Fatal(
                f"HTTP {status} redirect to {where}: not followed, so the API key goes only to "
                f"{u.scheme}://{u.netloc}; set --vlm-base-url to the address the server points to", status
            )
        if status >= 400:
            detail = self._clean(raw[:300].decode("utf-8", "replace"))
            try:
                retry_after = float(retry_after_h) if retry_after_h is not None else None
            except ValueError:
                retry_after = None
            msg = f"HTTP {status} {detail}".strip()
            if status in RETRY_STATUS or status >= 500:
                raise _Retryable(msg, status, retry_after)
            raise _Fatal(msg, status)
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise _Fatal(f"malformed response (not JSON): {self._clean(raw[:120].decode('utf-8', 'replace'))!r}", status) from None
        if not isinstance(data, dict):
            raise _Fatal("malformed response (JSON but not an object)", status)
        return data, status

    # ---- cache and log -------------------------------------------------------------------------
    def _cache_path(self, key: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / key[:2] / f"{key}.json"

    def _cache_get(self, key: str) -> dict | None:
        p = self._cache_path(key)
        if p is None or not p.exists():
            return None
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
            return d if isinstance(d.get("content"), str) else None
        except (OSError, ValueError):
            return None

    def _cache_put(self, key: str, res: ChatResult) -> None:
        p = self._cache_path(key)
        if p is None:
            return
        atomic_write_text(p, json.dumps({"model": self.config.model, "content": res.content, "usage": res.usage,
                                         "created": time.time()}))

    def _clean(self, text: str) -> str:
        k = self.config.api_key
        return text.replace(k, "***") if k and text else text

    def _log(self, entry: dict) -> None:
        if self.log_path is None:
            return
        line = self._clean(json.dumps({"time": round(time.time(), 3), **entry}))
        with self._lock:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(line + "\n")


class _Fatal(Exception):
    def __init__(self, msg: str, status: int | None = None):
        super().__init__(msg)
        self.status = status
