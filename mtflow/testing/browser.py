"""Open a local HTML page in a real headless Chromium (Debian's, driven by Playwright) and report what a person
would see: console errors, failed loads, broken images, counts of elements, and a screenshot.

Playwright is used with ``executable_path`` (the system's Chromium) and never downloads a browser of its own. The
flags keep the browser off the network and off the user's profile (a fresh ``user_data_dir`` per call)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]  # plus --headless and a fresh --user-data-dir, which Playwright sets from headless=True and the profile folder


def chromium_executable() -> str | None:
    """The system's Chromium (``chromium`` from Debian), or None."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None


def inspect_page(
    page_path: str | Path,
    selectors: dict[str, str] | None = None,
    screenshot: str | Path | None = None,
    viewport: tuple[int, int] = (1280, 900),
    timeout_s: float = 60.0,
    full_page: bool = True,
) -> dict[str, Any]:
    """Load ``page_path`` (a file) and return ``console_errors``, ``failed_requests``, ``broken_images`` (sources
    of images that did not load), ``num_images`` and, per ``selectors`` entry, the number of matching elements.

    Args:
        page_path: the HTML file.
        selectors: name -> CSS selector to count.
        screenshot: write a PNG of the page here.
        viewport: window size in pixels (a laptop screen by default).
        timeout_s: page-load limit.
        full_page: the screenshot holds the whole page (False: the viewport only).
    """
    from playwright.sync_api import sync_playwright

    executable = chromium_executable()
    if executable is None:
        raise FileNotFoundError("no chromium binary (apt-get install chromium)")
    url = Path(page_path).resolve().as_uri()
    errors: list[str] = []
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="mtflow-chromium-") as profile, sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile,
            executable_path=executable,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": viewport[0], "height": viewport[1]},
        )
        try:
            page = context.new_page()
            page.on(
                "console", lambda message: errors.append(message.text) if message.type == "error" else None
            )
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("requestfailed", lambda request: failed.append(request.url))
            page.goto(url, wait_until="load", timeout=timeout_s * 1000)
            broken = page.evaluate(
                "Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)"
            )
            report: dict[str, Any] = {
                "console_errors": errors,
                "failed_requests": failed,
                "broken_images": broken,
                "num_images": page.evaluate("document.images.length"),
                "title": page.title(),
            }
            for name, selector in (selectors or {}).items():
                report[name] = page.locator(selector).count()
            if screenshot is not None:
                page.screenshot(path=str(screenshot), full_page=full_page)
        finally:
            context.close()
    return report
