"""formulations/ is pure planning math: importing it must not pull in torch, zmq, the wire
libraries, or anything that reads clocks or does I/O on its own."""

import ast
import pathlib
import subprocess
import sys

FORBIDDEN = {
    "torch",
    "zmq",
    "msgspec",
    "msgpack",
    "time",
    "socket",
    "asyncio",
    "threading",
    "pickle",
}
ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_no_forbidden_imports_in_source():
    offenders = []
    for path in (ROOT / "formulations").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert not offenders, offenders


def test_importing_every_formulation_loads_no_edge_library():
    code = (
        "import sys, formulations, formulations.registry as r; r.available(); "
        "bad = [m for m in ('torch', 'zmq', 'msgspec', 'msgpack') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == ""
