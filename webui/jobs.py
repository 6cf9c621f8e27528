"""One run of :func:`generators.runs.session.generate` in a worker thread, reporting its steps as it goes.

The web UI holds no generation logic: a :class:`Job` calls the Python API with a step callback that
keeps the loss and its parts and, every ``preview_every`` steps, the current image; :meth:`Job.stop`
sets the ``stop`` event of ``generate``, which ends the run exactly as Ctrl-C does (the current image
is saved, marked ``interrupted``). Nothing here imports gradio.
"""

from __future__ import annotations

import queue
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

from guidance.errors import USER_ERRORS

#: the errors ``scripts/generate.py`` reports as one line ("error: ..."), exit code 2


@dataclass
class Step:
    """What the UI learns after a step: ``image`` is set every ``preview_every`` steps (and at the first)."""

    step: int
    total: int
    loss: float | None
    parts: dict[str, float]
    seconds: float                      # since the first step ended (model loading excluded)
    image: Any = None                   # a PIL image


@dataclass
class Job:
    """``generate(**options)`` in a worker thread; read :meth:`updates` for its steps and its end.
    ``preview_every=0`` previews about 25 images over the run."""

    options: dict[str, Any]
    preview_every: int = 1
    steps: list[Step] = field(default_factory=list)
    run: Any = None                     # the generators.runs.session.Run once finished
    error: str | None = None            # the one-line error, as the CLI prints it
    warnings: list = field(default_factory=list)   # warnings.WarningMessage of the run, as they come
    started: float = 0.0

    def __post_init__(self):
        self._events: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="clipsteer-run", daemon=True)
        self._first: float | None = None

    def start(self) -> Job:
        self.started = time.perf_counter()
        self._thread.start()
        return self

    def stop(self) -> None:
        """End the run at its next step, as Ctrl-C does (saved, marked interrupted)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def warning_lines(self) -> list[str]:
        """The run's warnings to the user (``UserWarning``: options that do nothing...) as the CLI prints
        them (``warning: ...``), each once; libraries' deprecation notices are left out."""
        return list(dict.fromkeys(f"warning: {w.message}" for w in list(self.warnings)
                                  if issubclass(w.category, UserWarning)))

    @property
    def done(self) -> bool:
        return self.run is not None or self.error is not None

    def _step(self, info) -> None:
        from generators.runs.outputs import to_pil

        now = time.perf_counter()
        if self._first is None:
            self._first = now
            if self.preview_every <= 0:
                self.preview_every = max(1, info.total // 25)
        loss = float(info.loss) if info.loss is not None else None
        parts = {name: float(value.detach().float().mean()) for name, value in (info.parts or {}).items()}
        done = info.step + 1
        image = None
        if info.step == 0 or done % self.preview_every == 0 or done == info.total:
            image = to_pil(info.decode()[:1])[0]
        self._events.put(Step(info.step, info.total, loss, parts, now - self._first, image))

    def _work(self) -> None:
        from generators.runs.session import generate

        try:
            # the run's warnings, as the CLI prints them (one job runs at a time, so one catcher at a time)
            with warnings.catch_warnings(record=True) as caught:
                self.warnings = caught
                self.run = generate(**self.options, callback=self._step, stop=self._stop)
        except KeyboardInterrupt:
            self.error = "stopped before the first step; nothing saved"
        except USER_ERRORS as err:
            self.error = f"error: {err}"
        except Exception as err:        # shown in the page; the server keeps serving
            self.error = f"error: {err.__class__.__name__}: {err}"
        finally:
            self._events.put(None)

    def updates(self, interval: float = 0.1):
        """Yield the list of steps that arrived since the last yield (at most every *interval* seconds,
        at least one step each) until the run ends; :attr:`run` or :attr:`error` is then set."""
        while True:
            batch, finished = [], False
            try:
                item = self._events.get(timeout=interval)
                while True:
                    if item is None:
                        finished = True
                        break
                    batch.append(item)
                    item = self._events.get_nowait()
            except queue.Empty:
                pass
            self.steps.extend(batch)
            if batch:
                yield batch
            if finished:
                return


def eta(steps: list[Step]) -> tuple[float | None, float | None]:
    """(seconds per step, seconds left) from the steps so far (``None`` before the second step)."""
    if len(steps) < 2:
        return None, None
    last = steps[-1]
    per_step = last.seconds / last.step if last.step else None
    if per_step is None:
        return None, None
    return per_step, per_step * max(0, last.total - last.step - 1)


__all__ = ["Job", "Step", "eta"]
