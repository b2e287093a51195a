"""The README's Python example runs as written, its links resolve, and it opens with the two set-up commands."""

import math
import pathlib
import re

import numpy as np
import pytest

from ntkcv.report import read_scalars

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def run_python_examples(path: pathlib.Path) -> dict:
    """Execute the ```python blocks of a markdown file in order, in one namespace, in the current directory; returns
    the namespace. Each block keeps its line numbers, so a traceback points into the file."""
    text = path.read_text()
    source = []
    for match in re.finditer(r"```python\n(.*?)```", text, re.S):
        first_line = text.count("\n", 0, match.start(1))
        source.append("\n" * (first_line - sum(block.count("\n") for block in source)) + match[1])
    assert source, f"{path} has no python examples"
    namespace: dict = {}
    exec(compile("".join(source), str(path), "exec"), namespace)
    return namespace


@pytest.mark.standard_dtype_promotion
def test_readme_python_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the example writes runs/
    namespace = run_python_examples(README)
    assert namespace["kernel"].shape == (64, 64)
    latest = namespace["monitor"].latest
    assert 0 < latest["cv/entropy"] <= math.log(64)
    assert latest["cv/relative_distance"] > 0  # the kernel moved during training
    steps, entropy = read_scalars(tmp_path / "runs/example.h5")["cv/entropy"]  # read back as the README says
    np.testing.assert_array_equal(steps, np.arange(0, 200, 20))
    assert entropy[-1] == np.float32(latest["cv/entropy"])


def test_readme_links_resolve():
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text())
    local = [target for target in targets if "://" not in target]
    assert any(target.startswith("docs/") for target in local)
    assert [target for target in local if not (ROOT / target).exists()] == []


def test_readme_opens_with_the_two_setup_commands():
    commands = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    assert commands[0].strip().endswith("ntkcv train")
    assert commands[1].strip().endswith("python -m pytest -q")
