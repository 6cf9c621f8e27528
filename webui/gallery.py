"""The run folders in an output folder, newest first, as the web UI's gallery lists them.

A run folder is one with a ``run.json`` (:mod:`generators.runs.outputs`), read as a typed
:class:`generators.runs.record.RunRecord`; a folder whose ``run.json`` cannot be read, or is not a run
record, is left out, never changed. Nothing here imports gradio.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from generators.runs.outputs import SIDECAR
from generators.runs.record import RunRecord


@dataclass
class RunEntry:
    """One run folder and its ``run.json``, read as a :class:`RunRecord`."""

    folder: Path
    record: RunRecord

    @classmethod
    def read(cls, folder: str | Path) -> "RunEntry":
        """The entry of run *folder*: ``FileNotFoundError`` without a ``run.json``, ``ValueError`` for one that
        is not a run record."""
        return cls(Path(folder), RunRecord.read(folder))

    @property
    def image(self) -> Path | None:
        path = self.folder / str(self.record.image or "image.png")
        return path if path.is_file() else None

    @property
    def files(self) -> list[Path]:
        """The PNG(s) and animation(s) to download."""
        names = list(self.record.images or []) + list(self.record.animations or [])
        return [self.folder / n for n in names if (self.folder / n).is_file()]

    @property
    def caption(self) -> str:
        r = self.record
        score = f"{r.clip_score:.2f}" if isinstance(r.clip_score, (int, float)) else "-"
        flag = " (interrupted)" if r.interrupted else ""
        return f"{r.prompt or ''} · seed {r.seed} · {r.backend} · score {score}{flag}"

    def describe(self) -> str:
        """Markdown: prompt, seed, backend, score, steps, then every setting of the run."""
        r = self.record
        score = r.clip_score
        lines = [f"**{r.prompt or ''}**", "",
                 f"- folder: `{self.folder}`",
                 f"- seed {r.seed} · backend {r.backend} · preset {r.preset or 'none'}",
                 f"- CLIP score {score:.4f} ({r.eval_model})" if isinstance(score, (int, float))
                 else "- CLIP score: not scored",
                 f"- {r.steps_done} steps" + (" · **interrupted**" if r.interrupted else "")
                 + (f" · {r.timings['total_s']} s" if isinstance(r.timings, dict) else ""),
                 "", "| setting | value |", "| --- | --- |"]
        settings = {**(r.settings or {}), **{f"{r.backend}.{k}": v for k, v in (r.backend_settings or {}).items()}}
        for key, value in settings.items():
            shown = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value
            lines.append(f"| {key} | {shown.replace('|', '&#124;')} |")
        return "\n".join(lines)


def list_runs(out: str | Path, limit: int = 200) -> list[RunEntry]:
    """The run folders directly under *out*, newest (by when run.json was written) first."""
    root = Path(out).expanduser()
    if not root.is_dir():
        return []
    found = []
    for sidecar in root.glob(f"*/{SIDECAR}"):
        try:
            record = RunRecord.read(sidecar)
            when = sidecar.stat().st_mtime
        except (OSError, ValueError):
            continue
        found.append((when, sidecar.parent.name, RunEntry(sidecar.parent, record)))
    found.sort(key=lambda item: (item[0], item[1]), reverse=True)
    return [entry for _, _, entry in found[:limit]]


__all__ = ["RunEntry", "list_runs"]
