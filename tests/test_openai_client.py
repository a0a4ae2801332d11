"""The OpenAI-compatible client against a real HTTP server on loopback (no mocks).

The server speaks the chat-completions protocol; its behaviour is chosen by the model name:
`rule` answers from a fixed question -> answer table, `busy` sends 429 + Retry-After once,
`broken` always 500, `slow` answers after a delay, `bad` is a 400, `garbage` is not JSON.
"""

from __future__ import annotations

import email.utils
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from ragcomp.cli import main
from ragcomp.llm.openai import OpenAIClient, OpenAIError, OpenAIReader, _retry_after
from ragcomp.types import Passage

ANSWERS = {
    "What is the capital of France?": "Paris.",
    "Which river is the West Yorkshire city of Leeds built around?": "the River Aire.",
    "When did Kazimir Malevich introduce Suprematism?": "The answer is: in 1915.",
}


class ChatServer:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    seen = sum(r["body"].get("model") == body.get("model") for r in server.requests)
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                model = body.get("model")
                if model == "busy" and seen == 1:
                    return self._send(429, {"error": {"message": "Rate limit reached"}}, {"Retry-After": "1"})
                if model == "broken":
                    return self._send(500, {"error": {"message": "model crashed"}})
                if model == "bad":
                    return self._send(400, {"error": {"message": "model 'bad' does not exist"}})
                if model == "garbage":
                    return self._send_raw(200, b"<html>oops</html>")
                if model == "slow":
                    time.sleep(1.5)
                user = body["messages"][-1]["content"]
                m = re.search(r"Question: (.*)\n", user)
                answer = ANSWERS.get(m.group(1) if m else "", "unknown")
                self._send(200, {
                    "id": "chatcmpl-1", "object": "chat.completion", "model": model,
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": answer}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                })

            def _send(self, status: int, obj: dict, headers: dict[str, str] | None = None) -> None:
                self._send_raw(status, json.dumps(obj).encode(), headers)

            def _send_raw(self, status: int, raw: bytes, headers: dict[str, str] | None = None) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(raw)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(raw)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def count(self, model: str) -> int:
        with self.lock:
            return sum(r["body"].get("model") == model for r in self.requests)


@pytest.fixture()
def server() -> Iterator[ChatServer]:
    s = ChatServer()
    s.thread.start()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MSG = [{"role": "user", "content": "Question: What is the capital of France?\n"}]


def test_chat_round_trip_and_auth_header(server: ChatServer) -> None:
    client = OpenAIClient(server.url, api_key="sk-test", timeout=5)
    assert client.chat("rule", MSG, max_tokens=8) == "Paris."
    req = server.requests[-1]
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == "Bearer sk-test"
    assert req["body"] == {"model": "rule", "messages": MSG, "max_tokens": 8, "temperature": 0.0}


def test_no_key_sends_no_authorization(server: ChatServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    OpenAIClient(server.url, timeout=5).chat("rule", MSG)
    assert "Authorization" not in server.requests[-1]["headers"]


def test_reader_builds_prompt_and_cleans_answer(server: ChatServer) -> None:
    reader = OpenAIReader("rule", base_url=server.url, max_tokens=16, timeout=5)
    assert reader.tokenizer == "cl100k"
    q = "When did Kazimir Malevich introduce Suprematism?"
    assert reader.answer(q, "Malevich introduced Suprematism in 1915.") == "in 1915"
    msgs = server.requests[-1]["body"]["messages"]
    assert msgs[0]["role"] == "system" and "short answer" in msgs[0]["content"]
    assert "Context:\nMalevich introduced" in msgs[1]["content"] and f"Question: {q}\n" in msgs[1]["content"]
    reader.answer(q, None)  # selective augmentation: no context section at all
    assert "Context" not in server.requests[-1]["body"]["messages"][1]["content"]


def test_429_is_retried_after_retry_after(server: ChatServer) -> None:
    client = OpenAIClient(server.url, timeout=5, max_retries=2, backoff=0.01)
    t = time.perf_counter()
    assert client.chat("busy", MSG) == "Paris."
    elapsed = time.perf_counter() - t
    assert server.count("busy") == 2 and client.retries_done == 1
    assert 0.9 <= elapsed < 4, elapsed  # waited the server's 1 s, not the 0.01 s backoff


def test_500_until_retries_are_exhausted(server: ChatServer) -> None:
    client = OpenAIClient(server.url, timeout=5, max_retries=2, backoff=0.01)
    with pytest.raises(OpenAIError, match=r"HTTP 500 after 3 attempts: model crashed") as info:
        client.chat("broken", MSG)
    assert server.count("broken") == 3
    assert info.value.status == 500 and info.value.attempts == 3
    assert info.value.url == server.url + "/chat/completions"


def test_client_errors_are_not_retried(server: ChatServer) -> None:
    client = OpenAIClient(server.url, timeout=5, max_retries=3, backoff=0.01)
    with pytest.raises(OpenAIError, match=r"HTTP 400: model 'bad' does not exist"):
        client.chat("bad", MSG)
    assert server.count("bad") == 1
    with pytest.raises(OpenAIError, match="not JSON"):
        client.chat("garbage", MSG)
    assert server.count("garbage") == 1
    no_v1 = OpenAIClient(server.url[: -len("/v1")], timeout=5, max_retries=3)
    with pytest.raises(OpenAIError, match=r"HTTP 404.*need a /v1 suffix"):
        no_v1.chat("rule", MSG)


def test_slow_server_times_out_with_retries(server: ChatServer) -> None:
    client = OpenAIClient(server.url, timeout=0.3, max_retries=1, backoff=0.01)
    t = time.perf_counter()
    with pytest.raises(OpenAIError, match=r"did not answer within 0.3 s \(2 attempts\)"):
        client.chat("slow", MSG)
    assert time.perf_counter() - t < 1.4  # gave up before the server's 1.5 s answer
    assert server.count("slow") == 2


def test_unreachable_url_fails_fast_with_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    client = OpenAIClient(url, timeout=30, max_retries=5, backoff=1.0)
    t = time.perf_counter()
    with pytest.raises(OpenAIError, match=re.escape(url)) as info:
        client.chat("rule", MSG)
    assert "connection refused" in str(info.value)
    with pytest.raises(OpenAIError, match=re.escape(url)):
        client.check()
    assert time.perf_counter() - t < 2  # no retries, no backoff on a refused connection


def test_cli_unreachable_reader_fails_before_indexing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "Q?", "answers": ["a"], "titles": ["T"]}) + "\n", encoding="utf-8")
    url = f"http://127.0.0.1:{free_port()}/v1"
    t = time.perf_counter()
    rc = main(["eval", "--data", str(qa), "--method", "rerank", "--reader", "openai:gpt-x", "--base-url", url,
               "--corpus", str(tmp_path / "never-read.jsonl"), "--quiet"])
    assert rc == 2
    assert url in capsys.readouterr().err
    assert time.perf_counter() - t < 5


