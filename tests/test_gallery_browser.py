"""The gallery page in a real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium): it loads
without console errors, every image resolves, the 360° viewer draws and turns with a drag, a sweep's members sit side
by side and a loop strip wraps. Skipped only when SYNCENGINE_SKIP_BROWSER=1; a missing browser is a failure.

``SYNCENGINE_GALLERY_SCREENSHOT=docs/images/gallery.png`` saves a screenshot of the page for the docs."""
from __future__ import annotations

import io
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from _gallery_helpers import sample_outputs
from PIL import Image

from syncengine.gallery import build_gallery

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-unsafe-swiftshader",  # WebGL on the CPU: the viewer needs it and there is no GPU
         "--window-size=1280,1400")

if os.environ.get("SYNCENGINE_SKIP_BROWSER") == "1":
    pytest.skip("SYNCENGINE_SKIP_BROWSER=1", allow_module_level=True)


def wait_for(condition, timeout: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("selenium (pip install selenium)")
    if missing:
        pytest.fail(f"browser test needs {', '.join(missing)}: apt-get install -y chromium chromium-driver; "
                    f"set SYNCENGINE_SKIP_BROWSER=1 to skip", pytrace=False)
    profile = tempfile.mkdtemp(prefix="syncengine-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def page(browser, tmp_path_factory):
    root = tmp_path_factory.mktemp("gallery")
    sample_outputs(root / "outputs")
    result = build_gallery([root / "outputs"], root / "page")
    assert result.skipped == []
    browser.get(result.page.resolve().as_uri())
    wait_for(lambda: browser.execute_script("return document.readyState") == "complete", what="the page")
    return browser


def viewer_ready(driver):
    return driver.execute_script("var v = Object.values(window.seViewers || {}); "
                                 "return v.length === 1 && v[0].isLoaded() === true;")


def element_pixels(element) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(element.screenshot_as_png)).convert("RGB")).astype(np.int16)


