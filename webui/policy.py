"""What a caller of the web UI may set: the server decides, not the page.

The page only shows what it may send; anyone who reaches the server can call its HTTP API
(``/gradio_api/call/start_run``) with any values. :class:`ServerPolicy` checks every run's options on
the server before anything is read or loaded:

- runs are written only under the server's output folder (``--out``); another ``out`` is refused;
- files (``--init-image``, ``--image-prompt``, ``--config``) are read only from the folders given with
  ``--allow-files`` (none by default), checked on the resolved path before the file is opened, so a
  refusal says nothing of whether the file exists or what it holds;
- models come only from the defaults, the presets and ``--allow-models`` (Hub ids, names or folders);
- sizes and step counts are capped (``--max-size``, ``--max-steps``), and cutouts and images per run
  (:data:`BATCH_CAPS`);
- the gallery's Resume / Reuse act only on run folders directly under the output folder;
- uploads (init image, image prompts, a PNG or run.json to reuse settings from) are at most
  :data:`MAX_UPLOAD_BYTES` each (gradio refuses larger ones first, :meth:`ServerPolicy.check_upload` again);
  an uploaded input is copied into the run folder it is used by (``generate(keep_inputs=True)``), and only
  the files uploaded for a run are readable by it besides the ``--allow-files`` folders.

Also the server's start-up checks: :func:`check_host` (an address of this machine; a warning when it
is not the loopback address) and :func:`read_auth` (``--auth USER:PASS`` or ``--auth-file``).
Nothing here imports gradio.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from generators.runs.outputs import SIDECAR
from generators.runs.paths import FILE, local_path, path_options, references, values

#: options that count steps, capped by --max-steps
STEP_OPTIONS = ("iterations", "steps", "render_steps", "reapply_steps", "budget", "backward_steps")
#: options that set an image side in pixels, capped by --max-size
SIZE_OPTIONS = ("width", "height")
DEFAULT_MAX_SIZE = 1024
DEFAULT_MAX_STEPS = 1000
#: batch-like options and the most a caller may ask for (each multiplies a step's memory)
BATCH_CAPS = {"cutouts": 128, "num_images": 8}
#: the largest upload the web UI takes
MAX_UPLOAD_BYTES = 20 * 1024 * 1024


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def _inside(path: Path, folders) -> bool:
    return any(path == folder or path.is_relative_to(folder) for folder in folders)


def _server_models() -> tuple[set[str], set[Path]]:
    """Model references the server itself would use: every model option's default and every preset's."""
    from generators import backend_names, get_generator_class
    from generators.runs.options import option_specs
    from generators.runs.presets import get_preset, preset_names

    kinds = path_options()
    specs = option_specs()
    ids: set[str] = set()
    for name, kind in kinds.items():
        if kind != FILE:
            for owner in specs[name].owners:
                ids.update(values(specs[name].default_for(owner)))
    folders: set[Path] = set()
    for backend in backend_names():
        try:
            get_generator_class(backend)
        except Exception:           # a backend that cannot import has no preset to allow
            continue
        for preset in preset_names():
            try:
                options = get_preset(preset, backend=backend)
            except (OSError, ValueError):      # e.g. the toy weights are missing: nothing to allow
                continue
            for _, kind, ref, path in references(options, kinds):
                if kind != FILE:
                    ids.add(ref)
                    if path is not None:
                        folders.add(_resolved(path))
    from guidance.build import DEFAULT_EVAL, DEFAULT_EVAL_ALT

    ids.update({DEFAULT_EVAL, DEFAULT_EVAL_ALT})       # what eval_model "auto" picks
    return ids, folders


@dataclass
class ServerPolicy:
    """The web UI server's limits (see the module docstring); ``out`` and the folders are resolved once."""

    out: Path
    allow_files: tuple[Path, ...] = ()
    allow_models: tuple[str, ...] = ()
    max_size: int = DEFAULT_MAX_SIZE
    max_steps: int = DEFAULT_MAX_STEPS
    model_ids: set[str] = field(default_factory=set, repr=False)
    model_folders: tuple[Path, ...] = field(default=(), repr=False)

    def __post_init__(self):
        self.out = _resolved(self.out)
        self.allow_files = tuple(_resolved(p) for p in self.allow_files)
        for folder in self.allow_files:
            if not folder.is_dir():
                raise ValueError(f"--allow-files {str(folder)!r} is not a folder; give folders whose files the UI "
                                 "may read")
        ids, folders = _server_models()
        for entry in self.allow_models:
            path = local_path(entry)
            if path is not None:
                folders.add(_resolved(path))
            else:
                ids.add(entry)
        self.model_ids, self.model_folders = ids, tuple(sorted(folders))
        if self.max_size < 8 or self.max_steps < 1:
            raise ValueError("--max-size must be at least 8 and --max-steps at least 1")

    # -- files -----------------------------------------------------------------------------------
    def check_file(self, path: str, what: str) -> None:
        """Refuse a file outside the --allow-files folders (before it is opened: nothing of it is told)."""
        if not self.allow_files or not _inside(_resolved(path), self.allow_files):
            where = "the folders this server allows (--allow-files)" if self.allow_files else \
                "no folder: the server was started without --allow-files"
            raise ValueError(f"{what}: the web UI reads files only from {where}; put the file there or ask "
                             "whoever runs the server")

    def check_upload(self, path: Any, what: str) -> Path:
        """An uploaded file (a path gradio gave the server), at most :data:`MAX_UPLOAD_BYTES`."""
        upload = _resolved(str(path))
        if not upload.is_file():
            raise ValueError(f"{what}: the upload is gone; upload the file again")
        if upload.stat().st_size > MAX_UPLOAD_BYTES:
            raise ValueError(f"{what}: the file is larger than the web UI takes ({MAX_UPLOAD_BYTES // 2**20} MiB); "
                             "upload a smaller one")
        return upload

    def check_config(self, config: Any) -> None:
        if config:
            self.check_file(str(config), "config")

    # -- run options -----------------------------------------------------------------------------
    def check_run(self, options: Mapping[str, Any], uploads: tuple[Path, ...] = ()) -> dict[str, Any]:
        """*options* (``generate()`` keywords from the form) checked; returned with ``out`` set to the
        server's folder. One-line ``ValueError`` for anything the server does not allow. *uploads* (checked
        with :meth:`check_upload`) are files this run may read besides the ``--allow-files`` folders."""
        from generators.runs.options import resolve_options

        options = dict(options)
        if options.get("resume") is not None:
            raise ValueError("resume: use the gallery's Resume button")
        given_out = options.get("out")
        if given_out not in (None, "") and _resolved(str(given_out)) != self.out:
            raise ValueError("out: runs are written only under the server's output folder (set when the server "
                             "starts, with --out); it cannot be changed from the web UI")
        self.check_config(options.get("config"))
        rest = {k: v for k, v in options.items() if k not in ("backend", "preset", "config")}
        backend, merged, provenance = resolve_options(rest.pop("prompt", None), backend=options.get("backend"),
                                                      preset=options.get("preset"), config=options.get("config"),
                                                      **rest)
        sources = provenance["sources"]
        if sources.get("out", "default") != "default" and _resolved(str(merged["out"])) != self.out:
            raise ValueError("out: runs are written only under the server's output folder; the config file "
                             "cannot change it")
        for name, kind, ref, path in references(merged, path_options(backend)):
            if kind == FILE:
                if _resolved(path) not in uploads:
                    self.check_file(path, name.replace("_", "-").rstrip("s"))
            elif ref not in self.model_ids and (path is None or not _inside(_resolved(path), self.model_folders)):
                raise ValueError(f"{name.replace('_', '-')}: {ref!r} is not a model this server offers (its presets "
                                 "and the models given with --allow-models); choose one of those")
        for name in SIZE_OPTIONS:
            if isinstance(merged.get(name), int) and merged[name] > self.max_size:
                raise ValueError(f"{name} {merged[name]} is larger than this server allows (--max-size "
                                 f"{self.max_size}); give at most {self.max_size}")
        for name in STEP_OPTIONS:
            if isinstance(merged.get(name), int) and merged[name] > self.max_steps:
                raise ValueError(f"{name.replace('_', '-')} {merged[name]} is more than this server allows "
                                 f"(--max-steps {self.max_steps}); give at most {self.max_steps}")
        for name, cap in BATCH_CAPS.items():
            if isinstance(merged.get(name), int) and merged[name] > cap:
                raise ValueError(f"{name.replace('_', '-')} {merged[name]} is more than the web UI allows; give at "
                                 f"most {cap} (the command line has no such cap)")
        options["out"] = str(self.out)
        return options

    def run_folder(self, folder: Any) -> Path:
        """A gallery folder: a run folder directly under the output folder, else a one-line error."""
        path = _resolved(str(folder or ""))
        if not folder or path.parent != self.out or not (path / SIDECAR).is_file():
            raise ValueError("not a run of this server's gallery; select a run in the gallery")
        return path


