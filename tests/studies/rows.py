"""Synthetic rows of a sweep's results table, shaped as :func:`ntkcv.sweep.read_table` returns them."""

import json


def row(*, widths=(64,), train_size=30, seed=0, loss="cross_entropy", optimizer="adam", learning_rate=1e-3,
        indices=None, status="complete", **metrics):
    """A row with the config columns the studies read and ``metrics`` as columns (``entropy_initial`` is
    written ``entropy.initial``: a double underscore or ``_initial``/``_final`` suffix becomes a dot)."""
    cells = {
        "run_id": f"run-{widths}-{train_size}-{seed}-{loss}-{optimizer}-{len(indices or ())}",
        "status": status,
        "error": None,
        "config.model.widths": json.dumps(list(widths)),
        "config.data.train_size": train_size,
        "config.data.indices": json.dumps(list(indices)) if indices is not None else None,
        "config.train.seed": seed,
        "config.train.loss": loss,
        "config.optimizer.name": optimizer,
        "config.optimizer.learning_rate": learning_rate,
    }
    for name, value in metrics.items():
        cells[name.replace("__", ".")] = value
    return cells
