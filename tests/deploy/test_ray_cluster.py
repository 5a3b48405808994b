"""`slos-serve serve --cluster ray` on a multi-node Ray cluster made on this machine (`make
test-ray`, in its own venv): worker nodes with fake GPUs, sim engines as actors, CURVE keys handed
to the actors. One run, in phases:

1. 6 replicas of 1 GPU each on two 2-GPU nodes: 4 placed (2 per node, distinct GPUs), 2 pending.
2. Closed-loop load through the OpenAI API; one node is removed mid-run: its 2 engines die, their
   requests are re-planned on the others and finish (none lost), replacements wait for resources.
3. A 4-GPU node is added: the 4 waiting replicas are placed, the planner counts 6 engines, and the
   served rate rises above phase 1's (6 replicas against 4).

The sim engines run 10x slower than real time with a planner scaled alike (`time_scale = 10`) and
the requests are long prompts (prefill-bound), so that a replica's capacity is under 1 request/s
and an open-loop load of 8 requests/s from this process overloads 6 of them on 2 cores; the
planner's admission control then serves about each replica's capacity (the rest get 429).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import pytest

# Ray's nodes on loopback (its default binds this machine's network address even for one machine).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")

from ray.cluster_utils import Cluster  # noqa: E402

from tests.e2e.serve_support import ServeProcess, wait_until_gone  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PHASE_S = 15.0
RATE_RPS = 8.0
PROMPT = list(range(1, 2001))
MAX_TOKENS = 4

DEPLOYMENT = """\
replicas = 6
cluster = "ray"
startup_timeout_s = 180

[network]
api_port = 0
engine_port = 0
client_port = 0
control_port = 0
planner_host = "127.0.0.1"
curve = "on"                 # keys handed to the actors by the launcher, even on loopback

[engine_options]
time_scale = 10.0

[ray]
address = "{address}"
num_gpus = 1
num_cpus = 0.5

[planner_config]
formulation = "slos_dp"

