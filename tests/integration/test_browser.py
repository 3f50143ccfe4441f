"""The chat example in a real browser: Debian's headless Chromium (chromium +
chromium-driver, installed by .ci/run), several pages on several uvicorn workers.

Every page sees every message once, in the order each sender sent them, whichever
worker served the sender and the receiver. A screenshot is saved
(``build/chat-example.png``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
DRIVER = "/usr/bin/chromedriver"
SHOT = ROOT / "build" / "chat-example.png"

pytestmark = pytest.mark.slow


def _need_browser() -> None:
    missing = [p for p in (CHROMIUM, DRIVER) if not os.path.exists(p)]
    if not missing:
        return
    why = f"{', '.join(missing)} missing (apt-get install chromium chromium-driver)"
    if os.environ.get("CI"):
        pytest.fail(f"the browser test needs Chromium: {why}", pytrace=False)
    pytest.skip(why)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def chat_site(ns_prefix: str) -> Iterator[str]:
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "examples/chat/run.py"),
            "--workers",
            "3",
            "--port",
            str(port),
            "--prefix",
            ns_prefix,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert "open http://" in line, line
        yield f"http://127.0.0.1:{port}/chat/lobby/"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        if proc.stdout:
            proc.stdout.close()


def _browser() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=900,700",
    ):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(DRIVER), options=opts)


def test_chat_in_headless_chromium_every_page_sees_every_message_once_in_order(
    chat_site: str,
) -> None:
    _need_browser()
    from selenium.webdriver.common.by import By

    driver = _browser()
    try:
        pids: list[int] = []
        handles: list[str] = []
        # pages until they are served by at least two workers (the kernel spreads the
        # connections over the workers' shared listening socket)
        for i in range(8):
            if i:
                driver.switch_to.new_window("tab")
            driver.get(chat_site)
            deadline = time.monotonic() + 15
            pid = None
            while pid is None and time.monotonic() < deadline:
                pid = driver.execute_script("return window.chatPid;")
                time.sleep(0.05)
            assert pid, "the page's WebSocket did not connect"
            pids.append(pid)
            handles.append(driver.current_window_handle)
            if i >= 2 and len(set(pids)) >= 2:
                break
        assert len(set(pids)) >= 2, f"all pages on one worker: {pids}"
        n = 5
        for k, h in enumerate(handles):
            driver.switch_to.window(h)
            box = driver.find_element(By.ID, "chat-message-input")
            for j in range(n):
                box.send_keys(f"page{k}-msg{j}")
                driver.find_element(By.ID, "chat-message-submit").click()
        want = len(handles) * n
        for h in handles:
            driver.switch_to.window(h)
            deadline = time.monotonic() + 15
            got: list[str] = []
            while time.monotonic() < deadline:
                got = driver.execute_script("return window.chatMessages;")
                if len(got) >= want:
                    break
                time.sleep(0.05)
            time.sleep(0.2)
            got = driver.execute_script("return window.chatMessages;")
            assert len(got) == want and len(set(got)) == want, got  # all, once each
            for k in range(len(handles)):
                mine = [m for m in got if m.startswith(f"page{k}-")]
                assert mine == [f"page{k}-msg{j}" for j in range(n)], mine  # in order
        SHOT.parent.mkdir(parents=True, exist_ok=True)
        driver.switch_to.window(handles[0])
        assert driver.save_screenshot(str(SHOT))
        print(f"screenshot: {SHOT} (pages on workers {pids})")
    finally:
        driver.quit()
