"""`cai review` in a real browser: the command serves a temporary store, headless Chromium (Debian's
chromium + chromium-driver, driven by selenium) reviews pairs with the keyboard only, and the stored
rows and `cai review stats` say what was pressed. Fails, never skips, when the browser is missing:
it is the only check that the keyboard flow works in a browser."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from reviewstore import seed
from sqlmodel import select

from cai import review
from store.db import session_scope
from store.models import Review

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1000")


def browser(profile: Path):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: `pip install -e '.[test]'` (this test must run, not skip)")
    for path, package in ((CHROMIUM, "chromium"), (DRIVER, "chromium-driver")):
        if not Path(path).exists():
            pytest.fail(f"{path} not found: `apt-get install -y {package}` (this test must run, not skip)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    return webdriver.Chrome(options=opts, service=Service(DRIVER))


def start(url: str, *args: str) -> tuple[subprocess.Popen, str]:
    """`cai review --port 0 ...` on the store at `url`; returns the process and the address it printed."""
    env = {**os.environ, "CAI_DATABASE_URL": url, "COLUMNS": "400"}
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "review", "--port", "0", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    out = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        out += line
        m = re.search(r"open (http://\S+)", line)
        if m:
            return proc, m.group(1)
        if not line and proc.poll() is not None:
            break
    proc.kill()
    pytest.fail(f"`cai review` printed no address: {out[-2000:]}")


@pytest.mark.browser
def test_keyboard_review_in_headless_chromium(sqlite_url, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    seed(sqlite_url, n=10, xss=True)
    proc, address = start(sqlite_url, "--reviewer", "ann", "--queue", "all")
    driver = browser(tmp_path / "profile")
    try:
        driver.get(address)
        assert driver.title == "cai review"  # the stored <script> setting the title never ran
        read_pair = "const m = document.getElementById('pair'); return [m?.dataset.pair, m?.dataset.left];"
        pressed: list[tuple[str, str, str, bool]] = []  # (pair, left, choice, opened the factory's label)
        # keys as a person would press them: each answer loads the next pair
        # (n: focus the note, type, Esc: leave it; i: open the factory's label)
        for keys, choice in ((["1"], "left"), ([Keys.ARROW_RIGHT], "right"), (["t"], "tie"),
                             (["n", "both wrong, see the numbers", Keys.ESCAPE, "4"], "both-bad"),
                             (["i", "2"], "right"), (["s"], "skip"), (["b"], "both-bad")):
            # read in one script call: the page swaps #pair out, and a found element can go stale between calls
            pair, left = driver.execute_script(read_pair)
            for k in keys:  # to whatever has the focus, as a keyboard would (no element handle to go stale)
                ActionChains(driver).send_keys(k).perform()
            WebDriverWait(driver, 20).until(lambda d, pair=pair: d.execute_script(read_pair)[0] not in (None, pair))
            pressed.append((pair, left, choice, keys[0] == "i"))
        driver.save_screenshot(str(tmp_path / "review.png"))
        assert (tmp_path / "review.png").stat().st_size > 10_000
        driver.get(address + "stats")
        stats_text = driver.find_element(By.TAG_NAME, "body").text
    finally:
        driver.quit()
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode in (0, -15), proc.stdout.read()

    with session_scope(sqlite_url) as s:
        stored = list(s.exec(select(Review).order_by(Review.created_at)))
    assert [(r.pair_id, r.left, r.verdict, r.ai_shown, r.reviewer) for r in stored] == [
        (p, left, review.verdict_for(c, left), opened, "ann") for p, left, c, opened in pressed]
    assert [r.note for r in stored] == [None, None, None, "both wrong, see the numbers", None, None, None]
    assert len({p for p, *_ in pressed}) == 7  # every answer moved on to another pair

    # the stats page and `cai review stats` agree with the keys pressed
    decisive = [review.verdict_for(c, left) for _, left, c, _ in pressed if c in ("left", "right")]
    agree = decisive.count("chosen")
    assert f"({agree} of {len(decisive)};" in stats_text
    out = subprocess.run([sys.executable, "-m", "flows.cli", "review", "stats", "--json"], cwd=ROOT, check=True,
                         env={**os.environ, "CAI_DATABASE_URL": sqlite_url}, capture_output=True, text=True).stdout
    st = json.loads(out)
    assert (st["overall"]["agreement"]["k"], st["overall"]["agreement"]["n"]) == (agree, len(decisive))
    assert (st["overall"]["tie"], st["overall"]["both_bad"], st["skips"]) == (1, 2, 1)
    assert st["blind"]["n"] == len(decisive) - 1  # one verdict came after opening the factory's label
