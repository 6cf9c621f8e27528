"""The web UI's trust boundary, tested as an attacker meets it: through the HTTP API of a running server
(``/gradio_api/call/<event>``), not through the page, which only shows what it may send.

One server (loopback, a free port, a login) serves every attempt; each is refused on the server, in one
line that tells nothing of the files it names, and nothing already written changes.
"""

from __future__ import annotations

import http.cookiejar
import json
import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("gradio")

from PIL import Image  # noqa: E402

from webui.form import form_fields, form_values  # noqa: E402
from webui.policy import ServerPolicy, check_host, read_auth  # noqa: E402

PROMPT = "a yellow triangle on a purple background"
SECRET = "hunter2-do-not-leak"
TIMEOUT = 120        # seconds any one request may take (a bound, not a measurement)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class Api:
    """A caller of the HTTP API (urllib only), logged in or not."""

    def __init__(self, url: str):
        self.url = url
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))

    def login(self, user: str, password: str) -> None:
        body = urllib.parse.urlencode({"username": user, "password": password}).encode()
        with self.opener.open(f"{self.url}login", body, timeout=TIMEOUT) as reply:
            assert json.load(reply) == {"success": True}

    def call(self, event: str, data: list) -> str:
        """The whole server-sent event stream of one call of *event*, as text."""
        request = urllib.request.Request(f"{self.url}gradio_api/call/{event}", json.dumps({"data": data}).encode(),
                                         {"Content-Type": "application/json"})
        with self.opener.open(request, timeout=TIMEOUT) as reply:
            event_id = json.load(reply)["event_id"]
        with self.opener.open(f"{self.url}gradio_api/call/{event}/{event_id}", timeout=TIMEOUT) as reply:
            return reply.read().decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from webui.app import build_app, launch

    root = tmp_path_factory.mktemp("server")
    out, allowed, private = root / "runs", root / "allowed", root / "private"
    for folder in (out, allowed, private):
        folder.mkdir()
    earlier = out / "20260101-000000-earlier"            # a run already in the gallery: it must not change
    earlier.mkdir()
    (earlier / "run.json").write_text(json.dumps({"prompt": "earlier", "seed": 1, "backend": "pixels"}))
    (earlier / "image.png").write_bytes(b"not really a png")
    Image.new("RGB", (64, 64), (200, 30, 30)).save(allowed / "start.png")
    (allowed / "short.yaml").write_text("iterations: 2\n")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(private / "secret.png")
    (private / "secret.yaml").write_text(f"api_token: {SECRET}\n")
    (allowed / "link.yaml").symlink_to(private / "secret.yaml")     # a way out of the allowed folder
    policy = ServerPolicy(out, allow_files=(allowed,), max_size=256, max_steps=50)
    demo = build_app(out, backend="pixels", preset="toy", policy=policy)
    port = _free_port()
    launch(demo, out=out, port=port, block=False, auth=[("ada", "lovelace")])
    try:
        yield {"url": f"http://127.0.0.1:{port}/", "out": out, "allowed": allowed, "private": private, "root": root,
               "before": _snapshot(root)}
    finally:
        demo.close()


def _form(**changes) -> list:
    """The Start event's inputs, in the page's order: every form field, 'preview every', the two uploads."""
    values = form_values("pixels", "toy")
    values.update(prompt=PROMPT, progress=False, **changes)
    return [values[f.name] for f in form_fields()] + [0, None, None]


