import numpy as np
import pytest

from ntkcv.sinks import MultiSink, Sink
from ntkcv.sinks.base import call_all, check_step


class RecordingSink(Sink):
    """A fake sink that records every call."""

    def __init__(self, fail_on_close: bool = False, fail_on_write: bool = False):
        self.calls, self.fail_on_close, self.fail_on_write = [], fail_on_close, fail_on_write

    def write_scalars(self, step, scalars):
        self.calls.append(("scalars", step, dict(scalars)))
        if self.fail_on_write:
            raise OSError("disk full")

    def write_arrays(self, step, arrays):
        self.calls.append(("arrays", step, dict(arrays)))

    def write_hparams(self, hparams, metrics=None):
        self.calls.append(("hparams", dict(hparams), metrics))

    def flush(self):
        self.calls.append(("flush",))

    def close(self):
        self.calls.append(("close",))
        if self.fail_on_close:
            raise OSError("disk gone")


def test_multisink_fans_out_every_call_in_order():
    a, b = RecordingSink(), RecordingSink()
    spectrum = np.arange(3.0)
    with MultiSink([a, b]) as sink:
        sink.write_hparams({"lr": 0.1}, {"final/loss": 0.2})
        sink.write_scalars(3, {"train/loss": 0.5})
        sink.write_arrays(3, {"cv/spectrum": spectrum})
        sink.flush()
    expected = [("hparams", {"lr": 0.1}, {"final/loss": 0.2}), ("scalars", 3, {"train/loss": 0.5}),
                ("arrays", 3, {"cv/spectrum": spectrum}), ("flush",), ("close",)]
    assert a.calls == b.calls
    assert [c[0] for c in a.calls] == [c[0] for c in expected]
    assert a.calls[:2] == expected[:2]
    assert a.calls[2][2]["cv/spectrum"] is spectrum


def test_multisink_closes_every_sink_then_raises_first_error():
    failing, fine = RecordingSink(fail_on_close=True), RecordingSink()
    with pytest.raises(OSError, match="disk gone"):
        MultiSink([failing, fine]).close()
    assert fine.calls == [("close",)]


def test_multisink_writes_to_every_sink_then_raises_first_error():
    failing, fine = RecordingSink(fail_on_write=True), RecordingSink()
    with pytest.raises(OSError, match="disk full"):
        MultiSink([failing, fine]).write_scalars(3, {"train/loss": 0.5})
    assert fine.calls == failing.calls == [("scalars", 3, {"train/loss": 0.5})]


def test_call_all_makes_every_call_then_raises_the_first_error():
    made = []

    def fail(message):
        made.append(message)
        raise ValueError(message)

    with pytest.raises(ValueError, match="first"):
        call_all([lambda: fail("first"), lambda: made.append("fine"), lambda: fail("second")])
    assert made == ["first", "fine", "second"]
    assert call_all([lambda: 1, lambda: "two"]) == [1, "two"] and call_all([]) == []


def test_sink_is_abstract():
    with pytest.raises(TypeError):
        Sink()


@pytest.mark.parametrize("step", [0, 7, np.int64(4)])
def test_check_step_accepts_non_negative_integers(step):
    assert check_step(step) == int(step) and type(check_step(step)) is int


@pytest.mark.parametrize(("step", "error"), [(-1, ValueError), (1.0, TypeError), (True, TypeError), ("3", TypeError)])
def test_check_step_rejects(step, error):
    with pytest.raises(error, match="step must be a non-negative integer"):
        check_step(step)


def test_lazy_exports():
    import ntkcv.sinks as sinks

    assert set(sinks.__all__) == {"Sink", "MultiSink", "TensorBoardSink", "HDF5Sink", "ConsoleSink", "MLflowSink",
                                  "MetricWriterSink"}
    for name in sinks.__all__:
        assert issubclass(getattr(sinks, name), Sink)
    with pytest.raises(AttributeError):
        sinks.NoSuchSink  # noqa: B018
