"""The run folders in an output folder, newest first, as the web UI's gallery lists them.

A run folder is one with a ``run.json`` (:mod:`generators.runs.outputs`); a folder whose ``run.json`` cannot
be read is left out, never changed. Nothing here imports gradio.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from generators.runs.outputs import SIDECAR


@dataclass
class RunEntry:
    """One run folder and its ``run.json``."""

    folder: Path
    metadata: dict[str, Any]

    @property
    def image(self) -> Path | None:
        path = self.folder / str(self.metadata.get("image") or "image.png")
        return path if path.is_file() else None

    @property
    def files(self) -> list[Path]:
        """The PNG(s) and animation(s) to download."""
        names = list(self.metadata.get("images") or []) + list(self.metadata.get("animations") or [])
        return [self.folder / n for n in names if (self.folder / n).is_file()]

    @property
    def caption(self) -> str:
        m = self.metadata
        score = f"{m['clip_score']:.2f}" if isinstance(m.get("clip_score"), (int, float)) else "-"
        flag = " (interrupted)" if m.get("interrupted") else ""
        return f"{m.get('prompt', '')} · seed {m.get('seed')} · {m.get('backend')} · score {score}{flag}"

    def describe(self) -> str:
        """Markdown: prompt, seed, backend, score, steps, then every setting of the run."""
        m = self.metadata
        score = m.get("clip_score")
        lines = [f"**{m.get('prompt', '')}**", "",
                 f"- folder: `{self.folder}`",
                 f"- seed {m.get('seed')} · backend {m.get('backend')} · preset {m.get('preset') or 'none'}",
                 f"- CLIP score {score:.4f} ({m.get('eval_model')})" if isinstance(score, (int, float))
                 else "- CLIP score: not scored",
                 f"- {m.get('steps_done')} steps" + (" · **interrupted**" if m.get("interrupted") else "")
                 + (f" · {m['timings']['total_s']} s" if isinstance(m.get("timings"), dict) else ""),
                 "", "| setting | value |", "| --- | --- |"]
        settings = {**(m.get("settings") or {}), **{f"{m.get('backend')}.{k}": v
                                                     for k, v in (m.get("backend_settings") or {}).items()}}
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
            metadata = json.loads(sidecar.read_text(encoding="utf-8"))
            when = sidecar.stat().st_mtime
        except (OSError, ValueError):
            continue
        if isinstance(metadata, dict):
            found.append((when, sidecar.parent.name, RunEntry(sidecar.parent, metadata)))
    found.sort(key=lambda item: (item[0], item[1]), reverse=True)
    return [entry for _, _, entry in found[:limit]]


__all__ = ["RunEntry", "list_runs"]
