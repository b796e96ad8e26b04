"""Faults and hostile use against the real server: a hung engine, an engine that cannot start,
a client that stops reading, foreign Host headers, and what clients and engines get to see.

Faults are caused for real where they can be (a bogus engine flag makes vLLM exit at start; a
socket that is never read fills up); a hung engine is a SIGSTOPped process tree, injected on
purpose because nothing else hangs vLLM on demand.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from api_harness import ADMIN_KEY, API_KEY, Server, assert_error, descendants, engine_of, frozen
from emo_serve.api.service import public_location
from emo_serve.engines.process import CLIENT_KEEP_ALIVE_SECONDS

pytestmark = pytest.mark.vllm

FAST_PROBES = ("--probe-interval", "1", "--probe-timeout", "1", "--probe-misses", "3")


@pytest.fixture(scope="module")
def supervised(server_factory, tiny_ckpt: Path) -> Server:
    server = server_factory(tiny_ckpt, "--served-model-name", "tiny", "--dtype", "float32", "--max-model-len", "512",
                            "--kv-cache-gb", "1", *FAST_PROBES, "--client-send-timeout", "3",
                            env={"EMO_ENGINE_MODE": "shared", "HF_TOKEN": "hf_secret_token_value"})
    server.wait_ready()
    return server


def engine_environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def test_engines_get_no_keys_or_tokens(supervised: Server) -> None:
    env = engine_environ(engine_of(supervised, "tiny")["pid"])
    assert env["EMO_PARENT_PID"]
    assert not [k for k in env if k.startswith("EMO_") and k != "EMO_PARENT_PID"]
    assert "HF_TOKEN" not in env and "hf_secret_token_value" not in json.dumps(env)


def test_an_engine_keeps_idle_connections_open_longer_than_the_front_end_does(supervised: Server) -> None:
    """The front end pools connections to its engines and drops an idle one after
    CLIENT_KEEP_ALIVE_SECONDS. If the engine closed it first (vLLM's default: after 5 s idle), a
    request sent on it just as the engine closes it fails: seen as 'Can not write request body'
    in a CI run's routing collector, and a user's request on such a connection would get a 503."""
    pid = engine_of(supervised, "tiny")["pid"]
    assert int(engine_environ(pid)["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"]) > CLIENT_KEEP_ALIVE_SECONDS
    args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    health = b"GET /health HTTP/1.1\r\nHost: engine\r\n\r\n"
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(30)
        conn.connect(args[args.index("--uds") + 1])
        conn.sendall(health)
        assert conn.recv(4096).startswith(b"HTTP/1.1 200")
        time.sleep(7)  # idle past vLLM's default keep-alive, then the same connection again
        conn.sendall(health)
        assert conn.recv(4096).startswith(b"HTTP/1.1 200")


def test_a_hung_engine_is_killed_failed_requests_answer_then_it_recovers(supervised: Server) -> None:
    client = supervised.client(API_KEY)
    answers: list[httpx.Response] = []
    pid = engine_of(supervised, "tiny")["pid"]
    with frozen(pid):
        t0 = time.monotonic()
        worker = threading.Thread(target=lambda: answers.append(client.post(
            "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 4}, timeout=120)))
        worker.start()
        worker.join(60)
        waited = time.monotonic() - t0
    assert answers, "the request was still waiting on a hung engine after 60 s"
    assert_error(answers[0], 503)
    assert waited < 30
    ready = httpx.get(f"{supervised.url}/ready")
    assert ready.status_code == 503 and "health probe" in ready.json()["detail"]
    out = client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 4}, timeout=600)
    assert out.status_code == 200, out.text
    assert httpx.get(f"{supervised.url}/ready").status_code == 200
    assert engine_of(supervised, "tiny")["crashes"] == 1


def vllm_workers(engine_pid: int) -> list[int]:
    """The engine's worker processes (vLLM titles them `VLLM::Worker...`): where the model runs."""
    out = []
    for pid in descendants(engine_pid):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            continue
        if title.startswith("VLLM::Worker"):
            out.append(pid)
    return out


def test_a_dead_worker_answers_503_everywhere_then_the_engine_restarts(supervised: Server) -> None:
    """Kill the process that runs the model (what a SIGILL in a kernel does), not the API server:
    vLLM then answers the next request with its own 500 "EngineCore encountered an issue" and
    its control calls fail. Clients must get the OpenAI-shaped 503 with Retry-After instead, for
    completions and for a subset whose mask row must be installed, and the engine must restart."""
    client, admin = supervised.client(API_KEY), supervised.client(ADMIN_KEY)
    engine = engine_of(supervised, "tiny")
    workers = vllm_workers(engine["pid"])
    assert workers, f"no VLLM::Worker process under the engine {engine['pid']}"
    os.kill(workers[0], signal.SIGKILL)

    created = admin.post("/v1/subsets", json={"name": "made-while-dead", "experts": [0, 1, 2, 3], "load": True},
                         timeout=120)
    assert created.status_code != 500, created.text
    if created.status_code >= 400:
        assert_error(created, 503)
        assert created.headers.get("retry-after"), created.headers
    answers = [client.post("/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 1}, timeout=120)
               for model in ("tiny", "made-while-dead")]
    for r in answers:
        err = assert_error(r, 503)
        assert err["code"] == "model_unavailable" and r.headers.get("retry-after"), (r.headers, r.text)
        assert "EngineCore" not in r.text and "stack trace" not in r.text, r.text
    deadline = time.monotonic() + 600
    while True:  # restarted on demand (after its back-off): until then a 503, never a 500
        out = client.post("/v1/completions", json={"model": "made-while-dead", "prompt": "x", "max_tokens": 1},
                          timeout=600)
        if out.status_code == 200:
            break
        assert_error(out, 503)
        assert time.monotonic() < deadline, "the engine did not come back within 600 s"
        time.sleep(2)
    assert engine_of(supervised, "tiny")["crashes"] == engine["crashes"] + 1
    assert engine_of(supervised, "tiny")["pid"] != engine["pid"]


def test_the_issues_bodies_cannot_get_around_max_n(supervised: Server) -> None:
    """Default limits (--max-n 16, 64 choices): prompt lists multiplied n to 16,000 choices."""
    client = supervised.client(API_KEY)
    for body in ({"model": "tiny", "prompt": ["hi"] * 1000, "n": 16, "max_tokens": 1},
                 {"model": "tiny", "prompt": ["hello there"] * 200, "n": 16, "max_tokens": 64}):
        err = assert_error(client.post("/v1/completions", json=body), 400, param="prompt")
        assert "choices" in err["message"]
    ok = client.post("/v1/completions", json={"model": "tiny", "prompt": ["a", "b"], "n": 2, "max_tokens": 1})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 4, ok.text


def test_a_client_that_stops_reading_is_dropped(supervised: Server) -> None:
    """A raw socket with a small receive buffer that never reads a long, verbose stream (~10 MB:
    16 choices x 480 tokens x 20 logprobs, more than the kernel buffers of a loopback socket)."""
    body = json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 480, "n": 16, "logprobs": 20, "stream": True,
                       "ignore_eos": True}).encode()
    host, port = supervised.url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    try:
        deadline = time.monotonic() + 20
        while engine_of(supervised, "tiny")["inflight"] == 0:
            assert time.monotonic() < deadline, "the stream never started"
            time.sleep(0.1)
        deadline = time.monotonic() + 90
        while engine_of(supervised, "tiny")["inflight"]:
            assert time.monotonic() < deadline, "a client that stopped reading still holds its request"
            time.sleep(0.5)
        assert "dropped a client that stopped reading" in supervised.log()
    finally:
        sock.close()


