"""SIGINT/SIGTERM during training: held to the end of the step or checkpoint save under way,
then ``Stopped`` (gn_det.train.stopping), in one process and agreed between processes. Real
signals, sent with os.kill; detectron2's real SimpleTrainer, gn_det's SafeCheckpointer. The
end-to-end cases (train_net's one line, exit status, exact resume after SIGTERM) are in
test_reliability.py."""
import json
import os
import signal
import time

import pytest
import torch
import torch.multiprocessing as mp
from detectron2.engine import HookBase, SimpleTrainer

from gn_det.train.checkpoint import SafeCheckpointer, atomic_write
from gn_det.train.stopping import REPEAT_WINDOW_S, StopAtStepEnd, Stopped, stop_on_signals


class Recorder(HookBase):
    """Registered after StopAtStepEnd: which steps reached the hooks after it."""

    def __init__(self):
        self.after = []

    def after_step(self):
        self.after.append(self.trainer.iter)


class SignalInHook(HookBase):
    """Sends ``sig`` to its own process in after_step of step ``at`` (outside the step)."""

    def __init__(self, at, sig=signal.SIGTERM):
        self.at, self.sig = at, sig

    def after_step(self):
        if self.trainer.iter == self.at:
            os.kill(os.getpid(), self.sig)


def send(signals):
    """Each of ``signals`` to this process, in order; a float in the list waits that many seconds."""
    for sig in signals:
        if isinstance(sig, float):
            time.sleep(sig)
        else:
            os.kill(os.getpid(), sig)  # delivered here, in the main thread, at the next bytecode


LATER = REPEAT_WINDOW_S + 0.2  # a pause after which the same signal again is a second request


class SignalledTrainer(SimpleTrainer):
    """A trainer of a linear model whose step ``at`` sends ``signals`` to its own process in
    the middle of the step (after the forward, before the optimizer step; see ``send``)."""

    def __init__(self, at, signals):
        model = torch.nn.Linear(4, 1)
        data = iter(lambda: torch.randn(2, 4), None)  # endless
        super().__init__(model, data, torch.optim.SGD(model.parameters(), lr=0.1))
        self.at, self.signals, self.finished = at, signals, []

    def run_step(self):
        loss = self.model(next(self._data_loader_iter)).square().mean()
        if self.iter == self.at:
            send(self.signals)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.finished.append(self.iter)


