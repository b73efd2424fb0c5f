"""The README's embedding example runs as written, and the set-up commands it names exist."""
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_embedding_example_runs(default_engine, capsys):
    blocks = python_blocks()
    assert blocks, "the README has a Python example"
    exec(compile(blocks[0], "README.md", "exec"), {})  # loads its own engine (the cached default)
    out = capsys.readouterr().out
    assert "[[" in out  # option log-probs were printed


def test_setup_commands_exist():
    text = README.read_text()
    makefile = (README.parent / "Makefile").read_text()
    for cmd in ("make demo", "make test"):
        assert cmd in text
        assert f"{cmd.split()[1]}:" in makefile
    assert "make test" in (README.parent / ".ci" / "run").read_text()
