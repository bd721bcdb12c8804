"""The documentation is true: the Python examples of README.md and docs/format.md run as written (their
asserts hold), the README's ``ckpt`` commands work, and docs/format.md lists the fields ckpt writes."""
from __future__ import annotations

import ast
import importlib.util
import json
import re
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest

import ckpt
from ckpt import cli
from ckpt import format as fmt

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", REPO / "docs" / "format.md"]
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def code_blocks(path: Path, language: str) -> list[tuple[int, str]]:
    """(first line number, code) of each fenced block of ``language`` in ``path``."""
    text = path.read_text()
    return [(text.count("\n", 0, m.start(2)) + 1, m.group(2)) for m in _FENCE.finditer(text) if m.group(1) == language]


PYTHON_BLOCKS = [(doc, line, code) for doc in DOCS for line, code in code_blocks(doc, "python")]


def test_the_documents_have_python_examples():
    assert len([b for b in PYTHON_BLOCKS if b[0].name == "README.md"]) >= 6
    assert len([b for b in PYTHON_BLOCKS if b[0].name == "format.md"]) == 1


@pytest.mark.parametrize("doc, line, code", PYTHON_BLOCKS,
                         ids=[f"{doc.name}:{line}" for doc, line, _ in PYTHON_BLOCKS])
def test_documented_python_example_runs_and_its_asserts_hold(doc, line, code, tmp_path, monkeypatch):
    if "orbax" in code and importlib.util.find_spec("orbax") is None:
        pytest.skip("needs orbax-checkpoint (installed by `make test` with the bench extra)")
    monkeypatch.chdir(tmp_path)
    # Padding keeps the document's line numbers in tracebacks.
    exec(compile("\n" * (line - 1) + code, str(doc), "exec"), {"__name__": f"example_{line}"})


def test_the_readme_ckpt_commands_work_as_documented(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with ckpt.Checkpointer("runs/exp1") as ckptr:
        for step in (100, 200):
            ckptr.save(step, {"w": np.ones(3)}, force=True, metrics={"loss": 0.5})
    (block,) = [code for _, code in code_blocks(REPO / "README.md", "") if code.startswith("ckpt ")]
    for command in block.splitlines():
        argv = [a for a in shlex.split(command.split("#")[0])[1:] if a != "[STEP]"]
        assert cli.main(argv) == 0, command
        out = capsys.readouterr().out
        assert "100" in out and "200" in out or "step 200" in out, (command, out)


def _documented_fields(section: str) -> set[str]:
    """The first-column names of the field table under the heading ``section`` in docs/format.md."""
    text = (REPO / "docs" / "format.md").read_text()
    body = text.split(f"### {section}\n", 1)[1].split("\n#", 1)[0]
    return {name for row in re.findall(r"^\| (.+?) \|", body, re.M) for name in re.findall(r"`(\w+)`", row)}


def test_format_doc_lists_exactly_the_manifest_fields(tmp_path):
    ckpt.save(tmp_path / "c", {"w": np.ones(3)})
    manifest = json.loads((tmp_path / "c" / fmt.MANIFEST).read_text())
    assert _documented_fields("manifest.json") == set(manifest)


def test_format_doc_lists_every_leaf_field(tmp_path):
    jax = pytest.importorskip("jax")
    state = {"small": np.ones(3), "large": np.ones((600, 600)), "n": 1, "key": jax.random.key(0)}
    ckpt.save(tmp_path / "c", state)
    leaves = json.loads((tmp_path / "c" / fmt.TREE).read_text())["checkpointables"]["state"]["leaves"]
    written = {*leaves, *(field for more in leaves["more"] if more for field in more)} - {"more"}  # a column of fields
    assert written <= _documented_fields("tree.json")


# ------------------------------------------------------------------------------- make demo
@pytest.fixture(scope="module")
def demo():
    """examples/demo.py as a module (registered while the tests use it, as dataclasses need)."""
    spec = importlib.util.spec_from_file_location("ckpt_demo", REPO / "examples" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def _options_of(script: Path) -> set[str]:
    """The option strings a script's argparse accepts (its add_argument calls)."""
    tree = ast.parse(script.read_text())
    return {arg.value for node in ast.walk(tree) if isinstance(node, ast.Call)
            and getattr(node.func, "attr", "") == "add_argument"
            for arg in node.args if isinstance(arg, ast.Constant) and str(arg.value).startswith("--")}


def test_the_demo_passes_only_options_the_examples_accept(demo):
    for example in demo.EXAMPLES:
        used = {a for a in example.command(Path("d"))[2:] if a.startswith("--")}
        assert used <= _options_of(REPO / "examples" / example.script), example.script


_TRAINER = """
import sys, time
import numpy as np
from ckpt.training import Checkpointer
with Checkpointer(sys.argv[1]) as ckptr:
    for step in range(1, int(sys.argv[2]) + 1):
        ckptr.save(step, {"w": np.full(3, step)}, force=True, metrics={"loss": 1.0 / step})
        time.sleep(0.02)
"""


def test_demo_run_kills_the_training_once_a_step_is_committed(tmp_path, demo):
    script = tmp_path / "train.py"
    script.write_text(_TRAINER)
    directory = tmp_path / "run"
    latest = demo.run([sys.executable, str(script), str(directory), "1000"], kill_at_step=5, directory=directory)
    assert 5 <= latest < 1000 and demo.committed_steps(directory)[-1] == latest
    assert list(demo.history(directory))[-1] == latest


def test_demo_run_fails_when_the_training_ends_before_the_kill(tmp_path, demo):
    script = tmp_path / "train.py"
    script.write_text(_TRAINER)
    with pytest.raises(SystemExit, match="finished before step 50 was committed"):
        demo.run([sys.executable, str(script), str(tmp_path / "run"), "3"], kill_at_step=50, directory=tmp_path / "run")


def test_demo_compares_final_values_bit_for_bit(tmp_path, demo):
    for name, last in (("a", 1.0), ("b", 1.0), ("c", np.nextafter(1.0, 2.0))):
        ckpt.save(tmp_path / name / "3", {"w": np.array([0.5, last])})
    assert demo.same_values(tmp_path / "a", tmp_path / "b", "state") == (True, 1)
    assert demo.same_values(tmp_path / "a", tmp_path / "c", "state") == (False, 1)


def test_the_readme_code_map_names_every_core_module():
    (layout,) = [code for _, code in code_blocks(REPO / "README.md", "") if code.startswith("ckpt/training.py")]
    modules = {str(p.relative_to(REPO)) for p in (REPO / "ckpt").rglob("*.py")
               if p.name != "__init__.py" and p.parent.name not in ("policies", "integrations")}
    assert {m for m in modules if m not in layout} == set()
