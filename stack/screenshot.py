"""Screenshot the page with a real prediction (and its heat map) in headless Chromium, for the README.

    .venv/bin/python -m stack.screenshot --image lesion.jpg --out docs/screenshot.png   # the page of ./skin up
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from stack.settings import current


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=current().page_url + "/", help="the page (default: ./skin up's)")
    p.add_argument("--image", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--explain", action="store_true", help="also open the Grad-CAM heat map")
    args = p.parse_args(argv)
    if not Path(args.image).is_file():
        print(f"error: {args.image} does not exist", file=sys.stderr)
        return 1
    args.image = str(Path(args.image).resolve())
    if not shutil.which("chromium") or not shutil.which("chromedriver"):
        print("error: needs Debian's chromium and chromium-driver", file=sys.stderr)
        return 1
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    with tempfile.TemporaryDirectory() as profile:
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--window-size=900,1500",
                     f"--user-data-dir={profile}"):
            opts.add_argument(flag)
        drv = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
        try:
            drv.get(args.url)
            drv.find_element(By.ID, "file").send_keys(args.image)
            deadline = time.monotonic() + 60
            while not drv.find_elements(By.CSS_SELECTOR, "#bars li") and time.monotonic() < deadline:
                time.sleep(0.2)
            if args.explain:
                drv.find_element(By.ID, "explain").click()
                while not drv.find_element(By.ID, "explanation-box").is_displayed() and time.monotonic() < deadline:
                    time.sleep(0.2)
            drv.save_screenshot(args.out)
        finally:
            drv.quit()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
