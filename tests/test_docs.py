"""The documentation: its Python examples run, the tutorial notebook runs top to bottom, and ``mkdocs build --strict``
builds the site with an API entry for every public name."""

import dataclasses
import importlib.util
import math
import os
import subprocess
import sys
import typing

import nbclient
import nbformat
import pytest

import ntkcv
from ntkcv import config
from tests.test_readme import ROOT, run_python_examples

DOCS = ROOT / "docs"
PAGES_WITH_EXAMPLES = sorted(path for path in DOCS.rglob("*.md") if "```python" in path.read_text())

# what each page's examples must have computed, beyond running
CHECKS = {
    "guide/ntk.md": lambda ns: ns["full"].shape == (8, 8, 10, 10) and ns["op"].dim == 80
    and ns["eqx_kernel"].shape == (16, 16),
    "guide/cvs.md": lambda ns: 0 < ns["cvs"]["entropy"] <= math.log(32),
    "guide/monitor.md": lambda ns: set(ns["monitor"].latest) >= {
        "cv/test/entropy", "cv/cross/test/train/target_alignment", "cv/train/eigengap"}
    and [step for step, _ in ns["logged_steps"]] == [0],
    "guide/lenses.md": lambda ns: ns["f_test"].shape == (32, 3) and "curvature/hessian_max" in ns["monitor"].latest,
}


def test_every_page_with_examples_is_checked():
    assert sorted(str(path.relative_to(DOCS)) for path in PAGES_WITH_EXAMPLES) == sorted(CHECKS)


@pytest.mark.parametrize("page", [
    pytest.param(page, marks=pytest.mark.standard_dtype_promotion) if page.name == "monitor.md" else page  # Adam
    for page in PAGES_WITH_EXAMPLES], ids=lambda path: str(path.relative_to(DOCS)))
def test_docs_python_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples write runs/
    namespace = run_python_examples(page)
    assert CHECKS[str(page.relative_to(DOCS))](namespace)


def test_docstrings_rst_markup_becomes_markdown():
    spec = importlib.util.spec_from_file_location("rst_docstrings", DOCS / "_hooks" / "rst_docstrings.py")
    extension = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(extension)
    docstring = (
        "Entropy :math:`S = -\\sum p \\ln p` of ``kernel``, see :func:`~ntkcv.cv.trace`.\n\n"
        ".. math::\n   S ≤ \\ln n\n\n"
        "Args:\n  kernel, reference: kernels,\n    same shape.\n  top_k: as :func:`spectrum`.\n\n"
        "Example::\n\n    entropy(kernel)\n"
    )
    qualify = {"ntkcv.cv.trace": "ntkcv.cv.trace", "spectrum": "ntkcv.cv.spectrum"}.get  # as in ntkcv.cv's scope
    assert extension.rst_to_markdown(docstring, resolve=qualify) == (
        "Entropy $S = -\\sum p \\ln p$ of `kernel`, see "
        '<autoref identifier="ntkcv.cv.trace" optional hover><code>trace</code></autoref>.\n\n'
        "\n$$\nS ≤ \\ln n\n$$\n\n"
        "Args:\n  kernel: kernels,\n    same shape.\n  reference: as `kernel`.\n  top_k: as "
        '<autoref identifier="ntkcv.cv.spectrum" optional hover><code>spectrum</code></autoref>.\n\n'
        "Example:\n\n    entropy(kernel)\n"
    )


def test_tutorial_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the kernel's tempfile.mkdtemp, where the tutorial's run goes
    notebook = nbformat.read(DOCS / "tutorial.ipynb", as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, when a cell fails
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    assert sum("image/png" in output.get("data", {}) for output in outputs) >= 5  # kernel, drift, layers, report ×2
    (run_dir,) = tmp_path.glob("ntkcv-tutorial-*")
    assert {"ntkcv.h5", "tensorboard", "report"} <= {path.name for path in run_dir.iterdir()}
    assert (run_dir / "report" / "curves.png").stat().st_size > 0


def test_docs_build_strict(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NTKCV_DOCS_EXECUTE": "false", "NO_MKDOCS_2_WARNING": "1"}  # the notebook runs above
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr

    for module, page in [(ntkcv, "ntkcv"), (ntkcv.cv, "cv"), (ntkcv.curvature, "curvature"),
                         (ntkcv.predict, "predict"), (ntkcv.infinite, "infinite"), (ntkcv.sinks, "sinks")]:
        html = (site / "api" / page / "index.html").read_text()
        names = [name for name in module.__all__ if f"{module.__name__}.{name}" not in sys.modules]  # not submodules
        assert [name for name in names if f'id="{module.__name__}.{name}"' not in html] == [], page

    cvs = (site / "guide" / "cvs" / "index.html").read_text()
    assert 'id="ntkcv.cv.spectral.entropy"' in cvs and '<div class="arithmatex">' in cvs  # the formulas, as math
    assert ":math:" not in cvs and ":func:" not in cvs

    reference = (site / "api" / "config" / "index.html").read_text()
    for section, section_type in typing.get_type_hints(config.RunConfig).items():
        for field in dataclasses.fields(section_type):
            assert f"<code>{section}.{field.name}</code>" in reference

    studies = sorted(path.parent.name for path in (ROOT / "experiments" / "results").glob("*/findings.md"))
    assert studies and all((site / "results" / study / "findings" / "index.html").is_file() for study in studies)
    results = (site / "results" / "index.html").read_text()
    assert results.count("<tr>") == (ROOT / "README.md").read_text().split("## Results")[1].count("\n| ")
