"""The chat-completions client and the VLM pipeline against a local OpenAI-compatible server."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from difflens.interpret.client import ChatClient, ClientConfig
from difflens.interpret.vlm import parse_score

SECRET = "sk-test-DO-NOT-LEAK-1234567890"


def answer(content, usage=(10, 3)):
    return {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
            "finish_reason": "stop"}], "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                                                  "total_tokens": usage[0] + usage[1]}}


class FakeVLM:
    """A chat-completions server on 127.0.0.1:<ephemeral> in a thread.

    `script` is consumed one action per request: ("json", obj) | ("status", code, headers) |
    ("raw", bytes) | ("slow", obj). When it is empty, `default(request_json)` answers.
    """

    def __init__(self, default=None):
        self.script: list = []
        self.requests: list[dict] = []
        self.auth: list[str | None] = []
        self.default = default or (lambda req: ("json", answer("0.5")))
        self.release = threading.Event()
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                req = json.loads(body)
                with outer.lock:
                    outer.requests.append({"path": self.path, "json": req})
                    outer.auth.append(self.headers.get("Authorization"))
                    action = outer.script.pop(0) if outer.script else outer.default(req)
                kind = action[0]
                if kind == "slow":
                    outer.release.wait(3.0)
                    kind, action = "json", ("json", action[1])
                if kind == "status":
                    self.send_response(action[1])
                    for k, v in (action[2] if len(action) > 2 else {}).items():
                        self.send_header(k, v)
                    data = b'{"error": {"message": "try later"}}'
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                data = json.dumps(action[1]).encode() if kind == "json" else action[1]
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except OSError:
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server():
    s = FakeVLM()
    yield s
    s.close()


def config(server, **kw):
    base = dict(base_url=server.url, model="fake-vlm", api_key=SECRET, timeout=5.0, max_retries=3, backoff=0.001,
                max_backoff=0.01, concurrency=3, price_input=1.0, price_output=2.0)
    base.update(kw)
    return ClientConfig(**base)


MSG = [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]


def grep_secret(folder) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]


def test_scripted_answer_usage_cache_and_no_key_on_disk(server, tmp_path):
    server.script = [("json", answer("0.75", (100, 5)))]
    c = ChatClient(config(server), cache_dir=tmp_path / "cache", log_path=tmp_path / "log.jsonl")
    r = c.complete(MSG)
    assert r.ok and r.content == "0.75" and not r.cached and r.attempts == 1
    assert server.requests[0]["path"] == "/v1/chat/completions"
    assert server.requests[0]["json"]["model"] == "fake-vlm" and server.auth[0] == f"Bearer {SECRET}"
    assert c.tally["prompt_tokens"] == 100 and c.tally["completion_tokens"] == 5
    assert c.tally["cost_usd"] == pytest.approx((100 * 1.0 + 5 * 2.0) / 1e6)
    again = ChatClient(config(server), cache_dir=tmp_path / "cache", log_path=tmp_path / "log.jsonl")
    r2 = again.complete(MSG)
    assert r2.ok and r2.cached and r2.content == "0.75" and len(server.requests) == 1
    assert again.tally["cached"] == 1 and again.tally["http_requests"] == 0
    other = ChatClient(config(server, model="another"), cache_dir=tmp_path / "cache").complete(MSG)
    assert not other.cached and len(server.requests) == 2  # the model is part of the key
    assert grep_secret(tmp_path) == [] and SECRET not in json.dumps(c.config.public())
    assert SECRET not in repr(c.config)


def test_retries_on_429_and_500_then_success(server, tmp_path):
    server.script = [("status", 429, {"Retry-After": "0"}), ("status", 500), ("status", 503), ("json", answer("ok"))]
    sleeps = []
    c = ChatClient(config(server), log_path=tmp_path / "log.jsonl", sleep=sleeps.append)
    r = c.complete(MSG)
    assert r.ok and r.content == "ok" and r.attempts == 4
    assert len(server.requests) == 4 and c.tally["retries"] == 3 and c.tally["failures"] == 0
    assert len(sleeps) == 3 and sleeps[0] <= sleeps[1] <= sleeps[2]  # exponential backoff (capped)
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [e.get("status") for e in log] == [429, 500, 503, 200]
    assert grep_secret(tmp_path) == []


def test_gives_up_after_retries_and_does_not_retry_client_errors(server):
    server.script = [("status", 502)] * 3
    c = ChatClient(config(server, max_retries=2), sleep=lambda s: None)
    r = c.complete(MSG)
    assert not r.ok and "gave up after 3 attempts" in r.error and "502" in r.error and c.tally["failures"] == 1
    server.script = [("status", 401)]
    n = len(server.requests)
    r = c.complete(MSG)
    assert not r.ok and r.status == 401 and len(server.requests) == n + 1


def test_timeout_is_retried_then_recorded(server):
    server.script = [("slow", answer("late")), ("slow", answer("late"))]
    c = ChatClient(config(server, timeout=0.2, max_retries=1), sleep=lambda s: None)
    r = c.complete(MSG)
    assert not r.ok and "timeout" in r.error and r.attempts == 2 and len(server.requests) == 2


@pytest.mark.parametrize("payload", [b"<html>bad gateway</html>", json.dumps({"choices": []}).encode(),
                                     json.dumps({"choices": [{"message": {}}]}).encode()])
def test_malformed_response_is_a_failure_not_a_crash(server, tmp_path, payload):
    server.script = [("raw", payload)]
    c = ChatClient(config(server), cache_dir=tmp_path / "cache", sleep=lambda s: None)
    r = c.complete(MSG)
    assert not r.ok and "malformed" in r.error and len(server.requests) == 1
    assert not list((tmp_path / "cache").rglob("*.json"))  # failures are not cached


def test_complete_many_keeps_order_and_sends_duplicates_once(server):
    server.default = lambda req: ("json", answer(req["messages"][0]["content"][0]["text"].upper()))
    msgs = [[{"role": "user", "content": [{"type": "text", "text": t}]}] for t in ["a", "b", "a", "c", "d", "b"]]
    res = ChatClient(config(server)).complete_many(msgs)
    assert [r.content for r in res] == ["A", "B", "A", "C", "D", "B"]
    assert len(server.requests) == 4


def test_parse_score():
    assert parse_score("0.8") == 0.8
    assert parse_score("Score: 0.25.") == 0.25
    assert parse_score('{"score": 1}') == 1.0
    assert parse_score("80%") == 0.8
    assert parse_score("1") == 1.0
    for bad in (None, "", "maybe", "7", "-0.2"):
        assert parse_score(bad) is None


def test_vlm_pipeline_against_local_server(tmp_path, monkeypatch):
    """`--judge openai` end to end: scripted explainer/judge, malformed answers, caching, no key on disk."""
    from test_interpret import D, SITE, world_store

    from difflens.interpret import CacheConfig, NeuronFeatures, run_pipeline

    store = world_store(tmp_path / "store", n=20)
    calls = {"judge": 0}

    def default(req):
        text = req["messages"][0]["content"][0]["text"]
        n_img = sum(p["type"] == "image_url" for p in req["messages"][0]["content"])
        assert all(p["image_url"]["url"].startswith("data:image/png;base64,") for p in req["messages"][0]["content"][1:])
        if "have in common" in text:
            assert n_img == 5
            return "json", answer("red objects")
        assert n_img == 1 and '"red objects"' in text
        calls["judge"] += 1
        return "json", answer("not sure" if calls["judge"] % 10 == 3 else "0.7")

    server = FakeVLM(default)
    try:
        monkeypatch.setenv("OPENAI_API_KEY", SECRET)
        monkeypatch.delenv("DIFFLENS_VLM_API_KEY", raising=False)
        cfg = ClientConfig.from_env(server.url, "fake-vlm", backoff=0.001, concurrency=2)
        assert cfg.api_key == SECRET
        kw = dict(judge="openai", baselines=(), n_features=6, client_config=cfg,
                  cache_config=CacheConfig(top_n=5, n_quantiles=1), grids=False)
        out = tmp_path / "run"
        rep = run_pipeline({"planted": NeuronFeatures(SITE, D, name="planted")}, store, out, **kw)
        n_req = len(server.requests)
        assert n_req > 0 and all(a == f"Bearer {SECRET}" for a in server.auth)
        res = json.loads((out / "planted" / "scores.json").read_text())["results"]
        assert res and all(r["explanation"] == "red objects" for r in res)
        for r in res:
            valid = [s for s in r["s_pos"] + r["s_neg"] if s is not None]
            assert all(s == 0.7 for s in valid)
            assert r["score"] == pytest.approx(0.5)  # 0.7 on positives and negatives = chance
        assert sum(r["judge_failures"] for r in res) >= 1  # the unparsable "not sure" is a recorded failure
        assert rep["vlm"]["tally"]["prompt_tokens"] > 0
        run = json.loads((out / "run.json").read_text())  # a paid judge: one chance control per item, no evidence mode
        assert run["protocol"]["chance_controls"] == 1 and run["evidence"] is None
        # a re-run is served from the cache: no new requests, same scores
        rep2 = run_pipeline({"planted": NeuronFeatures(SITE, D, name="planted")}, store, out, **kw)
        assert len(server.requests) == n_req
        assert any("reused the feature cache" in n for n in rep2["notes"])
        assert rep2["vlm"]["tally"]["http_requests"] == 0 and rep2["table"][0]["mean"] == rep["table"][0]["mean"]
        assert grep_secret(out) == []
        assert (out / "vlm_requests.jsonl").exists()
    finally:
        server.close()


def test_template_override_and_missing_placeholder(tmp_path):
    from difflens.errors import DifflensError
    from difflens.interpret.vlm import JUDGE_PROMPT, fill, load_template

    p = tmp_path / "judge.txt"
    p.write_text("Rate {explanation} on {0,1}")
    t = load_template(p, JUDGE_PROMPT, ("{explanation}",))
    assert fill(t, explanation="red") == "Rate red on {0,1}"
    p.write_text("no placeholder")
    with pytest.raises(DifflensError, match="explanation"):
        load_template(p, JUDGE_PROMPT, ("{explanation}",))


class _FakeOpenAI:
    """A stand-in `openai` module: records what the SDK would be asked and answers from a script."""

    class APIError(Exception):
        pass

    class APIStatusError(APIError):
        def __init__(self, message, status_code):
            super().__init__(message)
            self.message, self.status_code = message, status_code

    def __init__(self, script):
        self.script, self.calls, self.made = list(script), [], []
        fake = self

        class OpenAI:
            def __init__(self, **kw):
                fake.made.append(kw)
                self.chat = type("Chat", (), {"completions": type("C", (), {"create": staticmethod(fake.create)})()})()

        self.OpenAI = OpenAI

    def create(self, **kw):
        self.calls.append(kw)
        item = self.script.pop(0)
        if isinstance(item, Exception):
            raise item
        return type("Resp", (), {"model_dump": lambda self, d=item: d})()


def test_openai_sdk_transport_when_installed(tmp_path, monkeypatch):
    import sys

    fake = _FakeOpenAI([answer("a red circle", (12, 4)), _FakeOpenAI.APIStatusError("bad key sk-secret", 401),
                        _FakeOpenAI.APIError("connection reset")])
    monkeypatch.setitem(sys.modules, "openai", fake)
    assert ClientConfig(base_url="http://vlm.example/v1", model="m").transport == "http"  # the default
    monkeypatch.setenv("DIFFLENS_VLM_CLIENT", "auto")  # the SDK when installed
    cfg = ClientConfig(base_url="http://vlm.example/v1", model="m", api_key="sk-secret", timeout=7, max_retries=2)
    client = ChatClient(cfg, cache_dir=tmp_path / "cache", log_path=tmp_path / "log.jsonl")
    msg = [{"role": "user", "content": "what is this?"}]
    r = client.complete(msg)
    assert r.ok and r.content == "a red circle" and r.usage["prompt_tokens"] == 12
    assert fake.made == [{"base_url": "http://vlm.example/v1", "api_key": "sk-secret", "timeout": 7, "max_retries": 2}]
    assert fake.calls[0] == {"model": "m", "messages": msg, "max_tokens": cfg.max_tokens, "temperature": cfg.temperature}
    assert client.complete(msg).cached and len(fake.calls) == 1  # our cache still answers repeats
    bad = client.complete([{"role": "user", "content": "again"}])
    assert not bad.ok and bad.status == 401 and "sk-secret" not in bad.error
    down = client.complete([{"role": "user", "content": "third"}])
    assert not down.ok and "retries by the openai SDK" in down.error
    assert client.tally["prompt_tokens"] == 12 and client.tally["failures"] == 2
    assert "sk-secret" not in (tmp_path / "log.jsonl").read_text()


def test_transport_choice_and_missing_sdk(monkeypatch):
    import sys

    from difflens.errors import DifflensError

    monkeypatch.setitem(sys.modules, "openai", None)  # not installed
    auto = ChatClient(ClientConfig(base_url="http://127.0.0.1:9/v1", model="m", transport="auto"))
    assert auto._sdk() is None  # falls back to the standard-library client
    monkeypatch.setenv("DIFFLENS_VLM_CLIENT", "openai")
    with pytest.raises(DifflensError, match="pip install openai"):
        ChatClient(ClientConfig(base_url="http://127.0.0.1:9/v1", model="m"))._sdk()
    with pytest.raises(DifflensError, match="http, openai, auto"):
        ChatClient(ClientConfig(base_url="http://127.0.0.1:9/v1", model="m", transport="grpc"))._sdk()
