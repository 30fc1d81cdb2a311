"""The Analyse page in headless Chromium (issue 14): a recording goes in, the timeline, the
events and the seconds per class come out, and choosing an event plays that stretch in the
page's own player."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
import soundfile as sf
from test_browser import all_css, css, images_loaded, wait
from web_helpers import clip_path, pick

pytestmark = pytest.mark.browser


def most_confident_clip(system) -> tuple[np.ndarray, str]:
    """The fold-2 clip the served (small, quickly trained) model is surest of, so that the
    recording made of it has an event to click."""
    best = (-1.0, None)
    for row in pick(system.rows, 2, 1):
        path = clip_path(row)
        answer = system.api("POST", "/api/v1/predict", files={"file": path.open("rb")}).json()
        if answer.get("confidence", 0) > best[0]:
            best = (answer["confidence"], path)
    y, sr = sf.read(best[1], dtype="float32")
    assert sr == 22050
    return y, best[1].name


def test_analyse_a_recording_and_play_an_event(system, browser, screenshot, tmp_path):
    y, _ = most_confident_clip(system)
    recording = tmp_path / "balcony.wav"
    sf.write(recording, np.tile(y, 3), 22050)
    answer = system.api("POST", "/api/v1/analyze?min_confidence=0",
                        data=recording.read_bytes(), headers={"Content-Type": "audio/wav"}).json()
    assert answer["events"]  # at threshold 0 every stretch has a class

    browser.get(system.url + "/analyse")
    css(browser, "#file").send_keys(str(recording))
    css(browser, "[data-testid=analyse-form] details summary").click()
    css(browser, "#min_confidence").send_keys("0")  # the small test model is never sure
    css(browser, "[data-testid=analyse-form] button[type=submit]").click()
    wait(browser, lambda b: b.find_elements("css selector", "[data-testid=analysis]"))
    assert "balcony.wav" in browser.page_source
    assert images_loaded(browser, ".timeline img.plot")
    assert images_loaded(browser, "[data-testid=analysis] > img.plot")  # seconds per class
    rows = all_css(browser, "[data-testid=events] tbody tr")
    assert len(rows) == len(answer["events"])  # the page shows what the API answers
    player = css(browser, "audio[data-analysis-player]")
    wait(browser, lambda b: b.execute_script("return arguments[0].readyState >= 1", player))
    duration = browser.execute_script("return arguments[0].duration", player)
    assert duration == pytest.approx(answer["duration_s"], abs=0.05)
    event = answer["events"][-1]
    css(browser, "[data-testid=events] tbody tr:last-child a[data-play-start]").click()
    wait(browser, lambda b: b.execute_script("return arguments[0].currentTime", player)
         >= event["start_s"])
    time.sleep(0.5)
    now = browser.execute_script("return arguments[0].currentTime", player)
    assert event["start_s"] <= now <= event["end_s"] + 0.5
    strip = all_css(browser, ".timeline-strip a[data-play-start]")
    assert len(strip) == len(answer["events"])
    screenshot("analyse")


def test_predict_links_a_long_file_to_the_analysis(system, browser, tmp_path):
    y, _ = most_confident_clip(system)
    buf = io.BytesIO()
    sf.write(buf, np.resize(y, 10 * 22050), 22050, format="WAV")  # repeated to 10 s, however short
    recording = tmp_path / "ten-seconds.wav"
    recording.write_bytes(buf.getvalue())
    browser.get(system.url + "/")
    css(browser, "#file").send_keys(str(recording))
    css(browser, "#predict-form button[type=submit]").click()
    note = wait(browser, lambda b: b.find_elements("css selector", "[data-testid=partly-heard]"))
    assert "10.0 s" in note[0].text
    note[0].find_element("css selector", "a").click()
    wait(browser, lambda b: b.find_elements("css selector", "[data-testid=analyse-form]"))