# -- start-up --------------------------------------------------------------------------------------
def check_host(host: str, port: int | None = None) -> str | None:
    """One-line ``ValueError`` for an address this machine cannot serve on, or a port in use; else the
    warning to print (``None`` for the loopback address)."""
    try:
        infos = socket.getaddrinfo(host, port or 0, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as err:
        raise ValueError(f"--host {host!r} is not an address of this machine ({err.__class__.__name__}); give "
                         "127.0.0.1 (this machine only) or 0.0.0.0 (every network interface)") from None
    if port:
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as probe:
            try:
                probe.bind(address)
            except OSError as err:
                raise ValueError(f"cannot serve on {host}:{port} ({err.strerror or err}); give another --port, or "
                                 "none for the next free one") from None
    if all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos):
        return None
    return (f"--host {host} serves the web UI beyond this machine: anyone who reaches it can run jobs and see the "
            "gallery; protect it with --auth USER:PASS or --auth-file FILE (see README, Security)")


def read_auth(auth: str | None = None, auth_file: str | None = None) -> list[tuple[str, str]] | None:
    """Gradio's ``auth`` from ``--auth USER:PASS`` and/or ``--auth-file FILE`` (one USER:PASS a line;
    blank lines and ``#`` comments skipped); ``None`` when neither is given."""
    entries: list[tuple[str, str]] = []
    lines: list[tuple[str, str]] = []
    if auth is not None:
        lines.append(("--auth", auth))
    if auth_file is not None:
        try:
            text = Path(auth_file).expanduser().read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"--auth-file {auth_file!r} is not readable ({err.__class__.__name__}); give a text "
                             "file of USER:PASS lines") from None
        lines += [(f"--auth-file line {n}", line.strip()) for n, line in enumerate(text.splitlines(), 1)
                  if line.strip() and not line.strip().startswith("#")]
        if not lines:
            raise ValueError(f"--auth-file {auth_file!r} has no USER:PASS line")
    for where, line in lines:
        user, sep, password = line.partition(":")
        if not sep or not user.strip() or not password:
            raise ValueError(f"{where}: write USER:PASS (a user name, a colon, a password)")
        entries.append((user.strip(), password))
    return entries or None


__all__ = ["DEFAULT_MAX_SIZE", "DEFAULT_MAX_STEPS", "MAX_UPLOAD_BYTES", "ServerPolicy", "check_host", "read_auth"]
