"""TorchEngine behind the real adapter loop and wire protocol: READY carries the engine's blocks and
speculation limit, and tokens streamed in PROGRESS messages (prefill chunks, then a speculative
repeat tail) equal plain greedy decoding."""

from __future__ import annotations

import threading
import time

import pytest
import zmq

from commands.make_model import make_model
from engine_adapters.adapter import AdapterConfig, EngineAdapter
from engine_adapters.engine import EngineRequest
from engine_adapters.torch_engine.engine import TorchEngine
from formulations.plan import Step
from wire import protocol as P

torch = pytest.importorskip("torch")
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_adapter")
    make_model("tiny", out, draft=True)
    return out


class PlannerSocket:
    def __init__(self) -> None:
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind("tcp://127.0.0.1:0")
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def recv(self, timeout_s: float = 20.0):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.socket.poll(50):
                identity, *frames = self.socket.recv_multipart()
                message = P.decode(frames, P.ENGINE_TO_PLANNER)
                if not isinstance(message, P.Heartbeat):
                    return identity, message
        raise TimeoutError("no message from the engine")

    def send(self, identity, message) -> None:
        self.socket.send_multipart([identity, *P.encode(message)])

    def close(self) -> None:
        self.socket.close()
        self.context.term()


def greedy_reference(model_dir, prompt: tuple[int, ...], num_out: int) -> list[int]:
    engine = TorchEngine.from_pretrained(model_dir, num_blocks=32)
    engine.add_request(EngineRequest("a", len(prompt), num_out, prompt_token_ids=prompt))
    out = engine.execute(Step({"a": len(prompt)}), 0).new_token_ids["a"]
    while len(out) < num_out:
        out += engine.execute(Step({"a": 1}), 0).new_token_ids["a"]
    return out


def test_torch_engine_behind_the_adapter(model_dir):
    prompt = tuple(range(40, 80))
    expected = greedy_reference(model_dir, prompt, 12)
    engine = TorchEngine.from_pretrained(
        model_dir, model_dir / "draft", num_blocks=32, max_spec_tokens=3
    )
    planner = PlannerSocket()
    adapter = EngineAdapter(engine, AdapterConfig(planner.endpoint, "eng"), zmq.Context())
    thread = threading.Thread(target=adapter.run, daemon=True)
    thread.start()
    try:
        identity, ready = planner.recv()
        assert isinstance(ready, P.Ready)
        assert (ready.num_total_blocks, ready.block_size, ready.max_spec_tokens) == (32, 16, 3)
        new = P.EngineRequest(
            "a", num_prompt_tokens=40, max_new_tokens=12, prompt_token_ids=list(prompt)
        )
        steps = (Step({"a": 25}), Step({"a": 15}))
        repeat = (Step({"a": 1}, {"a": 3}),)
        planner.send(
            identity,
            P.PlanMsg(
                plan_id=0,
                start_step_id=0,
                steps=steps,
                repeat=repeat,
                new_requests=(new,),
            ),
        )
        tokens: list[int] = []
        while True:
            _, progress = planner.recv()
            assert isinstance(progress, P.StepReport) and not progress.error, progress
            tokens += progress.new_token_ids.get("a", [])
            if "a" in progress.finished:
                break
        assert tokens == expected
        assert engine.num_free_blocks == 32
    finally:
        adapter.stop()
        thread.join(10)
        planner.close()


def test_engine_command_pins_torch_threads(model_dir):
    import argparse

    from commands import engine as engine_command

    parser = argparse.ArgumentParser()
    engine_command.add_arguments(parser)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        args = parser.parse_args(
            ["--engine", "torch", "--model-dir", str(model_dir), "--num-threads", "1"]
        )
        engine = engine_command.build_engine(args)
        assert torch.get_num_threads() == 1 and engine.device.type == "cpu"
        bad = parser.parse_args(
            ["--engine", "torch", "--model-dir", str(model_dir), "--num-threads", "0"]
        )
        with pytest.raises(ValueError, match="--num-threads must be at least 1"):
            engine_command.build_engine(bad)
    finally:
        torch.set_num_threads(before)


def test_torch_demo_runs_engines_with_one_thread(model_dir):
    import argparse

    from commands.demo import _engine_args

    args = argparse.Namespace(engine="torch", model_dir=str(model_dir))
    engine_args = _engine_args(args)
    assert engine_args[engine_args.index("--num-threads") + 1] == "1"
