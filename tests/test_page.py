"""The page at `/` in a real browser: Debian's Chromium driven by Playwright, against real servers.

`make browser-tools` (a dependency of `make test`) installs both. If the browser cannot start, these tests
fail: they never skip.

`python -m tests.test_page [DIR]` writes the screenshots docs/page.md shows (desktop and phone width).
"""

from __future__ import annotations

import base64
import os
import re
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, Playwright, expect, sync_playwright
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from service.rest.page import snapshot
from tests.conftest import PHOTOS, ROOT, Gate, ServerThread, photo, wait_until
from tests.helpers import metric, scrape

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# A ceiling on each browser wait, like conftest.wait_until's: the tests synchronise on what the page shows.
CEILING_MS = 60_000
TEXT_FILE = {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"hello, I am text"}
UPLOAD_LIMIT = 128 * 1024
CAT_FILE = {"name": "cat.jpg", "mimeType": "image/jpeg", "buffer": photo("cat.jpg")}


def launch(playwright: Playwright) -> Browser:
    # Playwright's own browser download is not reachable here: the system Chromium, by path.
    return playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = launch(playwright)
        yield browser
        browser.close()


def open_page(browser: Browser, url: str, width: int = 1280, height: int = 900) -> Page:
    page = browser.new_page(viewport={"width": width, "height": height})
    page.set_default_timeout(CEILING_MS)
    expect.set_options(timeout=CEILING_MS)
    page.goto(url + "/")
    return page


@pytest.fixture(scope="module")
def held() -> Iterator[tuple[ServerThread, Gate]]:
    """A server whose model thread the test can hold (conftest's Gate), with a small upload limit."""
    gate = Gate()
    srv = ServerThread(hook=gate, max_batch_size=8, max_batch_delay_ms=60_000, max_upload_bytes=UPLOAD_LIMIT)
    srv.start()
    yield srv, gate
    gate.open.set()
    srv.stop()


@pytest.fixture
def page(browser: Browser, server: ServerThread) -> Iterator[Page]:
    page = open_page(browser, server.url)
    yield page
    page.close()


def api(url: str, name: str, data: bytes, k: int | None = None) -> httpx.Response:
    params = {"k": k} if k is not None else None
    return httpx.post(url + "/classify", files=[("img", (name, data))], params=params, timeout=60)


def shown_number(page: Page, selector: str) -> float:
    """A figure of the live view; 0 while it shows none (an en dash)."""
    text = page.locator(selector).inner_text().replace(",", "")
    return 0.0 if text == "\u2013" else float(text)


def body_size(message: str) -> str:
    return re.sub(r"body of \d+ bytes", "body of N bytes", message)


def labels_on_page(page: Page, index: int = 0) -> list[str]:
    return page.locator("#results > li").nth(index).locator(".pred .label").all_inner_texts()


def wait_for_bars(page: Page, count: int, per_image: int = 5) -> None:
    results = page.locator("#results > li")
    expect(results).to_have_count(count)
    for i in range(count):
        expect(results.nth(i).locator(".pred")).to_have_count(per_image)