@pytest.fixture
def signal_handlers():
    """stop_on_signals() for the test; the previous handlers back afterwards."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    stop_on_signals()
    yield
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def train(trainer, *hooks):
    trainer.register_hooks([StopAtStepEnd(), *hooks])
    with pytest.raises(Stopped) as stopped:
        trainer.train(0, 100)
    return stopped.value


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_a_step_stops_training_when_the_step_ends(signal_handlers, sig):
    trainer, recorder = SignalledTrainer(at=3, signals=[sig]), Recorder()
    stopped = train(trainer, recorder)
    assert stopped.signum == sig and isinstance(stopped, KeyboardInterrupt)
    assert trainer.finished == [0, 1, 2, 3]  # step 3 ran to its end (its optimizer step) after the signal
    assert recorder.after == [0, 1, 2]  # the hooks after StopAtStepEnd (checkpoints, evaluation) skip step 3
    assert trainer.iter == 3


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_during_a_step_stops_at_once(signal_handlers, second):
    trainer = SignalledTrainer(at=2, signals=[signal.SIGTERM, LATER, second])
    stopped = train(trainer)
    assert stopped.signum == second
    assert trainer.finished == [0, 1]  # step 2 did not reach its end
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN  # and a third signal cannot interrupt the stop


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_the_same_signal_twice_at_once_is_one_request(signal_handlers, sig):
    """A terminal's Ctrl-C reaches a distributed run's worker directly and again through
    train_net's parent (which forwards it); a scheduler may signal every process and the
    launcher, which forwards it too: the copy must not stop the step at once. Another signal
    at once is a second request."""
    trainer = SignalledTrainer(at=2, signals=[sig, sig, sig])
    assert train(trainer).signum == sig and trainer.finished == [0, 1, 2]  # step 2 ran to its end
    other = signal.SIGTERM if sig == signal.SIGINT else signal.SIGINT
    stop_on_signals()
    trainer = SignalledTrainer(at=2, signals=[sig, other])
    assert train(trainer).signum == other and trainer.finished == [0, 1]


def test_a_signal_outside_a_step_stops_at_once(signal_handlers):
    with pytest.raises(Stopped):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(10**6):  # the handler runs at one of these bytecodes
            pass


def test_without_stop_on_signals_the_hook_does_nothing():
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)  # a handler of the user's own
    try:
        trainer = SignalledTrainer(at=1, signals=[signal.SIGTERM])
        trainer.register_hooks([StopAtStepEnd()])
        trainer.train(0, 4)
        assert trainer.finished == [0, 1, 2, 3]
    finally:
        signal.signal(signal.SIGTERM, previous)


class SignalledWrites:
    """An object in a checkpoint whose pickling (inside torch.save, mid-file) sends signals."""

    def __init__(self, signals):
        self.signals = signals

    def __reduce__(self):
        send(self.signals)
        return (int, (0,))


def test_a_signal_during_a_checkpoint_save_stops_once_the_file_and_its_pointer_are_written(signal_handlers, tmp_path):
    checkpointer = SafeCheckpointer(torch.nn.Linear(2, 2), save_dir=str(tmp_path))
    checkpointer.save("model_0000001", iteration=1)
    with pytest.raises(Stopped):
        checkpointer.save("model_0000003", iteration=3, during=SignalledWrites([signal.SIGTERM]))
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000003.pth"
    assert torch.load(tmp_path / "model_0000003.pth", weights_only=False)["iteration"] == 3  # complete (our own file)
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth", "model_0000003.pth"]


def test_a_second_signal_during_a_save_stops_at_once_leaving_the_previous_checkpoint(signal_handlers, tmp_path):
    checkpointer = SafeCheckpointer(torch.nn.Linear(2, 2), save_dir=str(tmp_path))
    checkpointer.save("model_0000001", iteration=1)
    with pytest.raises(Stopped):
        checkpointer.save("model_0000003", iteration=3, during=SignalledWrites([signal.SIGTERM, LATER, signal.SIGTERM]))
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]  # no .tmp


def test_an_interrupted_write_that_fails_while_closing_raises_the_interruption(tmp_path):
    # torch's zip writer interrupted mid-record raises a RuntimeError ("unexpected pos") from its
    # __exit__ while the KeyboardInterrupt propagates: the stop must not turn into that error.
    class ZipLike:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            raise RuntimeError("unexpected pos 17186560 vs 17186448")

    def write(f):
        with ZipLike():
            f.write(b"half")
            raise Stopped(signal.SIGTERM)

    with pytest.raises(Stopped):
        atomic_write(str(tmp_path / "model.pth"), write)
    assert os.listdir(tmp_path) == []


def _rank_process(rank, world, init_file, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = {}
    # "step": rank 0 alone is signalled, during step 2; "hook": rank 1 alone, after step 2's end
    # (where an evaluation or a save would run).
    for case, trainer, hooks in [("step", SignalledTrainer(at=2 if rank == 0 else -1, signals=[signal.SIGTERM]), []),
                                 ("hook", SignalledTrainer(at=-1, signals=[]), [SignalInHook(2)] if rank == 1 else [])]:
        stop_on_signals()
        trainer.register_hooks([StopAtStepEnd(), *hooks])
        try:
            trainer.train(0, 100)
            results[case] = {"stopped": None}
        except Stopped as stopped:
            results[case] = {"stopped": stopped.signum}
        results[case]["finished"] = trainer.finished
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    torch.distributed.destroy_process_group()


def test_processes_stop_after_the_same_step_when_one_is_signalled(tmp_path):
    mp.start_processes(_rank_process, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    assert ranks[0]["step"] == ranks[1]["step"] == {"stopped": signal.SIGTERM, "finished": [0, 1, 2]}
    # outside a step, held to the next step's end: both processes run step 3, then stop
    assert ranks[0]["hook"] == ranks[1]["hook"] == {"stopped": signal.SIGTERM, "finished": [0, 1, 2, 3]}
