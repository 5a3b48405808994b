"""What an operator mistypes or runs into gets one line on stderr and exit status 2, never a
traceback: a port already in use (ZeroMQ, metrics, HTTP), an endpoint that is not `tcp://HOST:PORT`
(a number, `http://...`), malformed or partial CURVE keys; and the Python client tolerates a second
`close()`."""

from __future__ import annotations

import socket

import pytest
import zmq

from commands.cli import main
from commands.demo import free_port
from planner_svc.client import ClientError, PlannerClient
from wire.security import make_keypair

PLANNER_TOML = """\
formulation = "vllm_fcfs"
[planner]
engine_endpoint = "{engine}"
client_endpoint = "{client}"
metrics_port = {metrics_port}
"""


def planner_config(tmp_path, engine=None, client=None, metrics_port=0):
    path = tmp_path / "planner.toml"
    path.write_text(
        PLANNER_TOML.format(
            engine=engine or f"tcp://127.0.0.1:{free_port()}",
            client=client or f"tcp://127.0.0.1:{free_port()}",
            metrics_port=metrics_port,
        )
    )
    return str(path)


def one_line_error(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert err.count("\n") == 0, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_zeromq_port_in_use(tmp_path, capsys):
    context = zmq.Context()
    busy = context.socket(zmq.ROUTER)
    port = busy.bind_to_random_port("tcp://127.0.0.1")
    try:
        config = planner_config(tmp_path, client=f"tcp://127.0.0.1:{port}")
        assert main(["planner", "--config", config]) == 2
        one_line_error(capsys, "cannot bind the client endpoint", "Address already in use")
    finally:
        busy.close(linger=0)
        context.term()


def test_metrics_port_in_use(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        config = planner_config(tmp_path, metrics_port=busy.getsockname()[1])
        assert main(["planner", "--config", config]) == 2
    one_line_error(capsys, "cannot serve metrics")


def test_api_port_in_use(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["api", "--port", str(busy.getsockname()[1])]) == 2
    one_line_error(capsys, "cannot listen on")


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["engine", "--connect", "5557"], "not a ZeroMQ endpoint"),
        (["engine", "--connect", "http://127.0.0.1:5557"], "not a ZeroMQ endpoint"),
        (["engine", "--connect", "tcp://127.0.0.1"], "not a ZeroMQ endpoint"),
        (["engine", "--connect", "tcp://*:5557"], "must connect to a host"),
        (["api", "--planner", "127.0.0.1:5558"], "not a ZeroMQ endpoint"),
        (["api", "--planner", "tcp://127.0.0.1:99999"], "out of range"),
    ],
)
def test_bad_endpoints(argv, fragment, capsys):
    assert main(argv) == 2
    one_line_error(capsys, fragment)


@pytest.mark.parametrize(
    "table, fragment",
    [
        ("engine_endpoint = 5557\n", "must be a string"),
        ('client_endpoint = "http://127.0.0.1:5558"\n', "not a ZeroMQ endpoint"),
    ],
)
def test_bad_endpoints_in_the_planner_config(tmp_path, capsys, table, fragment):
    path = tmp_path / "planner.toml"
    path.write_text(f'formulation = "vllm_fcfs"\n[planner]\n{table}')
    assert main(["planner", "--config", str(path)]) == 2
    one_line_error(capsys, fragment)


def test_malformed_and_partial_curve_keys(tmp_path, capsys):
    public, secret = make_keypair()
    server_public, _ = make_keypair()
    base = ["engine", "--connect", f"tcp://127.0.0.1:{free_port()}"]
    assert main([*base, "--curve-public-key=short", f"--curve-secret-key={secret}",
                 f"--curve-server-key={server_public}"]) == 2  # fmt: skip
    one_line_error(capsys, "40-character Z85 key")
    other_public, _ = make_keypair()
    assert main([*base, f"--curve-public-key={other_public}", f"--curve-secret-key={secret}",
                 f"--curve-server-key={server_public}"]) == 2  # fmt: skip
    one_line_error(capsys, "does not belong to the secret key")
    # keys without the planner's key used to fall back to plain text silently
    assert main([*base, f"--curve-public-key={public}", f"--curve-secret-key={secret}"]) == 2
    one_line_error(capsys, "missing --curve-server-key")
    path = tmp_path / "planner.toml"
    path.write_text(
        f'formulation = "vllm_fcfs"\n[curve]\npublic_key = "{public}"\nsecret_key = "x"\n'
    )
    assert main(["planner", "--config", str(path)]) == 2
    one_line_error(capsys, "[curve] secret key")


def test_client_close_twice_and_use_after_close():
    client = PlannerClient(f"tcp://127.0.0.1:{free_port()}")
    client.close()
    client.close()
    with pytest.raises(ClientError, match="closed"):
        client.submit(num_prompt_tokens=3, max_tokens=1)


def test_client_refuses_a_bad_endpoint_at_once():
    with pytest.raises(ValueError, match="tcp://HOST:PORT"):
        PlannerClient("localhost:5558")