[planner_config.planner]
heartbeat_interval_s = 0.25
liveness = 8
"""


@dataclass
class Load:
    """Open-loop clients: requests at a steady rate, each waited for in a thread of its own."""

    client: object
    served_sent_s: list[float] = field(default_factory=list)  # when each served request was sent
    num_sent: int = 0
    num_rejected: int = 0
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def run(self) -> None:
        while not self.stop.wait(1.0 / RATE_RPS):
            thread = threading.Thread(target=self.request, daemon=True)
            thread.start()
            self.threads.append(thread)
            self.num_sent += 1

    def request(self) -> None:
        sent_s = time.monotonic()
        try:
            reply = self.client.completions.create(
                model="slos-serve",
                prompt=PROMPT,
                max_tokens=MAX_TOKENS,
                extra_body={"ignore_eos": True},
            )
        except openai.RateLimitError:  # 429: rejected at admission, an explicit answer
            self.num_rejected += 1
            return
        except Exception as exc:  # a lost request (503 "lost"), a timeout, ...
            self.failures.append(repr(exc))
            return
        if reply.usage.completion_tokens != MAX_TOKENS:
            self.failures.append(f"short reply: {reply.usage}")
        self.served_sent_s.append(sent_s)

    def rate(self, start_s: float, end_s: float) -> float:
        """Served rate of the requests sent in [start_s, end_s): admitted and finished per
        second. Counted by arrival, so that a request's latency (~10 s here: TTFT and TPOT
        targets are 10x too) does not move it into another window."""
        return sum(start_s <= t < end_s for t in self.served_sent_s) / (end_s - start_s)


def status(serve: ServeProcess) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "commands.cli", "scale", "--control", serve.control],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def num_registered(serve: ServeProcess) -> int:
    return int(re.search(r"(\d+) registered", status(serve)).group(1))


def wait_registered(serve: ServeProcess, count: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while num_registered(serve) != count:
        assert time.monotonic() < deadline, status(serve) + serve.log()
        time.sleep(0.5)


@pytest.mark.timeout(600)
def test_placement_node_loss_and_node_gain(tmp_path):
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "num_gpus": 0, "include_dashboard": False},
    )
    serve = None
    load = None
    try:
        node_a = cluster.add_node(num_cpus=4, num_gpus=2)
        node_b = cluster.add_node(num_cpus=4, num_gpus=2)
        cluster.wait_for_nodes()
        config = tmp_path / "deploy.toml"
        config.write_text(DEPLOYMENT.format(address=cluster.address))
        serve = ServeProcess(["--config", str(config)])
        serve.wait_ready(timeout_s=180)

        # 1. placement as configured
        placed = re.findall(
            r"(engine-\d+) runs on node (\w+) \(127\.0\.0\.1, pid \d+, GPUs (\d+)\)", serve.log()
        )
        assert len(placed) == 4, serve.log()
        by_node: dict[str, list[str]] = {}
        for _, node, gpu in placed:
            by_node.setdefault(node, []).append(gpu)
        assert sorted(by_node) == sorted([node_a.node_id[:8], node_b.node_id[:8]])
        assert all(sorted(gpus) == ["0", "1"] for gpus in by_node.values())
        report = status(serve)
        assert "6 wanted, 4 registered" in report and report.count(": pending") == 2, report

        # 2. load; a node is removed mid-run
        client = openai.OpenAI(base_url=f"{serve.url}/v1", api_key="unused", max_retries=0)
        load = Load(client)
        sender = threading.Thread(target=load.run, daemon=True)
        sender.start()
        time.sleep(5.0)  # warm up
        phase1 = (time.monotonic(), time.monotonic() + PHASE_S)
        time.sleep(PHASE_S)
        mark = len(serve.lines)
        cluster.remove_node(node_a, allow_graceful=False)
        serve.wait_for_line(r"is gone \(.*\); a new replica", start=mark)
        serve.wait_for_line(r"\(replica \d+\) is gone \(silent\); re-planning", start=mark)
        wait_registered(serve, 2)
        time.sleep(5.0)  # load on the two survivors

        # 3. a node is added: the waiting replicas are placed
        cluster.add_node(num_cpus=8, num_gpus=4)
        wait_registered(serve, 6, timeout_s=90)
        time.sleep(3.0)
        phase3 = (time.monotonic(), time.monotonic() + PHASE_S)
        time.sleep(PHASE_S)
        load.stop.set()
        sender.join(5)
        deadline_s = time.monotonic() + 90  # the requests in flight finish
        for thread in load.threads:
            thread.join(max(0.1, deadline_s - time.monotonic()))
        assert not any(t.is_alive() for t in load.threads), "a request never ended\n" + serve.log()
        assert load.failures == [], load.failures[:5]
        rate1, rate3 = load.rate(*phase1), load.rate(*phase3)
        print(
            f"{load.num_sent} requests sent, {len(load.served_sent_s)} served, "
            f"{load.num_rejected} rejected at admission; served rate: 4 replicas "
            f"{rate1:.2f} req/s, 6 replicas {rate3:.2f} req/s"
        )
        assert rate3 > 1.2 * rate1, (rate1, rate3)
        assert "6 wanted, 6 registered" in status(serve)
        serve.process.terminate()
        assert serve.process.wait(60) == 0, serve.log()
        assert wait_for_no_actor_processes() == [], serve.log()
    finally:
        if load is not None:
            load.stop.set()
        if serve is not None:
            serve.stop()
            (tmp_path / "serve.log").write_text(serve.log())
            print(f"serve's log: {tmp_path / 'serve.log'}")
        cluster.shutdown()
    assert wait_until_gone(serve.marker) == [], serve.log()


def wait_for_no_actor_processes(timeout_s: float = 20.0) -> list[int]:
    """Ray names an actor's worker process `ray::EngineReplica...`: none may outlive serve."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = []
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                        if b"ray::EngineReplica" in f.read():
                            left.append(int(entry.name))
                except OSError:
                    continue
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def test_a_local_ray_of_its_own_scales_and_leaves_nothing():
    """`--cluster ray` without an address: serve starts a Ray on this machine (loopback), runs
    the replicas as actors, scales them up and down at runtime, and shuts all of it down."""
    serve = ServeProcess(
        [
            "--cluster", "ray", "--replicas", "2", "--num-cpus", "0.5",
            "--port", "0", "--engine-port", "0", "--client-port", "0", "--control-port", "0",
        ]
    )  # fmt: skip
    try:
        serve.wait_ready(timeout_s=180)
        assert "Started a local Ray instance" in serve.log()
        assert len(re.findall(r"engine-\d+ runs on node \w+ \(127\.0\.0\.1", serve.log())) == 2
        client = openai.OpenAI(base_url=f"{serve.url}/v1", api_key="unused", max_retries=0)
        reply = client.completions.create(model="slos-serve", prompt=[1, 2, 3], max_tokens=5)
        assert reply.usage.completion_tokens == 5
        subprocess.run(
            [sys.executable, "-m", "commands.cli", "scale", "3", "--control", serve.control],
            check=True,
            timeout=60,
        )
        wait_registered(serve, 3)
        mark = len(serve.lines)
        subprocess.run(
            [sys.executable, "-m", "commands.cli", "scale", "1", "--control", serve.control],
            check=True,
            timeout=60,
        )
        wait_registered(serve, 1)
        serve.wait_for_line(r"engine-2 \(replica \d+\) is gone \(left: stopped\)", start=mark)
        serve.wait_for_line(r"engine-1 \(replica \d+\) is gone \(left: stopped\)", start=mark)
        serve.process.terminate()
        assert serve.process.wait(60) == 0, serve.log()
        assert wait_for_no_actor_processes() == [], serve.log()
    finally:
        serve.stop()
    assert wait_until_gone(serve.marker) == [], serve.log()
