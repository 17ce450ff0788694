"""``POST /v1/inspect`` and the ``/inspect`` page, against a real inference server and a real browser.

A real inference server (two tiny GPT-2-vocabulary checkpoints) serves gRPC and its HTTP API
(``services.http``, where the page and the endpoint live) on free ports. The JSON endpoint is checked against the gRPC Inspect RPC field by
field, errors in OpenAI's shape; the page is loaded in Debian's headless ``chromium`` driven by
selenium through ``chromium-driver``: it lists the models, submits a text, shows its tokens, a
token's top-k, attention lines whose weights are the RPC's (the page decodes float16 itself), the
heatmap and the logit lens. Any JavaScript console error fails the test; the screenshot it takes is
checked not blank and its path printed. Without chromium the browser test skips saying how to get it,
except under ``CI=true``, where it fails.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import urllib.error
import urllib.request

import numpy as np
import pytest

from services.client import Client
from services.config import InferenceSettings
from services.http.inspect import to_json
from services.inference.__main__ import setup
from services.inference.inspection import unpack_attention
from tests.helpers import free_port
from tests.helpers.servers import ServerThread
from tests.services.test_inspect import assert_picture

TEXT = "def add(a, b):\n    return a + b"


@pytest.fixture(scope="module")
def inference(tiny_models):
    """The inference service with its HTTP API on the same handler (``--http-port``)."""
    settings = InferenceSettings(models=[f"tiny={tiny_models['tiny']}", f"tiny-b={tiny_models['tiny-b']}"], port=0,
                                 http_port=free_port())
    s = ServerThread(settings, "inference", setup).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def web(inference):
    return f"http://127.0.0.1:{inference.settings.http_port}"


def post(url: str, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + "/v1/inspect", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_v1_inspect_is_the_rpc_as_json(web, inference):
    status, got = post(web, {"model": "tiny-b", "text": TEXT, "top_k": 4, "attention": True, "layers": [1],
                             "logit_lens": True})
    assert status == 200
    with Client(inference.target) as c:
        rpc = c.inspect(TEXT, model="tiny-b", top_k=4, attention=True, layers=[1], logit_lens=True)
    assert got == to_json(rpc)
    assert got["model"] == "tiny-b" and got["logit_lens"][0]["layer"] == 0  # defaults are present
    assert base64.b64decode(got["tokens"][0]["piece"]) == rpc.tokens[0].piece
    weights = np.frombuffer(base64.b64decode(got["attention"][0]["weights"]), "<f2").reshape(got["attention"][0]["shape"])
    assert np.array_equal(weights.astype(np.float32), unpack_attention(rpc.attention[0]))
    for body, code, message in [
        ({"text": "hi", "attention": True, "heads": [4]}, 400, "head 4 does not exist"),
        ({"text": "hi", "top_k": 99}, 400, "top_k must be between 1 and 50"),
        ({"text": "hi", "model": "nope"}, 404, "'nope' not found"),
        ({"txt": "hi"}, 400, 'no field named "txt"'),
        ({"text": "hi", "token_ids": [1]}, 400, "either text or token_ids"),
        ({"text": "hi", "top_k": "many"}, 400, "bad InspectRequest"),
        ([1, 2], 400, "JSON object"),
        (b"{not json", 400, "not valid JSON"),
    ]:
        status, err = post(web, body)
        assert status == code, (body, err)
        assert set(err["error"]) == {"message", "type", "param", "code"} and message in err["error"]["message"]
    assert post(web, {"text": "still serving"})[0] == 200


def _chromium():
    """``(chromium, chromedriver)`` paths, or skip (fail under CI=true) saying how to get them."""
    found = shutil.which("chromium"), shutil.which("chromedriver")
    if all(found):
        return found
    message = "Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"
    if os.environ.get("CI") == "true":
        pytest.fail(message + "; .ci/run installs them in CI")
    pytest.skip(message)


@pytest.fixture
def browser():
    chromium, chromedriver = _chromium()
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium must never look for a driver online
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1700", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    yield driver
    driver.quit()


def console_errors(driver, allow_network: bool = False) -> list[dict]:
    return [e for e in driver.get_log("browser")
            if e["level"] == "SEVERE" and not (allow_network and e.get("source") == "network")]


def test_the_page_in_headless_chromium(web, inference, browser, tmp_path, capsys):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, 60)
    browser.get(web + "/inspect")
    wait.until(lambda d: len(Select(d.find_element(By.ID, "model")).options) == 2)
    Select(browser.find_element(By.ID, "model")).select_by_value("tiny")
    topk = browser.find_element(By.ID, "topk")
    topk.clear()
    topk.send_keys("4")
    browser.find_element(By.ID, "text").send_keys(TEXT)
    browser.find_element(By.ID, "run").click()
    with Client(inference.target) as c:
        rpc = c.inspect(TEXT, model="tiny", top_k=4, attention=True, logit_lens=True)
    T = len(rpc.tokens)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#tokens .token")) == T)
    spans = browser.find_elements(By.CSS_SELECTOR, "#tokens .token")
    assert "".join(s.get_attribute("textContent") for s in spans) == TEXT
    assert "tiny: " in browser.find_element(By.ID, "status").text
    # colored by surprise: the most surprising token is the reddest
    alphas = [float(s.value_of_css_property("background-color").rstrip(")").split(",")[-1]) for s in spans[1:]]
    bits = [p.surprise_bits for p in rpc.positions[:-1]]
    assert int(np.argmax(alphas)) == int(np.argmax(bits))

    spans[3].click()  # its top-k next tokens and only its attention lines
    rows = browser.find_elements(By.CSS_SELECTOR, "#topk-table tbody tr")
    assert len(rows) == 4
    assert rows[0].find_element(By.CSS_SELECTOR, ".piece").text == rpc.positions[3].top[0].token.replace(" ", "\u2423")
    assert "came next" in browser.find_element(By.ID, "next-actual").text
    att = unpack_attention(rpc.attention[0])[0]  # layer 0, head 0
    lines = browser.find_elements(By.CSS_SELECTOR, "#lines line")
    drawn = sorted(float(ln.get_attribute("data-weight")) for ln in lines)
    expected = sorted(float(w) for w in att[3, :4] if w >= 0.01)
    assert len(lines) == len(expected) > 0
    assert np.allclose(drawn, expected, atol=1e-3)  # the page's float16 decoding is the RPC's
    Select(browser.find_element(By.ID, "layer")).select_by_value("1")
    Select(browser.find_element(By.ID, "head")).select_by_value("2")
    att = unpack_attention(rpc.attention[1])[2]
    drawn = sorted(float(ln.get_attribute("data-weight")) for ln in browser.find_elements(By.CSS_SELECTOR, "#lines line"))
    assert np.allclose(drawn, sorted(float(w) for w in att[3, :4] if w >= 0.01), atol=1e-3)
    browser.find_element(By.CSS_SELECTOR, "input[name=view][value=heatmap]").click()
    canvas = wait.until(EC.visibility_of_element_located((By.ID, "heatmap")))
    assert int(canvas.get_attribute("width")) >= T * 4
    assert not browser.find_element(By.ID, "lines").is_displayed()
    lens_rows = browser.find_elements(By.CSS_SELECTOR, "#lens tr")
    assert len(lens_rows) == 1 + rpc.n_layer + 1
    assert lens_rows[1].find_element(By.TAG_NAME, "th").text == "emb"
    assert console_errors(browser) == []

    shot = tmp_path / "inspect-page.png"
    assert browser.save_screenshot(str(shot))
    assert_picture(shot)
    with capsys.disabled():
        print(f"\n/inspect page screenshot: {shot}")

    # the server's error is shown on the page (tiny-b's context is 96 tokens)
    Select(browser.find_element(By.ID, "model")).select_by_value("tiny-b")
    browser.find_element(By.ID, "text").send_keys(" word" * 100)
    browser.find_element(By.ID, "run").click()
    error = wait.until(EC.visibility_of_element_located((By.ID, "error")))
    assert "longer than the model's context of 96" in error.text
    assert console_errors(browser, allow_network=True) == []  # the 400 itself is logged as a network error
