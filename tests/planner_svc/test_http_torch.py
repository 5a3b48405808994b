"""Text in, text out through the whole stack with a real model: the openai client -> HTTP server
(tokenizer from the model directory) -> planner daemon -> torch engine (a random-weight tiny model
made by `make-model`) -> tokens -> text. The generated ids are checked against plain full-sequence
greedy decoding of the raw checkpoint (tests/engine_adapters/test_torch_model.reference_logits)."""

from __future__ import annotations

import threading

import pytest

torch = pytest.importorskip("torch")

from commands.make_model import make_model  # noqa: E402
from engine_adapters.adapter import AdapterConfig, EngineAdapter  # noqa: E402
from engine_adapters.torch_engine.engine import TorchEngine  # noqa: E402
from planner_svc.client import PlannerClient  # noqa: E402
from planner_svc.http.server import ApiServer, ServerThread  # noqa: E402
from planner_svc.http.tokenizer import TextTokenizer  # noqa: E402
from tests.engine_adapters.test_torch_model import reference_logits  # noqa: E402
from tests.planner_svc.service_helpers import Service, make_config  # noqa: E402

MAX_TOKENS = 10


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    torch.set_num_threads(1)
    model_dir = tmp_path_factory.mktemp("tiny_http")
    make_model("tiny", model_dir, seed=0)
    service = Service(make_config(heartbeat_interval_s=0.1, liveness=30), num_engines=0)
    engine = TorchEngine.from_pretrained(model_dir, kv_memory_gb=0.05)
    adapter = EngineAdapter(
        engine,
        AdapterConfig(
            service.daemon.engine_endpoint,
            "torch-0",
            heartbeat_interval_s=service.daemon.config.heartbeat_interval_s,
        ),
        service.context,
    )
    thread = threading.Thread(target=adapter.run, daemon=True)
    thread.start()
    service.adapters.append(adapter)
    service._threads.append(thread)
    service.wait_for_engines(1, timeout_s=30)
    client = PlannerClient(service.daemon.client_endpoint)
    tokenizer = TextTokenizer.from_model_dir(model_dir)
    server = ServerThread(ApiServer(client, tokenizer=tokenizer))
    yield model_dir, tokenizer, server
    server.close()
    client.close()
    service.close()


def greedy_reference(model_dir, prompt_ids: list[int], num_tokens: int) -> list[int]:
    tokens = list(prompt_ids)
    for _ in range(num_tokens):
        tokens.append(int(reference_logits(model_dir, tokens)[-1].argmax()))
    return tokens[len(prompt_ids) :]


def test_chat_text_matches_greedy_reference(served):
    import openai

    model_dir, tokenizer, server = served
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "Tell me about the brastoo of flimst."}]
    prompt_ids = tokenizer.encode(tokenizer.render_chat([("user", messages[0]["content"])]))
    expected = greedy_reference(model_dir, prompt_ids, MAX_TOKENS)

    response = client.chat.completions.create(
        model="slos-serve",
        messages=messages,
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert response.choices[0].token_ids == expected
    assert response.choices[0].message.content == tokenizer.decode(expected)
    assert response.usage.prompt_tokens == len(prompt_ids)

    chunks = list(
        client.chat.completions.create(
            model="slos-serve",
            messages=messages,
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert [t for c in chunks for t in c.choices[0].token_ids] == expected
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == tokenizer.decode(expected)
