"""The live side of a run: the step callback (progress bar, frames, reward scores, the user's callback) and the
Ctrl-C / SIGTERM handling that keeps the current image."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Callable

import torch

from ..base import StepInfo


class Progress:
    """Step callback for the run: tqdm bar (loss shown every few steps), frames, the user's callback."""

    def __init__(self, *, enabled: bool, save_every: int, frames_dir: Path | None, user: Callable | None,
                 refresh: int = 10):
        self.enabled, self.save_every, self.frames_dir, self.user = enabled, save_every, frames_dir, user
        self.refresh = refresh
        self.bar = None
        self.frames: list = []
        self.last: StepInfo | None = None
        self.reward_steps: list[dict] = []
        self.runs, self.image = 1, 0          # images run one after another (a seed each), and which one this is

    def reward_log(self) -> dict[str, list[float | None]]:
        """``{reward label: [mean score at each step]}`` for the rewards of the objective."""
        names = list(dict.fromkeys(k for step in self.reward_steps for k in step))
        out = {}
        for name in names:
            values = [float(step[name]) if name in step else None for step in self.reward_steps]
            out[name] = [v if v is not None and math.isfinite(v) else None for v in values]
        return out

    def __call__(self, info: StepInfo):
        self.last = info
        rewards = {k[:-len("/score")]: v for k, v in (info.parts or {}).items() if k.endswith("/score")}
        if rewards:  # per-step reward scores, kept on the device; read once at the end (no sync per step)
            self.reward_steps.append({k: v.detach().float().mean() for k, v in rewards.items()})
        if self.enabled:
            if self.bar is None:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=info.total * self.runs, initial=info.step, unit="step", dynamic_ncols=True,
                                leave=None, file=sys.stderr)
            self.bar.update(1)
            done = info.step + 1
            if info.loss is not None and (done % self.refresh == 0 or done == info.total):
                shown = {"loss": f"{float(info.loss):.4f}"}                     # the only host sync
                shown.update({k: f"{float(v):.4g}" for k, v in (self.reward_steps[-1] if self.reward_steps
                                                                 and self.reward_steps[-1] is not None else {}).items()})
                self.bar.set_postfix(shown, refresh=False)
        if self.save_every and (info.step + 1) % self.save_every == 0 and self.image == 0:   # the first image's
            self.keep_frame(info.decode(), info.step + 1)
        if self.user is not None:
            return self.user(info)
        return None

    def keep_frame(self, images: torch.Tensor, step: int) -> None:
        from .outputs import frame_name, save_png, to_pil

        frame = to_pil(images[:1])[0]
        self.frames.append(frame)
        if self.frames_dir is not None:
            self.frames_dir.mkdir(exist_ok=True)
            save_png(frame, self.frames_dir / frame_name(step), text={"step": str(step)})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class CtrlC:
    """Ctrl-C (and SIGTERM: ``docker stop``, Slurm preemption, ``timeout``) handling for a whole run: the
    first signal raises ``KeyboardInterrupt`` (the backend keeps its current image, and its checkpoint);
    later ones are only remembered, so scoring and writing the run always finish (people press it twice).
    Main thread only; elsewhere Python's default handling stays."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __enter__(self):
        import signal
        import threading

        self.pressed, self.again, self._previous = False, False, {}
        if threading.current_thread() is not threading.main_thread():
            return self
        for name in self.SIGNALS:
            signum = getattr(signal, name, None)
            # (a process started with the signal ignored, e.g. SIGINT in the background of a script, keeps
            # ignoring it)
            if signum is not None and signal.getsignal(signum) is not signal.SIG_IGN:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        if not self.pressed:
            self.pressed = True
            raise KeyboardInterrupt
        self.again = True
        print("\nstopping again: finishing writing the run first", file=sys.stderr)

    def __exit__(self, *exc):
        import signal

        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        return False