def test_the_http_api_refuses_what_the_server_does_not_allow(server):
    anonymous = Api(server["url"])
    with pytest.raises(urllib.error.HTTPError) as refused:
        anonymous.call("start_run", _form())
    assert refused.value.code == 401                                  # no login, no run

    api = Api(server["url"])
    api.login("ada", "lovelace")
    private, root = server["private"], server["root"]
    attempts = {
        "out": (dict(out=str(root / "elsewhere")), "error: out: runs are written only under the server's output folder"),
        "init image": (dict(init_image=str(private / "secret.png")), "error: init-image: the web UI reads files only"),
        "image prompt": (dict(image_prompts=str(private / "secret.png")), "error: image-prompt: the web UI reads files"),
        "config": (dict(config=str(private / "secret.yaml")), "error: config: the web UI reads files only from"),
        "missing config": (dict(config=str(private / "no-such.yaml")), "error: config: the web UI reads files only"),
        "config by ..": (dict(config=str(server["allowed"] / ".." / "private" / "secret.yaml")),
                         "error: config: the web UI reads files only"),
        "config by a link": (dict(config=str(server["allowed"] / "link.yaml")), "error: config: the web UI reads"),
        "local model": (dict(clip=str(private)), "error: clip: '" + str(private) + "' is not a model this server"),
        "Hub model": (dict(eval_model="some-org/any-model"), "error: eval-model: 'some-org/any-model' is not a model"),
        "size": (dict(width=4096), "error: width 4096 is larger than this server allows (--max-size 256)"),
        "steps": (dict(iterations=100000), "error: iterations 100000 is more than this server allows (--max-steps 50)"),
        "cutouts": (dict(cutouts=100000, iterations=2), "error: cutouts 100000 is more than the web UI allows; give at most 128"),
    }
    for what, (changes, expected) in attempts.items():
        stream = api.call("start_run", _form(**changes))
        assert expected in stream, (what, stream)
        assert SECRET not in stream and "api_token" not in stream, what
    # the form's config box (filled on blur) reads no file outside the allowed folders either
    stream = api.call("switch", _form(config=str(private / "secret.yaml"))[:-3])
    assert "error: config: the web UI reads files only" in stream and "api_token" not in stream
    # an "upload" naming a file of the server's disk instead of an uploaded one is refused too
    forged = _form()
    forged[-2] = {"path": str(private / "secret.png"), "meta": {"_type": "gradio.FileData"}}
    stream = api.call("start_run", forged)
    assert "saved" not in stream and SECRET not in stream
    assert not (root / "elsewhere").exists()
    assert _snapshot(root) == server["before"]                        # nothing written, nothing changed

    # the same call with what the server allows runs, and writes under its folder only
    stream = api.call("switch", _form(config=str(server["allowed"] / "short.yaml"))[:-3])
    assert "error" not in stream
    stream = api.call("start_run", _form(config=str(server["allowed"] / "short.yaml"), iterations=2,   # as filled
                                         init_image=str(server["allowed"] / "start.png"), eval_model="none"))
    assert "saved" in stream and "error" not in stream, stream
    new = [p for p in server["out"].iterdir() if p.name != "20260101-000000-earlier" and p.is_dir()]
    assert len(new) == 1 and json.loads((new[0] / "run.json").read_text())["steps_done"] == 2
    after = _snapshot(root)
    assert {k: after[k] for k in server["before"]} == server["before"]


def test_host_and_login_checks(tmp_path):
    assert check_host("127.0.0.1") is None and check_host("localhost") is None
    assert "--auth" in check_host("0.0.0.0")
    with pytest.raises(ValueError, match="is not an address of this machine") as bad:
        check_host("no-such-host.invalid")
    assert "\n" not in str(bad.value)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ValueError, match=r"cannot serve on 127\.0\.0\.1:\d+ .*give another --port"):
            check_host("127.0.0.1", taken.getsockname()[1])
    (tmp_path / "users").write_text("# who may log in\nada:lovelace\n\ngrace:hop:per\n")
    assert read_auth("bob:pw", str(tmp_path / "users")) == [("bob", "pw"), ("ada", "lovelace"), ("grace", "hop:per")]
    assert read_auth() is None
    for bad_auth in ("nobody", ":pw", "bob:"):
        with pytest.raises(ValueError, match="write USER:PASS"):
            read_auth(bad_auth)


def test_app_script_says_one_line_for_a_bad_host_or_a_busy_port(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("app_script", Path(__file__).resolve().parent.parent / "scripts" / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        for argv in (["--host", "no-such-host.invalid"], ["--port", str(taken.getsockname()[1])],
                     ["--auth", "nobody"]):
            assert app.main(argv) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith("error: "), (argv, err)