# -- an engine that cannot start -----------------------------------------------------------------
@pytest.fixture(scope="module")
def broken(server_factory, tiny_ckpt: Path) -> Server:
    server = server_factory(tiny_ckpt, "--served-model-name", "tiny", "--engine-arg=--no-such-vllm-flag",
                            env={"EMO_ENGINE_MODE": "dedicated"})
    server.wait_until(lambda: "failed" in httpx.get(f"{server.url}/ready").text, 300, "the engine to fail")
    return server


def test_a_failed_start_shows_no_internals_and_backs_off(broken: Server) -> None:
    info = engine_of(broken, "tiny")
    assert info["state"] == "failed" and info["retry_in_seconds"] > 0
    ready = httpx.get(f"{broken.url}/ready")
    assert ready.status_code == 503
    for text in (ready.text, broken.client(API_KEY).post(
            "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2}).text):
        assert "Traceback" not in text and "no-such-vllm-flag" not in text
        assert str(broken.state_dir) not in text and "/" not in json.loads(text).get("detail", "") + \
            json.loads(text).get("error", {}).get("message", "")
    # The log tail is for admins only.
    assert_error(broken.client(API_KEY).get("/v1/engines/tiny/failure"), 401)
    failure = broken.client(ADMIN_KEY).get("/v1/engines/tiny/failure").json()
    assert "no-such-vllm-flag" in failure["detail"] and failure["failures"] >= 2


# -- hostile hosts and leaked locations ------------------------------------------------------------
@pytest.fixture(scope="module")
def keyless(server_factory, tiny_ckpt: Path) -> Server:
    return server_factory(tiny_ckpt, "--no-serve-base", "--served-model-name", "tiny", keys=False)


@pytest.mark.parametrize("host, status", [("127.0.0.1", 200), ("localhost:8000", 200), ("[::1]:8000", 200),
                                          ("attacker.example", 400), ("attacker.example:8000", 400)])
def test_a_keyless_server_answers_loopback_names_only(keyless: Server, host: str, status: int) -> None:
    r = httpx.get(f"{keyless.url}/v1/models", headers={"Host": host})
    assert r.status_code == status
    if status == 400:
        assert_error(r, 400, contains="Host header")
    assert httpx.get(f"{keyless.url}/health", headers={"Host": host}).status_code == 200  # probes


def test_a_keyed_server_answers_any_host(supervised: Server) -> None:
    r = supervised.client(API_KEY).get("/v1/models", headers={"Host": "emo.internal.example"})
    assert r.status_code == 200


@pytest.mark.parametrize("location, shown", [
    ("https://user:secret@host.example:8443/models/emo?X-Amz-Signature=abc#frag", "https://host.example:8443/models/emo"),
    ("hf://allenai/Emo_1b14b_1T", "hf://allenai/Emo_1b14b_1T"),
    ("/srv/models/emo", "/srv/models/emo"),
])
def test_model_root_carries_no_credentials(location: str, shown: str) -> None:
    assert public_location(location) == shown

