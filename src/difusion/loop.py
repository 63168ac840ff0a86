"""The bookkeeping around every trainer's step: what ends a run early (`Stop`: its budget,
SIGINT or SIGTERM) and `TrainLoop` (the step, the progress bar, the log's running means, the
non-finite-loss guard)."""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .runs import NonFiniteLoss, Run

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stop:
    """What ends a run before its last step: its wall-clock budget (`minutes` from this
    object's creation) is spent, or SIGINT or SIGTERM came while `catching_signals()`.
    `reserve` (seconds) is kept back from the budget for what the run does after its last
    step (its final checkpoint and pictures), so that the budget covers all of the run."""

    def __init__(self, minutes: float | None) -> None:
        self.minutes = minutes
        self.start = time.monotonic()
        self.signal: int | None = None
        self.reserve = 0.0

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def requested(self) -> bool:
        over_time = self.minutes is not None and self.elapsed() + self.reserve > self.minutes * 60
        return over_time or self.signal is not None

    @contextmanager
    def catching_signals(self) -> Iterator[None]:
        """SIGINT and SIGTERM only note that the run must stop (it saves, then ends with
        `end_if_signalled`); a second one acts as it did before, and one the process ignores
        stays ignored. Main thread only."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
        previous = {s: h for s, h in previous.items() if h is not signal.SIG_IGN}

        def restore() -> None:
            for s, handler in previous.items():
                signal.signal(s, signal.SIG_DFL if handler is None else handler)

        def note(signum: int, frame: Any) -> None:
            self.signal = signum
            restore()

        for s in previous:
            signal.signal(s, note)
        try:
            yield
        finally:
            restore()

    def end_if_signalled(self, run: Run, step: int, report: bool = True) -> None:
        """After the run saved: say where and at which step, then end as the signal asks
        (SIGINT: KeyboardInterrupt, exit status 130; SIGTERM: exit status 143)."""
        if self.signal is None:
            return
        if report:
            print(
                f"{signal.Signals(self.signal).name}: stopped at step {step}; model and training "
                f"state saved in {run.dir} (continue with --resume)",
                file=sys.stderr,
                flush=True,
            )
        if self.signal == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + self.signal)


class TrainLoop:
    """The bookkeeping around every trainer's step (diffusion, GAN, VAE): the step and
    `stop` (minutes budget, signals), the progress bar, the `on_step` callback, the log of
    running means every `log_every` steps and at the last step, and the last checkpointed
    step for the non-finite-loss stop.

    Under torchrun, `agree` turns each process's wish to stop into one decision for all of
    them and `reduce` averages the logged means over the processes; both talk to the other
    processes, so they run every `log_every` steps, not every step. Scalars passed to
    `advance` as tensors stay on their device until a log line (or `verify`) needs them:
    the loop never waits for the accelerator between log lines."""

    def __init__(
        self,
        run: Run,
        step: int,
        steps: int,
        stop: Stop,
        log_every: int,
        progress: bool,
        on_step: Callable[[int, dict], None] | None = None,
        write_log: bool = True,
        agree: Callable[[bool], bool] | None = None,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.run, self.step, self.steps, self.stop = run, step, steps, stop
        self.log_every, self.on_step, self.write_log = log_every, on_step, write_log
        self.agree, self.reduce = agree, reduce
        self.saved_step = step
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=steps, initial=step, unit="step", dynamic_ncols=True)
        self.last_log_time = time.monotonic()
        self.last_log_step = step
        self.sums: dict[str, float | torch.Tensor] = {}
        self.count = 0
        self.lr = 0.0
        self.first_bad: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def running(self) -> bool:
        """Steps are left, and neither the budget nor a signal stops the run."""
        if self.step >= self.steps:
            return False
        stop = self.stop.requested()
        if self.agree is None:
            return not stop
        if self.step % self.log_every and not self.stop.signal:
            return True  # the processes agree every log_every steps (or at a signal)
        return not self.agree(stop)

    def elapsed(self) -> float:
        return self.stop.elapsed()

    def check_finite(self, what: str, value: torch.Tensor, step: int | None = None) -> None:
        """Stop a run whose loss is no longer finite; saved files stay as they are."""
        if torch.isfinite(value):
            return
        self.close(verify=False)
        kept = (
            f"the last good checkpoint (step {self.saved_step}) is kept in {self.run.dir}"
            if self.saved_step
            else "nothing was saved"
        )
        raise NonFiniteLoss(
            f"{what} became {value.item()} at step {step or self.step + 1}; stopping: {kept}"
        )

    def watch(self, what: str, value: torch.Tensor) -> None:
        """Note, on the value's device, the first step at which `value` is not finite."""
        bad = ~torch.isfinite(value.detach())
        if what not in self.first_bad:
            self.first_bad[what] = (
                torch.zeros((), dtype=torch.long, device=value.device),
                torch.zeros((), device=value.device),
            )
        step, seen = self.first_bad[what]
        new = bad & (step == 0)
        self.first_bad[what] = (
            torch.where(new, self.step, step),
            torch.where(new, value.detach().float(), seen),
        )

    def verify(self) -> None:
        """Stop (as `check_finite` does) if a watched value was not finite at some step:
        call it before a checkpoint, so none holds the weights of a step that went wrong."""
        bad = [(int(step), what, value) for what, (step, value) in self.first_bad.items()]
        bad = [b for b in bad if b[0]]
        if bad:
            step, what, value = min(bad, key=lambda b: b[0])  # the first to go, whichever
            self.check_finite(what, value, step)

    def advance(self, record: dict[str, float | torch.Tensor], lr: float) -> None:
        """One step done: `record` holds its scalars (the first one is shown on the bar).
        Tensor scalars are watched for non-finite values and summed where they are."""
        self.step += 1
        self.lr = lr
        record = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in record.items()}
        for k, v in record.items():
            if isinstance(v, torch.Tensor):
                self.watch(k, v)
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1
        if self.on_step is not None:  # (a float of a tensor that needs grad: torch warns)
            self.on_step(self.step, {k: float(v) for k, v in record.items()})
        if self.bar is not None:
            self.bar.update(1)
        if self.step % self.log_every == 0 or self.step == self.steps:
            self.log()

    def log(self, verify: bool = True) -> None:
        """The means of the steps since the last log line, as a log line (if there are any)."""
        if not self.count:
            return
        if verify:
            self.verify()
        now = time.monotonic()
        rate = (self.step - self.last_log_step) / max(now - self.last_log_time, 1e-9)
        names = list(self.sums)
        means = torch.tensor([float(self.sums[k]) for k in names]) / self.count
        if self.reduce is not None:
            means = self.reduce(means)
        record = dict(zip(names, means.tolist(), strict=True))
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4f}" for k, v in list(record.items())[:2]})
        if self.write_log:
            self.run.append_log({"step": self.step, **record, "lr": self.lr, "steps_per_s": rate})
        self.last_log_time, self.last_log_step = now, self.step
        self.sums, self.count = {}, 0

    def due(self, every: int) -> bool:
        return self.step % every == 0

    def verify_before(self, *every: int) -> None:
        """`verify` at a step where any of these intervals (a checkpoint's, a sample grid's)
        falls due: nothing is saved from weights gone wrong. Under torchrun every process calls
        it, so that all of them stop together."""
        if any(self.due(e) for e in every):
            self.verify()

    def close(self, verify: bool = True) -> None:
        """The last step's log line (a run may stop between log steps), the bar closed."""
        self.log(verify)
        if self.bar is not None:
            self.bar.close()
