"""The status page (GET /status), looked at in a real browser: Debian's chromium, driven by
selenium through chromium-driver (.ci/run installs both; elsewhere the test skips and names
the packages)."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from tests.conftest import BrokerProcess, debian_binary, wait_for


@pytest.fixture
def browser() -> Iterator[Any]:
    chromium = debian_binary("chromium", "chromium")
    driver_path = debian_binary("chromedriver", "chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def text_of(driver: Any, element_id: str) -> str:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    try:
        return str(driver.find_element("id", element_id).text)
    except (NoSuchElementException, StaleElementReferenceException):
        return ""


def test_the_status_page_shows_the_model_its_traffic_and_a_hot_swap(start_broker: Any, test_models: Path,
                                                                    tmp_path: Path, browser: Any) -> None:
    base = tmp_path / "m"
    shutil.copytree(test_models / "linear" / "1", base / "1")
    broker: BrokerProcess = start_broker(["--model_name=m", f"--model_base_path={base}",
                                          "--file_system_poll_wait_seconds=0.5"], frontends=2)
    broker.wait_available(["m"])
    browser.get(f"{broker.base_url}/status")
    wait_for(lambda: "AVAILABLE" in text_of(browser, "versions-m"), 20, "the model's version on the page")
    assert text_of(browser, "total-m") == "0"

    stop = threading.Event()
    answers: list[int] = []

    def load() -> None:
        with httpx.Client(base_url=broker.base_url, timeout=10) as http:
            while not stop.is_set():
                answers.append(http.post("/v1/models/m:predict", json={"instances": [1.0, 2.0]}).status_code)
                time.sleep(0.005)

    thread = threading.Thread(target=load)
    thread.start()
    try:
        wait_for(lambda: text_of(browser, "total-m") not in ("", "0") and float(text_of(browser, "rps-m") or 0) > 0,
                 30, "requests per second moving on the page")
        wait_for(lambda: text_of(browser, "p50-m") not in ("", "–"), 30, "a p50 latency on the page")
        # Where the time goes: an average request and a p99 one by stage, the batches' fill and exits.
        wait_for(lambda: "average" in text_of(browser, "breakdown-m-1") and "p99" in text_of(browser, "breakdown-m-1")
                 and "rows a batch" in text_of(browser, "breakdown-m-1"), 30, "the time by stage on the page")
        assert "fill" in text_of(browser, "breakdown-m-1") and "model" in text_of(browser, "breakdown-m-1")
        shutil.copytree(test_models / "linear" / "2", base / "2")  # a new version: the broker swaps it in
        wait_for(lambda: "m version 2" in text_of(browser, "history") and "AVAILABLE" in text_of(browser, "history"),
                 60, "the swap in the page's list of version changes")
        wait_for(lambda: "END" in text_of(browser, "history"), 60, "the old version's end on the page")
    finally:
        stop.set()
        thread.join(timeout=30)
    assert answers and set(answers) == {200}, "the swap failed no request"
    rows = text_of(browser, "versions-m")
    assert rows.index("2 AVAILABLE") < rows.index("1 "), rows
    severe = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not severe, severe

    figures = httpx.get(f"{broker.base_url}/status.json", timeout=10).json()
    assert {"broker", "models", "history", "iobatchers", "requests", "latency_buckets"} <= set(figures)
    wait_for(lambda: httpx.get(f"{broker.base_url}/status.json", timeout=10).json()["requests"]["m"]["200"]
             == len(answers), 10, "every answer counted")
    [model] = figures["models"]
    assert sum(sum(v["batch_sizes"].values()) for v in model["versions"]) >= 1
    stages = [v["breakdown"]["stages"] for v in model["versions"] if v["breakdown"]]
    assert stages and all(set(s) == {"fill", "wait", "input", "model", "output", "transport"} for s in stages)


def test_the_status_page_can_be_turned_off(start_broker: Any, test_models: Path) -> None:
    broker = start_broker(["--model_name=linear", f"--model_base_path={test_models / 'linear'}",
                           "--enable_status_page=false"], frontends=1)
    broker.wait_available(["linear"])
    assert broker.http.get("/status").status_code == 404
    assert broker.http.get("/status.json").status_code == 404
    assert broker.predict("linear", {"instances": [2.0]}).status_code == 200
