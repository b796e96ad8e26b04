"""A real headless browser for the page tests: Debian's Chromium, driven by Playwright.

Chromium comes from Debian's packages (installed here with apt-get when missing, as the image
tests install podman); Playwright only drives it and never downloads a browser of its own.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from debian_packages import apt_install

# Flags for a closed network (no background connections to Google's hosts) and a root user.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium() -> str:
    """Path of Debian's chromium, installing the package first if needed."""
    path = shutil.which("chromium")
    if path:
        return path
    apt_install("chromium", needed_by="the page test")
    path = shutil.which("chromium")
    if not path:
        pytest.fail("apt-get installed chromium, but no `chromium` is on PATH")
    return path


@contextmanager
def chromium_page(url: str, *, password: str, screenshot: Path) -> Iterator[Any]:
    """Open `url` signed in with Basic credentials (any user, the API key as password), wait
    until the network is idle, and yield the page with `console_errors` (console errors and
    uncaught exceptions) attached; a full-page screenshot is written on the way out."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=FLAGS)
        try:
            context = browser.new_context(http_credentials={"username": "ops", "password": password},
                                          viewport={"width": 1400, "height": 1000})
            page = context.new_page()
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.console_errors = errors
            response = page.goto(url)
            assert response is not None and response.status == 200, response and response.status
            page.wait_for_load_state("networkidle")
            yield page
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
