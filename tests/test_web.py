"""The try-out page in real headless Chromium (Debian's chromium + chromium-driver) against a live server."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from service.api.app import create_app
from service.settings import ServiceSettings
from tests.helpers import live_server, text_page

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-output"


def find_chromium() -> tuple[str, str] | None:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


@pytest.fixture(scope="session")
def chromium() -> tuple[str, str]:
    """(browser, driver) paths; only the browser tests fail, with one line, when there is none."""
    found = find_chromium()
    if found is None:
        pytest.fail(
            "headless Chromium is needed for the browser tests: apt-get install chromium chromium-driver "
            "(the README's test command installs it on Debian)",
            pytrace=False,
        )
    return found


def browser(chromium: tuple[str, str], width: int, height: int):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = chromium
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--window-size={width},{height}",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.fixture(scope="module")
def server(tiny_engine):
    app = create_app(ServiceSettings(model="tiny", log_json=False), load_engine=lambda: tiny_engine)
    with live_server(app) as base:
        yield base


@pytest.fixture
def page_file(tmp_path):
    path = tmp_path / "page.png"
    text_page((1100, 800)).save(path)
    return path


def run_ocr(driver, base: str, page_file: Path, *, keyboard: bool = False, as_job: bool = False) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    driver.get(base + "/")
    WebDriverWait(driver, 20).until(lambda d: "tiny" in d.find_element(By.ID, "model-line").text)
    driver.find_element(By.ID, "file").send_keys(str(page_file))
    Select(driver.find_element(By.ID, "mode")).select_by_value("base")
    max_tokens = driver.find_element(By.ID, "max-new-tokens")
    # the server's own default and cap (a random preset: 32, at most 256), not a long wait for nothing
    assert (max_tokens.get_attribute("value"), max_tokens.get_attribute("max")) == ("32", "256")
    max_tokens.clear()
    max_tokens.send_keys("8")
    if as_job:
        driver.find_element(By.ID, "as-job").click()
    if keyboard:  # reach the button with Tab and press Enter, as a keyboard user would
        max_tokens.send_keys(Keys.TAB, Keys.TAB, Keys.TAB)
        assert driver.switch_to.active_element.get_attribute("id") == "run"
        driver.switch_to.active_element.send_keys(Keys.ENTER)
    else:
        driver.find_element(By.ID, "run").click()
    WebDriverWait(driver, 120).until(lambda d: d.find_element(By.ID, "status").text.startswith(("Done", "Error")))


def test_upload_shows_markdown_stats_and_token_overlay(server, page_file, chromium):
    from selenium.webdriver.common.by import By

    ARTIFACTS.mkdir(exist_ok=True)
    driver = browser(chromium, 1280, 1000)
    try:
        run_ocr(driver, server, page_file)
        status = driver.find_element(By.ID, "status").text
        assert status.startswith("Done"), status
        assert driver.find_element(By.ID, "results").is_displayed()
        assert not driver.find_element(By.ID, "ref-row").is_displayed()  # only for task "locate"
        assert "RANDOM weights" in driver.find_element(By.ID, "warnings").text
        stats = driver.find_element(By.ID, "token-stats").text
        assert "of 273 reach the model" in stats and "of 256 kept" in stats  # visual tokens; grid tokens
        assert "r_sim" in stats and "r_txt" in stats
        assert len(driver.find_elements(By.CSS_SELECTOR, "#latency-chart .bar")) == 7  # one bar a stage
        assert driver.find_element(By.ID, "markdown").text.strip()
        # the overlay canvas holds the token grid: green (kept) and orange (merged away) pixels
        colors = driver.execute_script("""
            const c = document.getElementById('overlay');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let kept = 0, merged = 0;
            for (let i = 0; i < d.length; i += 4) { if (d[i+3] === 0) continue;
              if (d[i+1] > d[i]) kept++; else if (d[i] > d[i+2]) merged++; }
            return [c.width, kept, merged];""")
        width, kept, merged = colors
        assert width > 0 and kept > 0 and merged > 0, colors
        driver.save_screenshot(str(ARTIFACTS / "web-desktop.png"))
        driver.find_element(By.ID, "show-tokens").click()  # the toggle clears the grid
        cleared = driver.execute_script("""
            const c = document.getElementById('overlay');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n;""")
        assert cleared < kept + merged
    finally:
        driver.quit()


def test_keyboard_and_phone_viewport(server, page_file, chromium):
    from selenium.webdriver.common.by import By

    ARTIFACTS.mkdir(exist_ok=True)
    driver = browser(chromium, 390, 844)
    # a phone-sized viewport (a headless window cannot be narrower than ~500 px, so emulate the device)
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride", {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True}
    )
    try:
        run_ocr(driver, server, page_file, keyboard=True)
        assert driver.find_element(By.ID, "status").text.startswith("Done")
        assert driver.execute_script("return window.innerWidth") == 390
        overflow = driver.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 1, f"page is {overflow}px wider than a phone screen"
        image_width = driver.execute_script(
            "return document.getElementById('page-image').getBoundingClientRect().width"
        )
        assert 0 < image_width <= 390
        driver.save_screenshot(str(ARTIFACTS / "web-phone.png"))
    finally:
        driver.quit()


def test_a_pdf_as_a_job_shows_page_progress_then_every_page(server, tmp_path, chromium):
    from selenium.webdriver.common.by import By

    from tests.helpers import text_pdf

    pdf = tmp_path / "doc.pdf"
    pdf.write_bytes(text_pdf(3, lines=4))
    driver = browser(chromium, 1280, 1000)
    try:
        run_ocr(driver, server, pdf, as_job=True)
        assert driver.find_element(By.ID, "status").text.startswith("Done")
        progress = driver.find_element(By.ID, "job-progress")
        assert progress.is_displayed()
        assert progress.get_attribute("max") == "3" and progress.get_attribute("value") == "3"
        tabs = driver.find_elements(By.CSS_SELECTOR, "#page-tabs button")
        assert [t.text for t in tabs] == ["Page 1", "Page 2", "Page 3"]
        driver.save_screenshot(str(ARTIFACTS / "web-job.png"))
    finally:
        driver.quit()


def test_token_map_is_opt_in(server, page_file):
    import httpx

    plain = httpx.post(
        f"{server}/v1/ocr",
        files={"file": page_file.open("rb")},
        data={"mode": "tiny", "max_new_tokens": "2"},
        timeout=60,
    ).json()
    assert plain["pages"][0]["token_map"] is None and plain["pages"][0]["preview"] is None
    rich = httpx.post(
        f"{server}/v1/ocr",
        files={"file": page_file.open("rb")},
        data={"mode": "tiny", "max_new_tokens": "2", "token_map": "true", "retention": "0.5", "pruner": "norm"},
        timeout=60,
    ).json()["pages"][0]
    token_map = rich["token_map"]
    assert token_map["grid"] == [8, 8] and len(token_map["status"]) == 64
    assert set(token_map["status"]) == {"k", "d"}  # norm drops; only rtprune merges
    assert token_map["status"].count("k") == 32
    assert rich["preview"].startswith("data:image/jpeg;base64,")
