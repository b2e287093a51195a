import io

import numpy as np
from rich.console import Console

from ntkcv.sinks import ConsoleSink


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_plain_lines_when_not_a_terminal():
    out, clock = io.StringIO(), FakeClock()
    sink = ConsoleSink(100, console=Console(file=out), every_secs=10, clock=clock)
    sink.write_hparams({"lr": 0.1}, {"final/loss": 0.5})
    sink.write_scalars(0, {"train/loss": 1.0, "cv/entropy": 2.0, "cv/trace": 9.0})
    sink.write_scalars(1, {"train/loss": 0.9})  # within every_secs: not printed
    clock.now = 10.0
    sink.write_scalars(2, {"train/loss": 0.8})
    sink.write_arrays(2, {"cv/spectrum": np.ones(3)})  # dropped
    sink.write_scalars(3, {"train/loss": 0.7})
    sink.close()
    sink.close()
    assert out.getvalue().splitlines() == [
        "hparams: lr=0.1, final/loss=0.5",
        "step 0/100  train/loss=1  cv/entropy=2",
        "step 2/100  train/loss=0.8  cv/entropy=2",
        "step 3/100  train/loss=0.7  cv/entropy=2",  # the last one, on close
    ]


def test_default_console_survives_captured_stdout(capsys):
    with ConsoleSink(show=["train/loss"]) as sink:
        sink.write_scalars(0, {"train/loss": 0.125})
    assert capsys.readouterr().out == "step 0  train/loss=0.125\n"


def test_progress_bar_on_a_terminal():
    out = io.StringIO()
    with ConsoleSink(10, console=Console(file=out, force_terminal=True, width=150)) as sink:
        for step in range(4):
            sink.write_scalars(step, {"train/loss": 1 / (step + 1), "cv/entropy": 1.5})
        sink.flush()
    text = out.getvalue()
    assert "4/10" in text and "train/loss=0.25" in text and "cv/entropy=1.5" in text
