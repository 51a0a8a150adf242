"""`python -m bminf serve`: real server processes on 127.0.0.1 (the shipped demo checkpoints, CPU),
talked to through the official `openai` client and raw HTTP. Every answer is compared with the
model class called directly with the same arguments."""
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import pytest

openai = pytest.importorskip("openai")  # the `test` extra installs it; `server` brings FastAPI and uvicorn
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import bminf  # noqa: E402
from test_serving_engine import filled  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API_KEY = "test-key"  # the EVA server requires it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: str, *extra: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, BMINF_OFFLINE="1", PYTHONPATH=ROOT)
        # a file, not a pipe: a pipe nobody reads would block the server once it filled
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bminf", "serve", "--model", model, "--version", f"{model}-demo", "--device", "cpu",
             "--port", str(self.port), "--max-batch", "8", *extra], cwd=ROOT, env=env, stdout=self.log,
            stderr=subprocess.STDOUT, text=True)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def wait_ready(self, timeout=90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.output()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"server did not start: {self.output()}")

    def health(self) -> dict:
        with urllib.request.urlopen(self.url + "/health", timeout=10) as r:
            return json.loads(r.read())

    def client(self, key="none"):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(30)
        finally:
            self.log.close()


@pytest.fixture(scope="module")
def servers():
    started = {"cpm1": Server("cpm1"), "cpm2": Server("cpm2"), "eva": Server("eva", "--api-key", API_KEY)}
    try:
        for s in started.values():
            s.wait_ready()
        yield started
    finally:
        for s in started.values():
            s.stop()


@pytest.fixture(scope="module")
def models():
    return {"cpm1": bminf.models.CPM1(version="cpm1-demo", device="cpu"),
            "cpm2": bminf.models.CPM2(version="cpm2-demo", device="cpu"),
            "eva": bminf.models.EVA(version="eva-demo", device="cpu")}


def post(server, path, body, key=None, raw=None):
    """(status, parsed JSON) of a raw POST; ``raw`` sends those bytes as the body instead."""
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(server.url + path, data=data, method="POST",
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# ------------------------------------------------------------------------------------- answers


def test_models_and_health(servers):
    data = servers["cpm2"].client().models.list().data
    assert [(m.id, m.version) for m in data] == [("cpm2", "cpm2-demo")]
    health = servers["cpm2"].health()
    assert health["status"] == "ok" and health["model"] == "cpm2"


def test_completion_equals_generate(servers, models):
    r = servers["cpm1"].client().completions.create(model="cpm1", prompt="天空是蔚蓝色，窗外有", max_tokens=8,
                                                    temperature=0)
    text, stopped = models["cpm1"].generate("天空是蔚蓝色，窗外有", max_tokens=8, temperature=0)
    choice = r.choices[0]
    assert choice.text == text
    assert choice.finish_reason == ("stop" if stopped else "length")
    assert r.usage.prompt_tokens == len(models["cpm1"].tokenizer.encode("天空是蔚蓝色，窗外有"))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.completion_tokens <= 8


def test_sampled_completion_with_every_control_equals_generate(servers, models):
    kw = dict(max_tokens=9, temperature=0.8, top_p=0.9, frequency_penalty=0.4, presence_penalty=0.3, seed=11)
    r = servers["cpm2"].client().completions.create(model="cpm2-demo", prompt="北京环球影城", extra_body={"top_k": 50},
                                                    **kw)
    assert r.choices[0].text == models["cpm2"].generate("北京环球影城", top_n=50, **kw)[0]


def test_fill_blank_completion_is_the_filled_prompt(servers, models):
    prompt = "今天天气<span>，我们去<span>吧"
    r = servers["cpm2"].client().completions.create(model="cpm2", prompt=prompt, max_tokens=10, temperature=0)
    blanks = models["cpm2"].fill_blank(prompt, max_tokens=10, temperature=0)
    assert r.choices[0].blanks == blanks
    assert r.choices[0].text == filled(prompt, blanks)


def test_n_choices_and_prompt_lists(servers, models):
    r = servers["cpm1"].client().completions.create(model="cpm1", prompt=["北京", "今天"], n=2, max_tokens=5,
                                                    temperature=1.0, seed=4)
    got = {c.index: c.text for c in r.choices}
    m = models["cpm1"]
    assert got == {0: m.generate("北京", max_tokens=5, temperature=1.0, seed=4)[0],
                   1: m.generate("北京", max_tokens=5, temperature=1.0, seed=5)[0],
                   2: m.generate("今天", max_tokens=5, temperature=1.0, seed=4)[0],
                   3: m.generate("今天", max_tokens=5, temperature=1.0, seed=5)[0]}


def test_chat_equals_dialogue(servers, models):
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好，有什么可以帮你？"},
                {"role": "user", "content": "推荐一本书"}]
    r = servers["eva"].client(API_KEY).chat.completions.create(model="eva", messages=messages, max_tokens=8, seed=2)
    text, stopped = models["eva"].dialogue([m["content"] for m in messages], max_tokens=8, seed=2)
    assert r.choices[0].message.content == text and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == ("stop" if stopped else "length")
    assert r.object == "chat.completion"