def test_bad_base_url_and_settings() -> None:
    with pytest.raises(ValueError, match="http"):
        OpenAIClient("localhost:8000")
    with pytest.raises(ValueError, match="max_retries"):
        OpenAIClient("http://localhost:1/v1", max_retries=-1)


def test_retry_after_header_forms() -> None:
    assert _retry_after({"Retry-After": "3"}) == 3.0
    assert _retry_after({"retry-after-ms": "250", "Retry-After": "9"}) == 0.25
    date = email.utils.formatdate(time.time() + 2, usegmt=True)
    assert 0.5 < (_retry_after({"Retry-After": date}) or 0) <= 2.5
    assert _retry_after({"Retry-After": "soon"}) is None
    assert _retry_after({}) is None and _retry_after(None) is None


def test_evaluate_with_remote_reader(server: ChatServer) -> None:
    from ragcomp.eval import evaluate

    corpus = [
        Passage("Leeds", "Leeds is a city in West Yorkshire, England. It is built around the River Aire."),
        Passage("Kazimir Malevich", "Kazimir Malevich was a Russian avant-garde artist. He introduced "
                "Suprematism in 1915."),
        Passage("Paris", "Paris is the capital and largest city of France."),
        Passage("Nile", "The Nile is a major north-flowing river in northeastern Africa."),
    ]
    data = [
        {"id": "q1", "question": "Which river is the West Yorkshire city of Leeds built around?",
         "answers": ["River Aire", "Aire"], "titles": ["Leeds"],
         "evidence": ["It is built around the River Aire."]},
        {"id": "q2", "question": "When did Kazimir Malevich introduce Suprematism?", "answers": ["1915"],
         "titles": ["Kazimir Malevich"], "evidence": ["He introduced Suprematism in 1915."]},
        {"id": "q3", "question": "Which sea does the Nile flow into?", "answers": ["Mediterranean Sea"],
         "titles": ["Nile"], "evidence": []},
    ]
    reader = OpenAIReader("rule", base_url=server.url, timeout=5)
    report = evaluate(data, method=[], baseline=True, corpus=corpus, retrieve_k=2, reader=reader,
                      device="cpu")
    run = report["runs"][0]
    preds = {q["id"]: q["prediction"] for q in run["per_question"]}
    assert preds == {"q1": "the River Aire", "q2": "in 1915", "q3": "unknown"}
    assert run["em"] == pytest.approx(1 / 3, abs=1e-4)  # "the River Aire" == "River Aire" after SQuAD norm
    # F1: q1 1.0, q2 2/3 ("in 1915" vs "1915"), q3 0.
    assert run["f1"] == pytest.approx((1 + 2 / 3) / 3, abs=1e-4)
    assert run["latency_ms"]["generate"]["p50"] is not None
    assert report["config"]["reader"]["base_url"] == server.url
    assert report["config"]["tokenizer"] == "cl100k_base"
    assert server.count("rule") == 3
