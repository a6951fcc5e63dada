"""Serve a study with optuna-dashboard on 127.0.0.1 and look at it in headless Chromium (Playwright).

    python scripts/dashboard_screenshot.py STORAGE_URL [--out docs/dashboard.png]

Writes a screenshot of the study's analytics page with the slice plot on `num_hidden_layers`. The browser test
(tests/test_search.py) uses the same functions. Chromium comes from Debian (`apt-get install chromium`);
Playwright's own browser download is not used.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

# Chromium on a machine without network: no background traffic, no sandbox when run as root.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        raise RuntimeError("no Chromium: apt-get install chromium")
    return path


@contextlib.contextmanager
def dashboard(storage: str) -> Iterator[str]:
    """optuna-dashboard on a free loopback port for `storage`; yields its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).with_name("optuna-dashboard")
    proc = subprocess.Popen([str(exe), storage, "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{url}/api/studies", timeout=2)
                break
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def study_id(url: str, name: str) -> int:
    studies = json.loads(urllib.request.urlopen(f"{url}/api/studies", timeout=10).read())["study_summaries"]
    return next(s["study_id"] for s in studies if s["study_name"] == name)


def show_slice(page, url: str, sid: int, param: str = "num_hidden_layers"):
    """Open the analytics page and switch the slice plot to `param`; returns the slice plot's locator."""
    page.goto(f"{url}/dashboard/studies/{sid}/analytics")
    panel = page.locator("div.MuiCard-root", has=page.get_by_text("Slice", exact=True)).first
    # The panel may also offer an "Objective:" choice (numeric user attributes); take the "Parameter:" one.
    panel.locator(".MuiFormControl-root", has=page.get_by_text("Parameter:")).get_by_role("combobox").click()
    page.get_by_role("option", name=f"Param {param}", exact=True).click()
    plot = panel.locator(".js-plotly-plot")
    plot.get_by_text(f"Param {param}").wait_for()
    return plot


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("storage", help="Optuna storage URL, e.g. sqlite:///trials/smollm2-135m-demo/study.db")
    parser.add_argument("--study", default=None, help="study name (default: the first)")
    parser.add_argument("--out", default="docs/dashboard.png")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    with dashboard(args.storage) as url, sync_playwright() as p:
        studies = json.loads(urllib.request.urlopen(f"{url}/api/studies", timeout=10).read())["study_summaries"]
        sid = study_id(url, args.study) if args.study else studies[0]["study_id"]
        browser = p.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        show_slice(page, url, sid)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        page.wait_for_timeout(1000)  # let the option menu fade out
        page.screenshot(path=args.out)
        browser.close()
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