def test_max_tokens_zero_gives_empty_text(servers):
    r = servers["cpm1"].client().completions.create(model="cpm1", prompt="北京", max_tokens=0)
    assert (r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens) == ("", "length", 0)


def test_serve_command_checks_its_flags(capsys):
    from bminf.cli import main

    assert main(["serve", "--max-batch", "0", "--version", "cpm2-demo", "--device", "cpu"]) == 1
    assert "--max-batch" in capsys.readouterr().err
    assert main(["serve", "--model", "eva", "--version", "nonsense"]) == 1
    assert "not one this model runs" in capsys.readouterr().err


def test_serve_without_cuda_graphs_builds_the_gathered_engine(monkeypatch):
    """``--no-cuda-graphs`` reaches the engine: on a GPU it would decode eagerly (slots off)."""
    import bminf.serving.app as app
    from bminf.cli import main

    made = {}

    class Stop(Exception):
        pass

    class FakeEngine:
        def __init__(self, backbone, max_batch, slots=None):
            made.update(max_batch=max_batch, slots=slots)
            raise Stop
    monkeypatch.setattr(app, "Engine", FakeEngine)
    for flags, slots in ((["--no-cuda-graphs"], False), ([], None)):
        with pytest.raises(Stop):
            main(["serve", "--model", "cpm1", "--version", "cpm1-demo", "--device", "cpu", "--max-batch", "3"] + flags)
        assert made == dict(max_batch=3, slots=slots)