def test_page_is_served_from_the_package_with_its_assets(server: ServerThread) -> None:
    response = httpx.get(server.url + "/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in response.headers["content-security-policy"]
    for asset, kind in (("page.js", "text/javascript"), ("page.css", "text/css")):
        served = httpx.get(f"{server.url}/static/page/{asset}")
        assert served.status_code == 200 and served.headers["content-type"].startswith(kind)
        assert f"/static/page/{asset}" in response.text
    assert "http://" not in response.text and "https://" not in response.text  # nothing from elsewhere


def test_cat_through_the_file_input_shows_the_api_top5(page: Page, server: ServerThread) -> None:
    expected = api(server.url, "cat.jpg", photo("cat.jpg")).json()["results"][0]["predictions"]
    page.get_by_label("Choose images").set_input_files(PHOTOS / "cat.jpg")
    wait_for_bars(page, 1)
    result = page.locator("#results > li").first
    assert labels_on_page(page) == [p["label"] for p in expected]
    assert result.locator(".pred .wnid").all_inner_texts() == [p["wnid"] for p in expected]
    assert result.locator(".name").inner_text() == "cat.jpg"
    expect(result.locator(".meta")).to_contain_text("ms on the server")  # the Server-Timing header, read
    expect(result.locator("img.thumb")).to_have_attribute("alt", "preview of cat.jpg")


def test_text_file_shows_the_api_error_message(page: Page, server: ServerThread) -> None:
    error = api(server.url, TEXT_FILE["name"], TEXT_FILE["buffer"]).json()["error"]
    page.get_by_label("Choose images").set_input_files(TEXT_FILE)
    shown = page.locator("#results > li .error")
    expect(shown).to_be_visible()
    assert shown.locator("code").inner_text() == error["code"] == "unsupported_image"
    assert shown.locator(".message").inner_text() == error["message"]


def test_a_refused_k_shows_the_api_words_next_to_each_image(page: Page, server: ServerThread) -> None:
    error = api(server.url, "cat.jpg", photo("cat.jpg"), k=101).json()["error"]  # the server allows 1..100
    page.get_by_label("Top k").fill("101")
    page.get_by_label("Choose images").set_input_files(PHOTOS / "cat.jpg")
    expect(page.locator("#results > li .error .message")).to_have_text(error["message"])


def test_broken_and_oversized_files_show_the_api_words(browser: Browser, held: tuple[ServerThread, Gate]) -> None:
    srv, _ = held
    cut = {"name": "cut.jpg", "mimeType": "image/jpeg", "buffer": photo("cat.jpg")[:10_000]}
    big = {"name": "big.jpg", "mimeType": "image/jpeg", "buffer": b"\xff\xd8" + b"\0" * (UPLOAD_LIMIT + 1000)}
    broken = api(srv.url, cut["name"], cut["buffer"]).json()["error"]
    oversized = api(srv.url, big["name"], big["buffer"]).json()["error"]
    page = open_page(browser, srv.url)
    page.get_by_label("Choose images").set_input_files([cut, big])
    errors = page.locator("#results > li .error")
    expect(errors).to_have_count(2)
    assert errors.nth(0).locator("code").inner_text() == broken["code"] == "corrupt_image"
    assert errors.nth(0).locator(".message").inner_text() == broken["message"]
    # The byte count in the message is the whole request body's, multipart framing included: the browser's
    # framing differs from httpx's, so the words are compared around the number.
    assert errors.nth(1).locator("code").inner_text() == oversized["code"] == "payload_too_large"
    shown = errors.nth(1).locator(".message").inner_text()
    assert (
        body_size(shown)
        == body_size(oversized["message"])
        == f"request body of N bytes exceeds the {UPLOAD_LIMIT} byte limit"
    )
    page.close()


def test_three_images_are_sent_together_and_shown_in_upload_order(
    browser: Browser, held: tuple[ServerThread, Gate]
) -> None:
    srv, gate = held
    names = ["coffee.jpg", "cat.jpg", "rocket.jpg"]
    expected = {n: api(srv.url, n, photo(n)).json()["results"][0]["predictions"] for n in names}
    page = open_page(browser, srv.url)
    gate.close()
    try:
        with ThreadPoolExecutor(1) as pool:
            blocker = pool.submit(api, srv.url, "astronaut.jpg", photo("astronaut.jpg"))
            assert gate.entered.wait(30)  # the model thread is held inside a batch
            page.get_by_label("Choose images").set_input_files([PHOTOS / n for n in names])
            # All three wait in the queue at once: the page sent them together, not one after the other.
            wait_until(lambda: metric(scrape(srv.url), "levit_queue_depth") == len(names))
            gate.open.set()
            assert blocker.result().status_code == 200
    finally:
        gate.open.set()
    wait_for_bars(page, len(names))
    assert gate.sizes[-1] == len(names)  # ... and the batcher ran them as one batch
    assert page.locator("#results > li .name").all_inner_texts() == names
    for i, name in enumerate(names):
        assert labels_on_page(page, i) == [p["label"] for p in expected[name]]
    page.close()


def test_paste_and_drop_classify_too(page: Page, server: ServerThread) -> None:
    expected = api(server.url, "cat.jpg", photo("cat.jpg")).json()["results"][0]["predictions"]
    send = """([kind, data]) => {
        const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], kind + ".jpg", { type: "image/jpeg" }));
        if (kind === "pasted") document.dispatchEvent(new ClipboardEvent("paste", { clipboardData: transfer }));
        else document.querySelector("#drop").dispatchEvent(new DragEvent("drop", { dataTransfer: transfer }));
    }"""
    data = base64.b64encode(photo("cat.jpg")).decode()
    page.evaluate(send, ["pasted", data])
    page.evaluate(send, ["dropped", data])
    wait_for_bars(page, 2)
    assert page.locator("#results > li .name").all_inner_texts() == ["pasted.jpg", "dropped.jpg"]
    assert labels_on_page(page, 0) == labels_on_page(page, 1) == [p["label"] for p in expected]


def test_model_card_and_random_weights_banner(page: Page, server: ServerThread) -> None:
    model = httpx.get(server.url + "/v1/model").json()
    assert model["weights"]["pretrained"] is False
    banner = page.locator("#banner")
    expect(banner).to_be_visible()
    expect(banner).to_contain_text("Random weights")
    expect(banner).to_contain_text(model["weights"]["id"])
    card = page.locator("#model")
    expect(card).to_contain_text(model["name"])
    terms = card.locator("dt").all_inner_texts()
    values = dict(zip(terms, card.locator("dd").all_inner_texts()))
    assert values["Weights"] == model["weights"]["id"] == "random(seed=0)"
    assert values["Engine"] == model["engine"] and values["Device"] == model["device"]
    assert values["Dtype"] == model["dtype"]
    assert values["Max batch size"] == str(model["batching"]["max_batch_size"])
    assert values["Max batch delay"] == f"{model['batching']['max_batch_delay_ms']:g} ms"


def test_stats_snapshot_counts_what_the_server_did(server: ServerThread) -> None:
    before = httpx.get(server.url + "/v1/stats").json()
    assert api(server.url, "cat.jpg", photo("cat.jpg")).status_code == 200
    assert api(server.url, TEXT_FILE["name"], TEXT_FILE["buffer"]).status_code == 415
    after = httpx.get(server.url + "/v1/stats").json()
    assert after["images_classified"] - before["images_classified"] == 1
    assert after["batches"]["count"] - before["batches"]["count"] == 1
    assert after["batches"]["sum"] - before["batches"]["sum"] == 1
    assert after["rejections"] - before["rejections"] == 1  # the text file (bad_input)
    bounds = [b for b, _ in after["latency_buckets"]]
    assert bounds[-1] is None and bounds[:-1] == sorted(bounds[:-1])
    # Only answered classifications count in the latency histogram: one more, whatever the other requests.
    assert after["latency_buckets"][-1][1] - before["latency_buckets"][-1][1] == 1
    assert after["time"] >= before["time"] and after["queue_depth"] == 0
    assert "/v1/stats" in httpx.get(server.url + "/openapi.json").json()["paths"]
    samples = scrape(server.url)
    assert metric(samples, "levit_request_duration_seconds_count", route="/v1/stats") >= 2  # its own route label


def test_stats_snapshot_sums_labels_and_keeps_answered_classifications_only() -> None:
    registry = CollectorRegistry()
    latency = Histogram(
        "levit_request_duration_seconds", "", ["protocol", "route", "status"], buckets=(0.01, 0.1), registry=registry
    )
    images = Counter("levit_images_classified", "", registry=registry)
    batch = Histogram("levit_batch_size", "", buckets=(1, 8), registry=registry)
    depth = Gauge("levit_queue_depth", "", registry=registry)
    latency.labels("http", "/classify", "200").observe(0.005)
    latency.labels("grpc", "/levit.v1.Classifier/Classify", "OK").observe(0.05)
    latency.labels("v2-http", "/v2/models/{name}/infer", "200").observe(0.05)
    latency.labels("http", "/classify", "415").observe(0.001)  # refused: not in the percentiles
    latency.labels("http", "/healthz", "200").observe(0.001)  # not a classification
    images.inc(5)
    batch.observe(2)
    batch.observe(3)
    depth.set(4)
    snap = snapshot(registry)
    assert snap["latency_buckets"] == [[0.01, 1], [0.1, 3], [None, 3]]
    assert snap["images_classified"] == 5 and snap["queue_depth"] == 4
    assert snap["batches"] == {"count": 2, "sum": 5} and snap["rejections"] == 0


def test_live_view_shows_throughput_after_traffic(page: Page, server: ServerThread) -> None:
    expect(page.locator("#window")).to_contain_text("over the last")  # two snapshots polled: a window exists
    for name in ("cat.jpg", "coffee.jpg", "rocket.jpg"):
        assert api(server.url, name, photo(name)).status_code == 200
    # Polled from Python: the page's Content-Security-Policy forbids the eval behind wait_for_function.
    wait_until(lambda: shown_number(page, "#tput .value") > 0, interval=0.1)
    wait_until(lambda: shown_number(page, "#batch .value") >= 1, interval=0.1)
    for i in range(3):
        assert shown_number(page, f"#latency .value >> nth={i}") > 0
    assert page.locator("#queue .value").inner_text() == "0"
    assert page.locator("#tput polyline").count() == 1


def test_percentiles_interpolate_like_prometheus(page: Page) -> None:
    buckets = [[0.01, 2], [0.02, 6], [0.05, 10], [None, 10]]
    got = page.evaluate("(b) => [0.5, 0.9, 0.99, 0.1].map((q) => window.levitPage.quantile(q, b))", buckets)
    # rank 5 in (0.01, 0.02] holding 4: 0.01 + 0.01 * 3/4; rank 9 in (0.02, 0.05]: 0.02 + 0.03 * 3/4, ...
    assert got == pytest.approx([0.0175, 0.0425, 0.04925, 0.005])
    assert page.evaluate("window.levitPage.quantile(0.5, [[0.01, 0], [null, 4]])") == 0.01  # +Inf: last bound
    assert page.evaluate("window.levitPage.quantile(0.5, [[0.01, 0], [null, 0]])") is None  # no requests


def test_window_keeps_a_minute_and_restarts_with_the_server(page: Page) -> None:
    got = page.evaluate(
        """() => {
        const snap = (time, images) => ({time, images_classified: images, latency_buckets: [[null, 0]],
                                         batches: {count: 0, sum: 0}, queue_depth: 0, rejections: 0});
        const { remember, between } = window.levitPage;
        const history = [];
        for (let t = 0; t <= 90; t += 1) remember(history, snap(1000 + t, 2 * t));
        const kept = [history[0].time, history[history.length - 1].time];
        const rate = between(history[0], history[history.length - 1]).throughput;
        remember(history, snap(1091, 3));  // a counter went backwards: a restarted server
        return { kept, rate, afterRestart: history.length };
    }"""
    )
    assert got == {"kept": [1030, 1090], "rate": 2, "afterRestart": 1}


def test_keyboard_and_labels(page: Page) -> None:
    controls = page.locator("input, button, select, textarea")
    for i in range(controls.count()):  # every control has an accessible name
        control = controls.nth(i)
        name = control.evaluate("(c) => (c.labels && c.labels.length ? c.labels[0].textContent : c.textContent)")
        assert name.strip(), control.evaluate("(c) => c.outerHTML")
    assert page.locator("html").get_attribute("lang") == "en"
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.className") == "skip"
    page.keyboard.press("Enter")  # skips the header: the next stop is the file input
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "files"  # reachable by keyboard, opens the dialog
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "k"
    # Choose a file, then change k from the keyboard: the same image is classified again with the new k.
    page.get_by_label("Choose images").set_input_files(PHOTOS / "cat.jpg")
    wait_for_bars(page, 1)
    page.get_by_label("Top k").focus()
    page.keyboard.press("Control+A")
    page.keyboard.type("3")
    page.keyboard.press("Tab")  # commits the value: `change`
    wait_for_bars(page, 1, per_image=3)
    page.keyboard.press("Enter")  # focus is on "Clear results" now
    expect(page.locator("#results > li")).to_have_count(0)


def test_phone_width_has_no_sideways_scroll(browser: Browser, server: ServerThread) -> None:
    page = open_page(browser, server.url, width=375, height=800)
    page.get_by_label("Choose images").set_input_files([CAT_FILE, TEXT_FILE])
    expect(page.locator("#results > li")).to_have_count(2)
    expect(page.locator("#results > li").first.locator(".pred")).to_have_count(5)
    expect(page.locator("#results > li .error")).to_be_visible()
    assert page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")
    page.close()


def screenshots(out: Path) -> None:
    """docs/page.png (desktop) and docs/page-phone.png, after some traffic and a classification."""
    srv = ServerThread(max_batch_size=8, engine="trace").start()
    try:
        with sync_playwright() as playwright:
            browser = launch(playwright)
            for path, width, height in ((out / "page.png", 1280, 900), (out / "page-phone.png", 390, 1400)):
                page = open_page(browser, srv.url, width, height)
                expect(page.locator("#window")).to_contain_text("over the last")
                with ThreadPoolExecutor(4) as pool:
                    for _ in range(6):
                        list(pool.map(lambda n: api(srv.url, n, photo(n)), ["cat.jpg", "coffee.jpg"] * 2))
                        page.wait_for_timeout(1000)
                page.get_by_label("Choose images").set_input_files([CAT_FILE, TEXT_FILE])
                expect(page.locator("#results .pred")).to_have_count(5)
                expect(page.locator("#results .error")).to_be_visible()
                page.wait_for_timeout(1500)  # one more poll, so the charts include the page's own requests
                page.screenshot(path=str(path), full_page=True)
                page.close()
            browser.close()
    finally:
        srv.stop()


if __name__ == "__main__":
    screenshots(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs")
