"""Render a run's report.html in headless Chromium (Debian's, through playwright) and save a screenshot of its top,
scaled down: how docs/report_demo.png is made.

    fcmae pretrain demo && fcmae report output/demo
    python scripts/report_screenshot.py output/demo/report.html docs/report_demo.png
"""

from __future__ import annotations

import io
import shutil
import sys
from pathlib import Path

from PIL import Image
from playwright.sync_api import sync_playwright

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


def main(page: str, out: str, height: int = 1500, width: int = 560) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=ARGS)
        tab = browser.new_page(viewport={"width": 1000, "height": height})
        tab.goto(Path(page).absolute().as_uri(), wait_until="load")
        png = tab.screenshot(full_page=False)
        browser.close()
    im = Image.open(io.BytesIO(png)).convert("RGB")
    im = im.resize((width, round(im.height * width / im.width)), Image.Resampling.LANCZOS)
    im.quantize(colors=128).save(out, optimize=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