def test_stop_sequences_end_the_text_before_them(servers, models):
    client, m = servers["cpm1"].client(), models["cpm1"]
    full = client.completions.create(model="cpm1", prompt="北京", max_tokens=12, temperature=0).choices[0].text
    assert len(full) >= 4, "the demo model should say something here"
    stop = full[3:5]
    r = client.completions.create(model="cpm1", prompt="北京", max_tokens=12, temperature=0, stop=[stop, "不会出现的"])
    assert r.choices[0].text == full[:full.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == m.generate("北京", max_tokens=12, temperature=0, stop_tokens=[stop, "不会出现的"])[0]


# ------------------------------------------------------------------------------------- streaming


def test_streamed_chunks_join_to_the_same_text(servers):
    client = servers["cpm2"].client()
    for prompt in ("天空是蔚蓝色，窗外有", "今天天气<span>，我们去<span>吧"):
        kw = dict(model="cpm2", prompt=prompt, max_tokens=10, temperature=0.9, seed=7)
        whole = client.completions.create(**kw).choices[0]
        chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.finish_reason
        assert chunks[-1].usage.completion_tokens > 0 and not chunks[-1].choices
    chat = servers["eva"].client(API_KEY).chat.completions
    kw = dict(model="eva", messages=[{"role": "user", "content": "你好"}], max_tokens=10, seed=1)
    whole = chat.create(**kw).choices[0].message.content
    chunks = list(chat.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole


def test_stream_is_server_sent_events_ending_with_done(servers):
    conn = http.client.HTTPConnection("127.0.0.1", servers["cpm1"].port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(dict(model="cpm1", prompt="北京", max_tokens=4, stream=True)),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
    events = [e for e in response.read().decode().split("\n\n") if e]
    conn.close()
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    assert json.loads(events[0][6:])["object"] == "text_completion"


# ------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("model, body, status, param", [
    ("cpm2", dict(model="cpm2", prompt="北京", top_p=2), 400, "top_p"),
    ("cpm2", dict(model="cpm2", prompt="北京", temperature=-1), 400, "temperature"),
    ("cpm2", dict(model="cpm2", prompt="北京", max_tokens=-3), 400, "max_tokens"),
    ("cpm2", dict(model="cpm2", prompt="北京", max_tokens=5000), 400, "max_tokens"),
    ("cpm2", dict(model="cpm2", prompt="北京", top_k=0), 400, "top_k"),
    ("cpm2", dict(model="cpm2", prompt="北京", temperature="hot"), 400, "temperature"),
    ("cpm2", dict(model="cpm2", prompt="北京", n=0), 400, "n"),
    ("cpm2", dict(model="cpm2"), 400, "prompt"),
    ("cpm2", dict(model="cpm2", prompt="   "), 400, "prompt"),
    ("cpm2", dict(model="cpm2", prompt="今天<span很好"), 400, "prompt"),
    ("cpm2", dict(model="cpm2", prompt="今天<span>很好", stop=["。"]), 400, "stop"),
    ("cpm2", dict(model="cpm2", prompt="北京", logprobs=2), 400, "logprobs"),
    ("cpm2", dict(model="cpm2", prompt="北" * 1500), 400, "prompt"),          # prompt too long
    ("cpm1", dict(model="cpm1", prompt="北京", max_tokens=600), 400, "prompt"),  # prompt + max_tokens > positions
    ("cpm2", dict(model="gpt-4", prompt="北京"), 404, "model"),
])
def test_bad_requests_get_openai_error_objects(servers, model, body, status, param):
    code, reply = post(servers[model], "/v1/completions", body)
    assert code == status
    assert set(reply) == {"error"} and set(reply["error"]) == {"message", "type", "param", "code"}
    assert reply["error"]["param"] == param
    assert param in reply["error"]["message"] or status == 404


def test_context_length_has_its_code_and_client_raises(servers):
    with pytest.raises(openai.BadRequestError) as e:
        servers["cpm2"].client().completions.create(model="cpm2", prompt="北" * 1500, max_tokens=2)
    assert e.value.status_code == 400 and e.value.code == "context_length_exceeded"


def test_wrong_endpoint_unknown_route_bad_json_and_api_key(servers):
    code, reply = post(servers["cpm2"], "/v1/chat/completions",
                       dict(model="cpm2", messages=[{"role": "user", "content": "你好"}]))
    assert code == 404 and "/v1/completions" in reply["error"]["message"]
    code, reply = post(servers["eva"], "/v1/completions", dict(model="eva", prompt="你好"), key=API_KEY)
    assert code == 404 and "/v1/chat/completions" in reply["error"]["message"]
    code, reply = post(servers["cpm2"], "/v1/embeddings", dict(model="cpm2", input="x"))
    assert code == 404 and reply["error"]["code"] == "not_found"
    code, reply = post(servers["cpm2"], "/v1/completions", None, raw=b"{not json")
    assert code == 400 and "JSON" in reply["error"]["message"]
    conn = http.client.HTTPConnection("127.0.0.1", servers["cpm2"].port, timeout=30)
    conn.putrequest("POST", "/v1/completions")  # a body announced over 1 MiB is refused before it is read
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(2 << 20))
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["code"] == "request_too_large"
    conn.close()
    # the EVA server wants its key: none or a wrong one is 401, through the client too
    chat = dict(model="eva", messages=[{"role": "user", "content": "你好"}], max_tokens=2)
    assert post(servers["eva"], "/v1/chat/completions", chat)[0] == 401
    code, reply = post(servers["eva"], "/v1/chat/completions", chat, key="wrong")
    assert code == 401 and reply["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        servers["eva"].client("wrong").models.list()
    assert post(servers["eva"], "/v1/chat/completions", chat, key=API_KEY)[0] == 200
    code, reply = post(servers["eva"], "/v1/chat/completions",
                       dict(model="eva", messages=[{"role": "user", "content": ""}]), key=API_KEY)
    assert code == 400 and reply["error"]["param"] == "messages"
    assert servers["cpm2"].health()["status"] == "ok"  # and every server is still up


# ------------------------------------------------------------------------------------- concurrency


def test_eight_concurrent_clients_each_get_what_they_get_alone(servers, models):
    cases = [dict(prompt=p, max_tokens=6 + i % 3, temperature=t, seed=i)
             for i, (p, t) in enumerate([("天空是蔚蓝色，窗外有", 0), ("北京环球影城", 0.9), ("今天天气<span>很好", 0),
                                         ("我们去<span>吧，<span>", 1.0), ("门票", 0.7), ("公园", 0),
                                         ("你好，推荐一本书", 1.1), ("<span>是蔚蓝色", 0.8)])]
    client = servers["cpm2"].client()
    barrier, results = threading.Barrier(len(cases)), {}

    def ask(i, case):
        barrier.wait()
        results[i] = client.completions.create(model="cpm2", **case).choices[0].text

    threads = [threading.Thread(target=ask, args=(i, c)) for i, c in enumerate(cases)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    m = models["cpm2"]
    expected = {}
    for i, case in enumerate(cases):
        kw = dict(max_tokens=case["max_tokens"], temperature=case["temperature"], seed=case["seed"])
        expected[i] = filled(case["prompt"], m.fill_blank(case["prompt"], **kw)) if "<span>" in case["prompt"] \
            else m.generate(case["prompt"], **kw)[0]
    assert results == expected


def _long_cpm1_request() -> dict:
    # near-uniform sampling over the vocabulary: the text runs to max_tokens whatever the weights
    return dict(model="cpm1", prompt="北京", max_tokens=200, temperature=100.0, seed=0)


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnecting_mid_generation_frees_its_slot(servers, stream):
    server = servers["cpm1"]
    steps = server.health()["steps"]
    body = json.dumps(dict(_long_cpm1_request(), stream=stream)).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    if stream:
        received = b""
        while b"data: " not in received:  # the first chunk arrived: decoding is under way
            more = sock.recv(4096)
            assert more, "the server closed the stream"
            received += more
    else:
        deadline = time.monotonic() + 30
        while not server.health()["running"] and time.monotonic() < deadline:
            time.sleep(0.01)
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    deadline = time.monotonic() + 30
    while server.health()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    health = server.health()
    assert health["running"] == 0
    assert health["steps"] - steps < 199  # it left before its 200 tokens
    r = server.client().completions.create(model="cpm1", prompt="北京", max_tokens=3)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_health_answers_during_a_long_generation(servers):
    server = servers["cpm1"]
    done = threading.Event()

    def long_request():
        try:
            server.client().completions.create(**_long_cpm1_request())
        finally:
            done.set()

    thread = threading.Thread(target=long_request)
    thread.start()
    seen = []
    while not done.is_set():
        seen.append(server.health()["running"])  # each answers while the batch decodes
        time.sleep(0.02)
    thread.join()
    assert max(seen) >= 1


def test_sigterm_drains_requests_in_flight_then_exits_cleanly(servers, models):
    """Runs last: it stops the EVA server. A request under way when SIGTERM arrives still gets its answer."""
    server, answers = servers["eva"], []
    kw = dict(model="eva", messages=[{"role": "user", "content": "推荐一本书"}], max_tokens=300, temperature=100.0,
              seed=0)
    started = threading.Event()

    def ask():
        chunks = server.client(API_KEY).chat.completions.create(stream=True, **kw)
        started.set()
        answers.append("".join(c.choices[0].delta.content or "" for c in chunks))

    thread = threading.Thread(target=ask)
    thread.start()
    assert started.wait(60)
    server.proc.terminate()  # SIGTERM while the stream is open
    thread.join(120)
    # uvicorn re-raises the signal after its graceful shutdown: the status says SIGTERM ended it
    assert server.proc.wait(60) == -signal.SIGTERM
    expected = models["eva"].dialogue(["推荐一本书"], max_tokens=300, temperature=100.0, seed=0)[0]
    assert answers == [expected]
