"""`slos-serve serve` end to end, as a user runs it: the official openai client gets completions,
a killed engine child is restarted and its requests finish, `scale` and the watched config change
the replica count, SIGTERM (and a SIGKILL of serve) leave no process behind, a part that cannot
start fails serve with a one-line error."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.e2e.serve_support import ServeProcess, wait_until_gone

pytestmark = pytest.mark.slow
openai = pytest.importorskip("openai")

FREE_PORTS = ["--port", "0", "--engine-port", "0", "--client-port", "0", "--control-port", "0"]


def ports_free(*ports: int) -> bool:
    for port in ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def scale_cli(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "commands.cli", "scale", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_no_arguments_serves_the_openai_client_restarts_a_killed_engine_and_stops_clean():
    # With no arguments when the default ports are free (another test run may hold them).
    defaults = ports_free(8000, 5557, 5558, 5559)
    serve = ServeProcess([] if defaults else FREE_PORTS)
    try:
        serve.wait_ready()
        assert serve.url == "http://127.0.0.1:8000" or not defaults
        client = openai.OpenAI(base_url=f"{serve.url}/v1", api_key="unused", max_retries=0)
        reply = client.completions.create(model="slos-serve", prompt=[1, 2, 3, 4], max_tokens=8)
        assert len(reply.choices[0].token_ids) == 8 and reply.usage.completion_tokens == 8

        def long_request(i: int):
            return client.completions.create(
                model="slos-serve", prompt=list(range(1, 50 + i)), max_tokens=150
            )

        victim = serve.pid_of("engine-0")
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(long_request, i) for i in range(6)]
            time.sleep(1.5)  # the requests are running on both engines
            os.kill(victim, signal.SIGKILL)
            replies = [f.result(timeout=120) for f in futures]
        for reply in replies:
            assert reply.usage.completion_tokens == 150, reply
            assert len(reply.choices[0].token_ids) == 150
        serve.wait_for_line(r"engine-0 exited with status -9; restarting")
        serve.wait_for_line(r"engine engine-0\.1 ready as replica")
        serve.wait_for_line(r"engine engine-0 \(replica \d+\) is gone \(silent\)")
        assert serve.pid_of("engine-0") != victim

        serve.process.send_signal(signal.SIGTERM)
        assert serve.process.wait(30) == 0, serve.log()
    finally:
        serve.stop()
    assert wait_until_gone(serve.marker) == [], serve.log()


def test_scale_and_the_watched_config_change_the_replicas_and_a_killed_serve_leaves_nothing(
    tmp_path,
):
    config = tmp_path / "deploy.toml"
    text = (
        "replicas = {n}\n"
        "[network]\napi_port = 0\nengine_port = 0\nclient_port = 0\ncontrol_port = 0\n"
        '[planner_config]\nformulation = "slos_dp"\n'
    )
    config.write_text(text.format(n=1))
    serve = ServeProcess(["--config", str(config)])
    try:
        serve.wait_ready()
        assert "1 wanted, 1 registered" in scale_cli("--control", serve.control)
        mark = len(serve.lines)
        config.write_text(text.format(n=3))
        serve.wait_for_line(r"scaling from 1 to 3 replica", start=mark)
        serve.wait_for_line(r"engine engine-2 ready as replica", start=mark)
        out = scale_cli("2", "--control", serve.control, "--wait-s", "30")
        assert "2 wanted, 2 registered" in out and "engine-2" not in out
        serve.wait_for_line(r"engine-2 \(replica \d+\) is gone \(left: stopped\)", start=mark)
        serve.process.kill()  # SIGKILL: no cleanup code of serve runs
        serve.process.wait(10)
    finally:
        serve.stop()
    assert wait_until_gone(serve.marker) == [], serve.log()


def test_a_part_that_cannot_start_fails_serve_with_one_line_and_leaves_nothing():
    serve = ServeProcess([*FREE_PORTS, "--formulation", "no_such_formulation"])
    try:
        assert serve.process.wait(60) == 2
    finally:
        serve.stop()
    serve._reader.join(5)
    last = serve.lines[-1]
    assert last.startswith("slos-serve serve: error: planner exited with status"), serve.log()
    assert wait_until_gone(serve.marker) == [], serve.log()


def test_bad_flags_are_one_line_errors_before_anything_starts(tmp_path):
    cases = [
        (["--engine", "torch", "--model-dir", str(tmp_path / "missing")], "does not exist"),
        (["--engine-option", "bogus=1"], "unknown key(s) bogus"),
        (["--replicas", "0"], "replicas must be an integer >= 1"),
    ]
    for args, message in cases:
        done = subprocess.run(
            [sys.executable, "-m", "commands.cli", "serve", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1


def test_engine_torch_serves_a_real_model_as_text(tmp_path):
    pytest.importorskip("torch")
    from commands.make_model import make_model

    model_dir = tmp_path / "tiny"
    make_model("tiny", model_dir, seed=0)
    serve = ServeProcess(
        [
            *FREE_PORTS,
            "--engine", "torch",
            "--model-dir", str(model_dir),
            "--replicas", "1",
            "--engine-option", "kv_memory_gb=0.05",
        ],
        env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    try:
        serve.wait_ready(timeout_s=180)
        assert 'model "tiny"' in serve.log() and "no tokenizer" not in serve.log()
        client = openai.OpenAI(base_url=f"{serve.url}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hello there"}],
            max_tokens=6,
            extra_body={"ignore_eos": True},
        )
        assert reply.usage.completion_tokens == 6 and reply.choices[0].message.content
        serve.process.send_signal(signal.SIGTERM)
        assert serve.process.wait(30) == 0, serve.log()
    finally:
        serve.stop()
    assert wait_until_gone(serve.marker) == [], serve.log()


def test_curve_on_hands_the_keys_to_the_children_through_the_environment():
    serve = ServeProcess([*FREE_PORTS, "--curve", "on", "--replicas", "1"])
    try:
        serve.wait_ready()
        client = openai.OpenAI(base_url=f"{serve.url}/v1", api_key="unused", max_retries=0)
        reply = client.completions.create(model="slos-serve", prompt=[1, 2, 3], max_tokens=4)
        assert reply.usage.completion_tokens == 4  # through CURVE: api -> planner <- engine
        from planner_svc.client import PlannerClient

        with PlannerClient(serve.planner) as plain, pytest.raises(Exception):  # noqa: B017
            plain.stats(timeout_s=2.0)  # a client without the keys gets nothing
        for pid in [serve.pid_of("planner"), serve.pid_of("engine-0"), serve.pid_of("api")]:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                assert b"curve" not in f.read()  # no key on a command line
        with open(f"/proc/{serve.pid_of('engine-0')}/environ", "rb") as f:
            assert b"SLOS_SERVE_CURVE_SECRET_KEY=" in f.read()
        serve.process.send_signal(signal.SIGTERM)
        assert serve.process.wait(30) == 0, serve.log()
    finally:
        serve.stop()
    assert wait_until_gone(serve.marker) == [], serve.log()


def test_a_control_port_in_use_is_a_one_line_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["--port", "0", "--engine-port", "0", "--client-port", "0"]
        done = subprocess.run(
            [sys.executable, "-m", "commands.cli", "serve", *args, "--control-port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 2 and "cannot listen on the control port" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
