"""The status page in headless Chromium (Debian's `chromium`, which .ci/run installs), driven over
the DevTools protocol: it loads, shows a queued and a running job with the running job's cost,
refreshes without a reload, and logs no console error. The screenshot is kept in test-artifacts/.
"""
import base64
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests

from ray_apps.cluster import serve_url
from ray_apps.scheduler.api import Queue
from ray_apps.scheduler.config import QueueConfig
from ray_apps.scheduler.states import JobState
from tests.integration.conftest import QUEUE_CONFIG

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    """Headless Chromium over the DevTools protocol (websocket-client): navigate, evaluate,
    screenshot, and every console message and uncaught exception the page produced."""

    def __init__(self, profile: Path):
        import websocket

        self.proc = subprocess.Popen([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu",
                                      "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
                                      f"--user-data-dir={profile}", "--window-size=1400,1100", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            assert time.monotonic() < deadline and self.proc.poll() is None, "chromium did not start"
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        page = next(t for t in requests.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
                    if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=30, suppress_origin=True)
        self.next_id, self.events = 0, []
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                assert "error" not in msg, msg
                return msg.get("result", {})
            self.events.append(msg)

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.3)
        raise AssertionError(f"{expression} stayed falsy for {timeout} s; page: {self.evaluate('document.body.innerText')}")

    def errors(self) -> list[str]:
        out = []
        for e in self.events:
            p = e.get("params", {})
            if e.get("method") == "Runtime.exceptionThrown":
                out.append(p["exceptionDetails"].get("text", "") + str(p["exceptionDetails"].get("exception", "")))
            elif e.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(" ".join(str(a.get("value", a.get("description"))) for a in p.get("args", [])))
            elif e.get("method") == "Log.entryAdded" and p["entry"]["level"] == "error":
                out.append(p["entry"]["text"] + " " + p["entry"].get("url", ""))
        return out

    def close(self):
        self.ws.close()
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (Debian: `apt-get install chromium`; .ci/run installs it)")
def test_status_page_shows_queued_and_running_jobs_with_cost_and_refreshes_itself(platform, tmp_path):
    queue = Queue.from_settings(platform, QueueConfig(**QUEUE_CONFIG))
    running = queue.submit("probe", {"seconds": 60, "gpus_per_worker": 1, "num_workers": 1}, tenant="team-a",
                           priority="high")
    deadline = time.monotonic() + 60
    while queue.get(running.id).state is not JobState.RUNNING:
        assert time.monotonic() < deadline, queue.get(running.id)
        time.sleep(0.5)
    # Two GPUs for team-a while one is held: it waits in the queue.
    waiting = queue.submit("probe", {"seconds": 1, "gpus_per_worker": 2, "num_workers": 1}, tenant="team-a")
    browser = Browser(tmp_path / "profile")
    try:
        browser.call("Page.navigate", url=f"{serve_url(platform)}/status#token=token-a")
        row = f'document.querySelector(\'#running tr[data-job="{running.id}"]\')'
        text = browser.wait_for(f"{row} && {row}.innerText")
        assert "team-a" in text and "high" in text and "$0.0" in text  # the live cost so far
        assert browser.wait_for(f"document.querySelector('#queued tr[data-job=\"{waiting.id}\"]') !== null")
        assert "tenant team-a" in browser.evaluate("document.getElementById('updated').innerText")
        # It refreshes in place: the same document (a marker survives), a newer timestamp.
        browser.evaluate("window.__stillHere = true")
        before = browser.evaluate("document.getElementById('updated').innerText")
        browser.wait_for(f"document.getElementById('updated').innerText !== {json.dumps(before)}", timeout=15)
        assert browser.evaluate("window.__stillHere") is True
        links = browser.evaluate(f"[...{row}.querySelectorAll('a')].map(a => a.href)")
        assert any(f"/#/jobs/{queue.get(running.id).ray_submission_id}" in h for h in links), links
        ARTIFACTS.mkdir(exist_ok=True)
        shot = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
        (ARTIFACTS / "status-page.png").write_bytes(shot)
        assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 10_000
        assert browser.errors() == []
    finally:
        browser.close()
        for job in (running, waiting):
            queue.cancel(job.id)
        deadline = time.monotonic() + 90  # leave the shared platform's GPUs free for the next test
        while not all(queue.get(j.id).state.is_terminal() for j in (running, waiting)):
            assert time.monotonic() < deadline, [queue.get(j.id).state for j in (running, waiting)]
            time.sleep(0.5)


def test_status_data_needs_a_token_when_tenants_are_configured(platform):
    assert requests.get(f"{serve_url(platform)}/v1/status", timeout=30).status_code == 401
    page = requests.get(f"{serve_url(platform)}/status", timeout=30)
    assert page.status_code == 200 and "/v1/status" in page.text  # the page itself holds no data
