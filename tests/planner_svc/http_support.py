"""Shared pieces of the HTTP front door tests: a planner daemon with simulated engines in threads
(their token ids inside a small locally trained tokenizer's vocabulary, so that output text is
real text), the HTTP server on a loopback port, and the official openai client pointed at it."""

from __future__ import annotations

import time
from pathlib import Path

import openai

from engine_adapters.sim_engine import SimEngine
from engine_adapters.torch_engine.tokenizer import save_tokenizer, train_tokenizer
from formulations.perf_model import Line, PerfModel
from planner_svc.client import PlannerClient
from planner_svc.http.api_config import ApiConfig
from planner_svc.http.server import ApiServer, ServerThread
from planner_svc.http.tokenizer import TextTokenizer
from tests.planner_svc.service_helpers import FAST_MODEL, Service, make_config

VOCAB_SIZE = 512
MAX_MODEL_LEN = 1024
# 50 ms per token of prefill: a 100-token prompt needs 5 s, so a 200 ms TTFT target is impossible.
SLOW_MODEL = PerfModel((Line(5e-2, 0.0, 0.005),), "slow-test")


def make_model_dir(path: Path) -> Path:
    """tokenizer.json (+ config files) the way `slos-serve make-model` writes them, trained on a
    smaller corpus to stay fast."""
    path.mkdir(parents=True, exist_ok=True)
    save_tokenizer(train_tokenizer(VOCAB_SIZE, seed=0, num_lines=2000), path, MAX_MODEL_LEN)
    return path


class VocabService(Service):
    """`Service` whose simulated engines emit ids within VOCAB_SIZE, with a chosen perf model."""

    def __init__(self, config=None, num_engines: int = 2, perf_model: PerfModel = FAST_MODEL):
        self.perf_model = perf_model
        super().__init__(config, num_engines)

    def make_engine(self, num_blocks: int) -> SimEngine:
        return SimEngine(
            self.perf_model,
            num_blocks,
            clock=time.monotonic,
            sleep=time.sleep,
            emit_token_ids=True,
            advertised_perf_model=self.perf_model,
            vocab_size=VOCAB_SIZE,
        )


class Stack:
    """Planner daemon + engines + PlannerClient + HTTP server; `close()` stops everything."""

    def __init__(
        self,
        model_dir: Path | None,
        api_config: ApiConfig | None = None,
        perf_model: PerfModel = FAST_MODEL,
        num_engines: int = 2,
        **planner,
    ) -> None:
        # A busy shared test machine can starve engine threads for a while: be patient with them
        # (3 s of silence) so that a slow moment does not turn into "no engine is connected".
        planner = {"heartbeat_interval_s": 0.1, "liveness": 30, **planner}
        config = make_config(**planner)
        self.service = VocabService(config, num_engines, perf_model)
        self.service.wait_for_engines(num_engines)
        self.client = PlannerClient(self.service.daemon.client_endpoint)
        self.tokenizer = TextTokenizer.from_model_dir(model_dir) if model_dir else None
        self.api = ApiServer(self.client, api_config or ApiConfig(), self.tokenizer)
        self.server = ServerThread(self.api)

    @property
    def url(self) -> str:
        return self.server.url

    def openai(self, api_key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=20.0
        )

    def tracked(self, request_id: str):
        return self.service.daemon.requests[request_id]

    def close(self) -> None:
        self.server.close()
        self.client.close()
        self.service.close()
