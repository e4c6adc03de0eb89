"""A real headless Chromium for the dashboard's tests (Debian's chromium + chromium-driver, driven
by selenium). Missing pieces fail the test loudly, naming what to install; they never skip.

Selenium's calls block, so tests run them in a thread (:func:`helpers.in_thread`) while the reactor
keeps serving the daemon under test. Screenshots go to ``$CLPROXY_ARTIFACTS`` (default
``test-artifacts/`` at the repository's root) for a person to look at.
"""

import os
import shutil
from typing import List, Optional

import pytest

CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMEDRIVER = ("/usr/bin/chromedriver",)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTIFACTS = os.environ.get("CLPROXY_ARTIFACTS") or os.path.join(REPO, "test-artifacts")


def _first(paths, name: str) -> Optional[str]:
    for path in paths:
        if os.path.exists(path):
            return path
    return shutil.which(name)


def chrome(width: int = 1280, height: int = 900):
    """A started headless Chromium (selenium WebDriver) that keeps the browser console's log."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: pip install -e '.[test]'")
    binary = _first(CHROMIUM, "chromium")
    driver_path = _first(CHROMEDRIVER, "chromedriver")
    if binary is None or driver_path is None:
        pytest.fail("the dashboard's browser tests need Chromium and its driver: "
                    "apt-get install chromium chromium-driver (scripts/test installs them as root)")
    os.environ.setdefault("SE_OFFLINE", "true")  # never let selenium download a driver
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--disable-extensions", "--no-first-run", f"--window-size={width},{height}",
                     "--lang=en-US"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=driver_path), options=options)


def console_errors(driver, allowed: tuple = ()) -> List[str]:
    """The browser console's errors since the last call, minus those containing an ``allowed`` text."""
    entries = driver.get_log("browser")
    return [e["message"] for e in entries
            if e.get("level") == "SEVERE" and not any(text in e["message"] for text in allowed)]


def screenshot(driver, name: str) -> str:
    """Save a PNG of the page as a test artifact; returns its path."""
    os.makedirs(ARTIFACTS, exist_ok=True)
    path = os.path.join(ARTIFACTS, f"{name}.png")
    driver.save_screenshot(path)
    return path