def test_loads_without_console_errors_and_every_image_resolves(page):
    for img in page.find_elements("css selector", "img"):  # lazy images load once scrolled to
        page.execute_script("arguments[0].scrollIntoView({block: 'center'})", img)
        wait_for(lambda img=img: page.execute_script("return arguments[0].complete", img), what="an image")
    sizes = page.execute_script("return Array.from(document.images).map(i => [i.getAttribute('src'), "
                                "i.naturalWidth])")
    assert len(sizes) == 7 and all(width > 0 for _, width in sizes), sizes  # 2 sweep, 3 loop copies, 2 control
    page.execute_script("window.scrollTo(0, 0)")
    wait_for(lambda: viewer_ready(page), what="the 360° viewer")
    errors = [e for e in page.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []


def test_viewer_draws_and_turns_with_a_drag(page):
    from selenium.webdriver.common.action_chains import ActionChains

    pano = page.find_element("css selector", ".pano")
    page.execute_script("arguments[0].scrollIntoView({block: 'center'})", pano)
    wait_for(lambda: viewer_ready(page), what="the 360° viewer")
    canvas = pano.find_element("css selector", "canvas")
    assert canvas.size["width"] > 100 and canvas.size["height"] > 100
    time.sleep(0.3)
    before = element_pixels(canvas)
    assert before.std() > 20  # the panorama is drawn, not a blank canvas
    yaw = page.execute_script("return Object.values(window.seViewers)[0].getYaw()")
    ActionChains(page).move_to_element(canvas).click_and_hold().move_by_offset(-200, 0).release().perform()
    turned = wait_for(lambda: abs(page.execute_script("return Object.values(window.seViewers)[0].getYaw()") - yaw)
                      > 10, what="the yaw to change after a drag")
    assert turned
    time.sleep(0.5)  # the viewer eases to a stop
    after = element_pixels(canvas)
    assert np.abs(after - before).mean() > 5


def test_sweep_members_side_by_side(page):
    cards = page.find_elements("css selector", "section.sweep figure.card")
    assert len(cards) == 2
    a, b = (c.rect for c in cards)
    assert abs(a["y"] - b["y"]) < 1 and b["x"] >= a["x"] + a["width"]
    text = page.find_element("css selector", "section.sweep h2").text
    assert "varies: sync.weight" in text


def test_loop_strip_wraps(page):
    strip = page.find_element("css selector", ".loop-strip")
    page.execute_script("arguments[0].scrollIntoView({block: 'center'})", strip)
    width = page.execute_script("return arguments[0].querySelector('img').getBoundingClientRect().width", strip)
    assert width > 0 and len(strip.find_elements("css selector", "img")) == 3
    assert abs(strip.get_property("scrollLeft") - width) <= 1  # starts on the middle copy

    def scroll_to(x):
        page.execute_script("arguments[0].scrollLeft = arguments[1]", strip, x)
        time.sleep(0.2)  # scroll events are asynchronous
        return strip.get_property("scrollLeft")

    assert abs(scroll_to(1.75 * width) - 0.75 * width) <= 2  # past the right end: back by one copy
    assert abs(scroll_to(0.25 * width) - 1.25 * width) <= 2  # past the left end: forward by one copy


def test_offline_presets_page_opens_with_a_working_viewer(browser, tmp_path_factory):
    """The issue's 'done when': real outputs of the offline presets (demo as a sweep, regions-demo, spherical-demo;
    shrunk, one step) through ``syncengine gallery``, opened: no console errors, images decoded, the viewer turns."""
    from selenium.webdriver.common.action_chains import ActionChains

    from syncengine.cli import main

    out = tmp_path_factory.mktemp("presets") / "outputs"
    tiny = ["sampler.steps=1", "runtime.progress=false", "sync.weight=0", "canvas.height=64", "canvas.width=192",
            "tiler.window=64", "tiler.stride=64"]
    assert main(["generate", "spherical-demo", "sampler.steps=1", "runtime.progress=false",
                 f"runtime.output_dir={out / 'spherical'}"]) == 0
    assert main(["generate", "regions-demo", *tiny, "tiler.feather=4", f"runtime.output_dir={out / 'regions'}"]) == 0
    assert main(["sweep", "demo", "sampler.guidance_scale=5,7.5", *tiny, f"runtime.output_dir={out / 'sweep'}"]) == 0
    page_dir = out.parent / "gallery"
    assert main(["gallery", str(out), "--out", str(page_dir)]) == 0
    browser.get_log("browser")  # drop the earlier page's entries
    browser.get((page_dir / "index.html").resolve().as_uri())
    wait_for(lambda: browser.execute_script("return document.readyState") == "complete", what="the page")
    assert len(browser.find_elements("css selector", "section.sweep figure.card")) == 2
    assert "<span>layout</span>" in browser.page_source
    for img in browser.find_elements("css selector", "img"):
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", img)
        wait_for(lambda img=img: browser.execute_script("return arguments[0].complete", img), what="an image")
    assert all(browser.execute_script("return Array.from(document.images).map(i => i.naturalWidth)"))
    pano = browser.find_element("css selector", ".pano")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", pano)
    wait_for(lambda: viewer_ready(browser), what="the 360° viewer")
    yaw = browser.execute_script("return Object.values(window.seViewers)[0].getYaw()")
    canvas = pano.find_element("css selector", "canvas")
    ActionChains(browser).move_to_element(canvas).click_and_hold().move_by_offset(150, 0).release().perform()
    wait_for(lambda: abs(browser.execute_script("return Object.values(window.seViewers)[0].getYaw()") - yaw) > 10,
             what="the yaw to change after a drag")
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []


def test_screenshot_for_the_docs(page):
    target = os.environ.get("SYNCENGINE_GALLERY_SCREENSHOT")
    if not target:
        pytest.skip("set SYNCENGINE_GALLERY_SCREENSHOT=docs/images/gallery.png to save one")
    page.execute_script("window.scrollTo(0, 0)")
    time.sleep(0.5)
    assert page.save_screenshot(target)
