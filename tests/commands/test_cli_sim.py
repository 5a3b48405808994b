"""`slos-serve simulate` and `slos-serve capacity` through commands.cli.main: reports, files, and
one-line errors (exit 2, no traceback) for bad input."""

from __future__ import annotations

import json

import pytest

from commands.cli import main

SMALL = ["--num-requests", "20", "--seed", "1"]


def test_simulate_prints_the_report(capsys):
    assert (
        main(
            [
                "simulate",
                "--scenario",
                "chatbot",
                "--formulation",
                "vllm_fcfs",
                "--rate",
                "0.5",
                *SMALL,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "============ Serving Benchmark Result ============" in out
    assert "Successful requests:                     20" in out
    assert "chatbot / vllm_fcfs @ 0.5 req/s" in out
    class_row = next(
        line.split()
        for line in out.splitlines()
        if line.startswith("chatbot ") and len(line.split()) == 9
    )
    assert class_row[1] == "20"


def test_simulate_json_counts_tool_chains_once(capsys):
    assert (
        main(
            [
                "simulate",
                "--scenario",
                "tool_agent",
                "--formulation",
                "edf",
                "--rate",
                "0.2",
                "--json",
                *SMALL,
            ]
        )
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert data["num_items"] == 20
    assert data["num_calls"] >= 40  # every chain has at least two rounds
    assert data["simulation"]["formulation"] == "edf" and data["simulation"]["num_gpus"] == 2
    assert 0.0 <= data["attainment"] <= 1.0


def test_simulate_replays_a_user_trace(tmp_path, capsys):
    trace = tmp_path / "mine.csv"
    trace.write_text(
        "arrival_s,prompt_tokens,output_tokens,slo_class\n"
        "0.0,500,30,chatbot\n0.5,800,20,coder\n1.0,100000,5,chatbot\n"
    )
    assert main(["simulate", "--trace", str(trace), "--formulation", "sarathi", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["num_items"] == 2 and data["num_dropped"] == 1
    # An idle server meets both SLOs.
    assert data["attainment"] == 1.0


def test_simulate_with_a_profiled_perf_model_and_bursty_window(tmp_path, capsys):
    model = tmp_path / "perf_model.json"
    model.write_text(json.dumps({"name": "fitted", "lines": [[5e-5, 0.0, 0.02]]}))
    assert (
        main(
            [
                "simulate",
                "--scenario",
                "summarizer",
                "--formulation",
                "edf",
                "--rate",
                "1",
                "--perf-model",
                str(model),
                "--arrivals",
                "bursty",
                "--burst-size",
                "3",
                "--duration",
                "10",
                "--num-requests",
                "100",
                "--json",
            ]
        )
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert data["simulation"]["num_gpus"] == 1  # an unknown model runs on one GPU per replica
    assert 0 < data["num_items"] < 100  # the 10 s window holds about 10 requests


def test_capacity_writes_json_and_plot(tmp_path, capsys):
    out_dir = tmp_path / "cap"
    code = main(
        [
            "capacity",
            "--scenario",
            "summarizer",
            "--formulation",
            "vllm_fcfs",
            "--formulation",
            "edf",
            "--min-rate",
            "0.5",
            "--max-rate",
            "2",
            "--tolerance",
            "0.5",
            "--out",
            str(out_dir),
            "--no-progress",
            *SMALL,
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "vllm_fcfs" in out and "edf" in out and "req/s/GPU" in out
    data = json.loads((out_dir / "capacity_summarizer.json").read_text())
    assert [d["formulation"] for d in data] == ["vllm_fcfs", "edf"]
    for entry in data:
        assert entry["capacity_per_gpu_rps"] == pytest.approx(entry["capacity_rps"] / 2)
        seen = {p["rate_rps"]: p["attainment"] for p in entry["points"]}
        if entry["capacity_rps"] > 0:
            assert seen[entry["capacity_rps"]] >= 0.9
        if entry["failing_rate_rps"] is not None:
            assert seen[entry["failing_rate_rps"]] < 0.9
    assert (out_dir / "capacity_summarizer.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["simulate", "--scenario", "nope", "--rate", "1"], "unknown scenario 'nope'"),
        (["simulate", "--formulation", "nope", "--rate", "1"], "unknown formulation 'nope'"),
        (["simulate", "--rate", "-2"], "--rate must be a positive"),
        (["simulate"], "--rate is required"),
        (["simulate", "--rate", "1", "--num-requests", "0"], "--num-requests must be at least 1"),
        (["simulate", "--rate", "1", "--perf-model", "gpt-9"], "unknown performance model"),
        (["simulate", "--rate", "1", "--perf-model", "/nonexistent/model.json"], "does not exist"),
        (["simulate", "--trace", "/nonexistent/trace.csv"], "does not exist"),
        (["simulate", "--rate", "1", "--replicas", "0"], "replicas must be at least 1"),
        (["simulate", "--rate", "1", "--spec", "-1"], "--spec must be non-negative"),
        (["simulate", "--rate", "1", "--max-model-len", "1"], "max_model_len"),
        (["capacity", "--formulation", "nope"], "unknown formulation 'nope'"),
        (["capacity", "--target", "1.5"], "target"),
        (["capacity", "--min-rate", "-1"], "rates must satisfy"),
        (["capacity", "--scenario", "nope"], "unknown scenario"),
        (["capacity", "--seeds", "0"], "number of seeds"),
        (["simulate", "--rate", "1", "--burst-size", "0.5"], "mean_burst_size"),
        (["simulate", "--rate", "1", "--duration", "-1"], "duration must be positive"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_malformed_trace_row_names_file_and_line(tmp_path, capsys):
    trace = tmp_path / "bad.jsonl"
    good = '{"arrival_s": 0, "prompt_tokens": 10, "output_tokens": 2, "slo_class": "coder"}'
    bad = '{"arrival_s": 1, "prompt_tokens": -3, "output_tokens": 2, "slo_class": "coder"}'
    trace.write_text(good + "\n" + bad + "\n")
    assert main(["simulate", "--trace", str(trace)]) == 2
    err = capsys.readouterr().err
    assert f"{trace}:2: prompt_tokens must be an integer >= 1" in err
    assert err.count("\n") == 1


def test_capacity_of_a_user_trace(tmp_path, capsys):
    trace = tmp_path / "mine.csv"
    rows = [
        f"{0.5 * i},{300 + 37 * i},{10 + i},{'chatbot' if i % 2 else 'summarizer'}"
        for i in range(16)
    ]
    trace.write_text("arrival_s,prompt_tokens,output_tokens,slo_class\n" + "\n".join(rows) + "\n")
    out_dir = tmp_path / "cap"
    assert (
        main(
            [
                "capacity",
                "--trace",
                str(trace),
                "--formulation",
                "edf",
                "--max-rate",
                "4",
                "--tolerance",
                "1",
                "--out",
                str(out_dir),
                "--no-progress",
                "--seeds",
                "2",
            ]
        )
        == 0
    )
    data = json.loads((out_dir / "capacity_mine.json").read_text())
    assert data[0]["scenario"] == "mine" and data[0]["points"]
    assert data[0]["seeds"] == [0, 1]
    assert "edf" in capsys.readouterr().out


def test_demo_comparison_prints_table_and_reports(capsys):
    from lab.capacity import demo_comparison

    assert demo_comparison("summarizer", ("vllm_fcfs", "edf"), num_requests=30) == 0
    out = capsys.readouterr().out
    assert "req/s/GPU" in out
    assert out.count("============ Serving Benchmark Result ============") == 2


def test_simulate_is_deterministic_for_a_seed(capsys):
    argv = [
        "simulate",
        "--scenario",
        "mixed",
        "--formulation",
        "sarathi",
        "--rate",
        "1",
        "--json",
        "--num-requests",
        "25",
        "--seed",
        "3",
    ]
    reports = []
    for _ in range(2):
        assert main(argv) == 0
        data = json.loads(capsys.readouterr().out)
        data["simulation"].pop("wall_s")
        reports.append(data)
    assert reports[0] == reports[1]
    assert reports[0]["num_items"] == 25
    assert {c["slo_class"] for c in reports[0]["per_class"]} == {
        "chatbot",
        "coder",
        "summarizer",
        "reasoning",
        "tool_agent",
    }


def test_truth_options_and_refit_on_simulate_and_capacity(capsys, tmp_path):
    truth = ["--truth-context-s", "2e-7", "--truth-noise", "0.1"]
    args = ["simulate", "--scenario", "chatbot", "--rate", "2", *SMALL, *truth, "--refit", "--json"]
    assert main(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["simulation"]["truth"] == {"context_s": 2e-7, "noise": 0.1}
    (refit,) = data["simulation"]["refit"]
    assert refit["num_refits"] >= 1 and 0 <= refit["margin"] <= 0.5
    capacity = ["capacity", "--scenario", "chatbot", *SMALL, *truth, "--no-progress"]
    capacity += ["--min-rate", "1", "--max-rate", "2", "--tolerance", "0.5"]
    assert main([*capacity, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "truth +2e-07 s/context token, +-10% noise" in out


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--truth-noise", "1.5"], "--truth-noise must be in [0, 1)"),
        (["--truth-context-s", "-1"], "--truth-context-s must be >= 0"),
        (["--overrun-target", "0.2"], "--overrun-target needs --refit"),
        (["--refit", "--overrun-target", "1"], "--overrun-target must be in (0, 1)"),
    ],
)
def test_bad_truth_options_are_one_line_errors(capsys, flags, message):
    assert main(["simulate", "--scenario", "chatbot", "--rate", "1", *SMALL, *flags]) == 2
    assert message in capsys.readouterr().err
