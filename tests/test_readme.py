"""The README's Python examples run as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples write runs/
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks
    namespace: dict = {}
    exec(compile("\n".join(blocks), str(README), "exec"), namespace)
    assert namespace["full"].shape == (8, 8, 10, 10)


def test_readme_opens_with_the_two_setup_commands():
    commands = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    assert commands[0].strip().endswith("ntkcv train")
    assert commands[1].strip().endswith("python -m pytest -q")
