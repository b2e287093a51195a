"""``ntkcv report SWEEP_DIR``: the findings of the studies a sweep was run for, as figures and markdown."""

from __future__ import annotations

import importlib
import json
import pathlib
from types import ModuleType

from ntkcv.studies._findings import Findings

STUDIES: dict[str, tuple[str, ...]] = {
    "time_evolution": ("time_evolution", "weight_spectra"),
    "time_evolution_authors": ("time_evolution",),
    "weight_spectra": ("weight_spectra", "time_evolution"),
    "data_quality": ("data_quality",),
    "data_quality_authors": ("data_quality_authors",),
    "rnd_selection": ("rnd_selection",),
    "rnd_selection_authors": ("rnd_selection_authors",),
    "edge_of_stability": ("edge_of_stability",),
    "lazy_regime": ("lazy_regime",),
    "kernel_alignment": ("kernel_alignment",),
    "phase_diagram": ("phase_diagram",),
}
"""Sweep name → the studies (modules of :mod:`ntkcv.studies`) its results answer, the first the main one.

A time-evolution sweep also answers the weight-spectrum study (and the other way round): both read the same
runs."""


def study(name: str) -> ModuleType:
    """The study module ``ntkcv.studies.<name>`` (with ``analyse`` and ``figures``)."""
    if name not in {s for studies in STUDIES.values() for s in studies}:
        raise ValueError(f"unknown study {name!r}; known: {', '.join(STUDIES)}")
    return importlib.import_module(f"ntkcv.studies.{name}")


def make_sweep_report(sweep_dir: str | pathlib.Path) -> tuple[pathlib.Path, list[Findings]]:
    """Analyse the sweep in ``sweep_dir`` for each of its studies (:data:`STUDIES`, by the name in
    ``sweep.json``); write ``figures/*.png`` and ``findings.md`` there.

    Returns:
      the path of ``findings.md`` and the findings, one per study.

    Raises:
      FileNotFoundError: ``sweep_dir`` has no ``sweep.json`` or ``results.csv``.
      ValueError: the sweep's name is not a study's, or the table lacks what a study needs.
    """
    from ntkcv.sweep import read_table

    sweep_dir = pathlib.Path(sweep_dir)
    for required in ("sweep.json", "results.csv"):
        if not (sweep_dir / required).is_file():
            raise FileNotFoundError(f"{sweep_dir} has no {required}: is it a sweep folder (ntkcv sweep)?")
    name = json.loads((sweep_dir / "sweep.json").read_text())["sweep"]["name"]
    if name not in STUDIES:
        raise ValueError(f"sweep {name!r} is not one of the studies' sweeps ({', '.join(STUDIES)}); "
                         "ntkcv report makes figures and findings for those")
    rows = read_table(sweep_dir / "results.csv")
    sections, found = [f"# Findings of the `{name}` sweep", "", f"Sweep: `{sweep_dir.resolve()}`, {len(rows)} runs.",
                       ""], []
    for module in map(study, STUDIES[name]):
        study_rows = module.annotate(rows, sweep_dir) if hasattr(module, "annotate") else rows
        findings = module.analyse(study_rows)
        paths = module.figures(study_rows, sweep_dir / "figures", sweep_dir=sweep_dir)
        sections.append(findings.markdown(paths, relative_to=sweep_dir))
        found.append(findings)
    path = sweep_dir / "findings.md"
    path.write_text("\n".join(sections))
    return path, found
