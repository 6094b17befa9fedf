"""The reader study end to end in a real browser (issue #15, "Must show"): Debian's headless Chromium
drives the real pages of ``medisyn study serve`` (a subprocess on loopback) for two readers of a
study built from a registered tiny model and real test-split images.

Checked: the report's numbers equal a hand computation from the readers' clicks; a reload mid-study
resumes at the next unanswered image; reader A's token neither reads nor writes reader B's answers;
no page, URL, image name, image metadata, image size or HTTP header tells a reader which images are
synthetic; a double-submitted answer is stored once. Screenshots go to /tmp/study-shots/.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from helpers import png_chunks, register_tiny_version, write_dataset
from medisyn.demo.services import _ProcessService
from medisyn.study import db

pytestmark = [pytest.mark.slow, pytest.mark.mlflow]

SHOTS = Path("/tmp/study-shots")
CLASSES = ["drusen", "normal findings"]
STUDY_SETTINGS = [
    "study.images_per_class=2", "study.image_size=64", "study.task=oct",
    "study.tasks=[{name: oct, specialty: ophthalmology, image_type: oct, question: 'Which condition does this "
    "image show?', prompt_template: 'Optical coherence tomography image showing {label}.', "
    "classes: [drusen, normal findings]}]",
]


class StudyServer(_ProcessService):
    """``medisyn study serve`` in its own process group on loopback (stopped with every child)."""

    name = "study"

    def __init__(self, db_url: str):
        super().__init__(None, 60.0)
        self.db_url = db_url

    def _command(self) -> list[str]:
        return [sys.executable, "-m", "medisyn.cli", "study", "serve", "--db", self.db_url, "--port", str(self.port)]

    def _ready_path(self) -> str:
        return "/healthz"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    import mlflow

    from medisyn import tracking
    from medisyn.study.create import create_study

    root = tmp_path_factory.mktemp("study-browser")
    cfg, model = register_tiny_version(root, STUDY_SETTINGS)
    dataset = write_dataset(str(root / "dataset"), n_per_specialty=8, split="test")
    url = f"sqlite:///{root / 'study.db'}"
    created, admin = create_study(cfg, model, dataset, db_url=url)
    engine = db.open_db(url)
    tokens = {name: db.add_reader(engine, created.study_id, name) for name in ("Reader A", "Reader B")}
    config_file = root / "config.yaml"
    config_file.write_text(cfg.to_yaml())
    with StudyServer(url) as server:
        yield dict(cfg=cfg, root=root, url=url, engine=engine, created=created, admin=admin, tokens=tokens,
                   server=server, config=str(config_file))
    db.dispose_all()
    mlflow.set_tracking_uri(None)
    tracking._CONFIGURED = None


def http(url: str, data: dict | None = None) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) without following redirects."""
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    body = urllib.parse.urlencode(data).encode() if data is not None else None
    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(urllib.request.Request(url, data=body), timeout=10) as resp:
            return resp.status, dict(resp.headers.items()), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers.items()), exc.read()


def answers_of(engine, reader_name: str) -> dict[str, tuple[str, int]]:
    from sqlalchemy import select

    with db.session(engine) as s:
        rows = s.execute(select(db.Answer.item_id, db.Answer.answer, db.Answer.confidence)
                         .join(db.Reader, db.Reader.id == db.Answer.reader_id)
                         .where(db.Reader.name == reader_name)).all()
    return {i: (a, c) for i, a, c in rows}


def truth(engine, study_id: str) -> dict[str, tuple[str, str]]:
    from sqlalchemy import select

    with db.session(engine) as s:
        return {i.id: (i.origin, i.true_class) for i in s.scalars(
            select(db.StudyItem).where(db.StudyItem.study_id == study_id))}


LEAKS = re.compile(r"\b(real|synthetic|generated|generat\w*|seed|prompt|origin|fake|model|medisyn-demo|"
                   r"image_hash|mlflow)\b", re.I)


def normalised(html: str, item_id: str, token: str) -> str:
    """A reading page with what may differ between images (the opaque id, the reader's token, the
    counters) masked: what is left must be the same page for every image, real or synthetic."""
    return re.sub(r"\d+", "N", html.replace(item_id, "ITEM").replace(token, "TOKEN"))


def reading_state(driver) -> tuple[int, str]:
    """(1-based image number, item id) of the page the browser shows."""
    from selenium.webdriver.common.by import By

    heading = driver.find_element(By.TAG_NAME, "h1").text
    number = int(re.fullmatch(r"Image (\d+) of \d+", heading).group(1))
    src = driver.find_element(By.CSS_SELECTOR, "main img").get_attribute("src")
    return number, src.rsplit("/", 1)[1]


def wait_for_next_page(driver, old_page) -> None:
    """Wait until the answer's POST/redirect/GET has replaced ``old_page`` (the <html> element)."""
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 20).until(expected_conditions.staleness_of(old_page))
    WebDriverWait(driver, 20).until(lambda d: d.execute_script("return document.readyState") == "complete")


def answer_by_mouse(driver, class_index: int, confidence: int) -> None:
    from selenium.webdriver.common.by import By

    page = driver.find_element(By.TAG_NAME, "html")
    driver.find_element(By.CSS_SELECTOR, f'label[for="label-{class_index + 1}"]').click()
    driver.find_element(By.CSS_SELECTOR, f'label[for="confidence-{confidence}"]').click()
    driver.find_element(By.CSS_SELECTOR, 'button[type="submit"]').click()
    wait_for_next_page(driver, page)


def answer_by_keyboard(driver, class_index: int, confidence: int) -> None:
    """Keyboard only: the first choice has focus on load; Space picks, arrows move, Tab, Enter."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    page = driver.find_element(By.TAG_NAME, "html")
    focused = driver.switch_to.active_element
    assert focused.get_attribute("id") == "label-1", "the first class choice must have focus on load"
    keys = [Keys.SPACE] + [Keys.ARROW_DOWN] * class_index + [Keys.TAB, Keys.SPACE] + \
        [Keys.ARROW_RIGHT] * (confidence - 1) + [Keys.TAB]
    ActionChains(driver).send_keys(*keys).perform()
    assert driver.switch_to.active_element.tag_name == "button"  # focus order: classes, confidence, submit
    assert driver.find_element(By.ID, f"label-{class_index + 1}").is_selected()
    assert driver.find_element(By.ID, f"confidence-{confidence}").is_selected()
    ActionChains(driver).send_keys(Keys.ENTER).perform()
    wait_for_next_page(driver, page)


CONTRAST_JS = """
const out = [];
for (const el of document.querySelectorAll('h1, legend, label, p, button, a, th, td')) {
  if (!el.offsetParent || !el.textContent.trim()) continue;
  let bg = 'rgba(0, 0, 0, 0)', node = el;
  while (node && (bg === 'rgba(0, 0, 0, 0)' || bg === 'transparent')) {
    bg = getComputedStyle(node).backgroundColor; node = node.parentElement;
  }
  out.push([el.tagName + ':' + el.textContent.trim().slice(0, 30), getComputedStyle(el).color, bg]);
}
return out;
"""


def _luminance(css: str) -> float:
    r, g, b = (int(v) / 255 for v in re.findall(r"\d+", css)[:3])
    lin = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in (r, g, b)]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def check_accessibility(driver) -> None:
    """Every visible text meets WCAG AAA contrast (7:1); every input has a label; the image has alt text."""
    from selenium.webdriver.common.by import By

    pairs = driver.execute_script(CONTRAST_JS)
    assert len(pairs) >= 8
    for what, fg, bg in pairs:
        lo, hi = sorted((_luminance(fg), _luminance(bg if bg != "rgba(0, 0, 0, 0)" else "rgb(255,255,255)")))
        assert (hi + 0.05) / (lo + 0.05) >= 7.0, (what, fg, bg)
    for field in driver.find_elements(By.CSS_SELECTOR, "input:not([type=hidden])"):
        assert driver.find_elements(By.CSS_SELECTOR, f'label[for="{field.get_attribute("id")}"]'), field
    assert driver.find_element(By.CSS_SELECTOR, "main img").get_attribute("alt").startswith("Study image ")
    assert len(driver.find_elements(By.TAG_NAME, "fieldset")) == 2 == len(driver.find_elements(By.TAG_NAME, "legend"))


def choice(reader: str, number: int) -> tuple[int, int]:
    """What the reader clicks on image ``number``: a fixed pattern, different per reader."""
    if reader == "Reader A":
        return (number // 2) % 2, 1 + number % 5
    return number % 2, 5 - number % 3


def test_two_readers_complete_a_blinded_study_in_chromium(study, chromium):
    from selenium.webdriver.common.by import By

    base, engine, created = study["server"].url, study["engine"], study["created"]
    total = created.n_items
    tokens = study["tokens"]
    clicks: dict[str, dict[str, tuple[str, int]]] = {"Reader A": {}, "Reader B": {}}
    pages: list[tuple[str, str]] = []  # (normalised html, item id) of every reading page shown
    SHOTS.mkdir(parents=True, exist_ok=True)

    def read(reader: str, stop_after: int | None = None, keyboard: bool = False) -> None:
        chromium.get(f"{base}/read/{tokens[reader]}")
        while chromium.find_element(By.TAG_NAME, "h1").text.startswith("Image "):
            number, item = reading_state(chromium)
            assert number == len(clicks[reader]) + 1  # one image at a time, in order, none skipped
            assert item not in clicks[reader]
            pages.append((normalised(chromium.page_source, item, tokens[reader]), item))
            if reader == "Reader A" and number == 2:
                chromium.save_screenshot(str(SHOTS / "reading-page.png"))
                check_accessibility(chromium)
            c, conf = choice(reader, number)
            (answer_by_keyboard if keyboard else answer_by_mouse)(chromium, c, conf)
            clicks[reader][item] = (CLASSES[c], conf)
            if stop_after is not None and len(clicks[reader]) == stop_after:
                return

    # Reader A answers three images, reloads, pauses, comes back: each time the next unanswered image.
    read("Reader A", stop_after=3)
    chromium.refresh()
    number, item = reading_state(chromium)
    assert number == 4 and item not in clicks["Reader A"]
    chromium.find_element(By.PARTIAL_LINK_TEXT, "Pause").click()
    assert "3 answers are saved" in chromium.find_element(By.TAG_NAME, "main").text
    chromium.get("about:blank")
    chromium.get(f"{base}/read/{tokens['Reader A']}")
    assert reading_state(chromium) == (4, item)

    # A double-submitted answer (the same form sent twice, the second with another answer) stores once.
    submit = f"{base}/read/{tokens['Reader A']}/answer"
    status1, _, _ = http(submit, {"item": item, "label": CLASSES[0], "confidence": 4})
    status2, _, _ = http(submit, {"item": item, "label": CLASSES[1], "confidence": 1})
    assert status1 == status2 == 303
    assert answers_of(engine, "Reader A")[item] == (CLASSES[0], 4)  # the first answer stands
    assert len(answers_of(engine, "Reader A")) == 4
    clicks["Reader A"][item] = (CLASSES[0], 4)
    chromium.refresh()
    assert reading_state(chromium)[0] == 5
    read("Reader A")
    assert chromium.find_element(By.TAG_NAME, "h1").text == "Thank you"

    # Reader B, keyboard only, in the same browser.
    read("Reader B", keyboard=True)
    assert answers_of(engine, "Reader A") == clicks["Reader A"]
    assert answers_of(engine, "Reader B") == clicks["Reader B"]

    # Reader A's token can neither read nor write reader B's answers.
    before_b = answers_of(engine, "Reader B")
    some_item = next(iter(before_b))
    for path in (f"/read/{tokens['Reader A']}", f"/read/{tokens['Reader A']}/pause"):
        status, _, body = http(base + path)
        assert status == 200  # A is done: these pages offer no choices, so no class name may appear at all
        assert not any(c in body.decode() for c in CLASSES) and "Reader B" not in body.decode()
    status, _, _ = http(f"{base}/read/{tokens['Reader A']}/answer",
                        {"item": some_item, "label": CLASSES[1], "confidence": 2, "reader": "Reader B",
                         "token": tokens["Reader B"]})
    assert status == 303 and answers_of(engine, "Reader B") == before_b  # nothing of B's changed
    assert answers_of(engine, "Reader A") == clicks["Reader A"]  # A had answered it: still the first answer
    assert http(f"{base}/admin/{tokens['Reader A']}")[0] == 404  # a reader token is not an admin token
    assert http(f"{base}/read/{tokens['Reader A'][:-2]}")[0] == 404
    assert http(f"{base}/read/{tokens['Reader A']}/answer", {"item": "nope", "label": CLASSES[0],
                                                              "confidence": 3})[0] == 400

    # Blinding: pages, URLs, image names, bytes, metadata, sizes and headers.
    items = truth(engine, created.study_id)
    # every reading page both readers saw (A answered image 4 by a resent form, not through the page)
    assert len(pages) == 2 * total - 1 and {item for _, item in pages} == set(items)
    template = {html for html, _ in pages}
    assert len(template) == 1, "reading pages differ beyond the image id and the counters"
    only_page = template.pop()
    assert not LEAKS.search(re.sub(r"<style.*?</style>", "", only_page, flags=re.S)), LEAKS.search(only_page)
    image_headers, sizes = [], set()
    for item_id in items:
        assert re.fullmatch(r"[A-Za-z0-9_-]{16}", item_id)  # random, opaque, fixed length
        status, headers, body = http(f"{base}/read/{tokens['Reader A']}/image/{item_id}")
        assert status == 200
        headers.pop("Date", None)
        image_headers.append(tuple(sorted(headers.items())))
        sizes.add(len(body))
        assert png_chunks(body) == ["IHDR", "IDAT", "IEND"] or set(png_chunks(body)) == {"IHDR", "IDAT", "IEND"}
        img = Image.open(io.BytesIO(body))
        assert img.mode == "RGB" and img.size == (64, 64) and not img.info and not img.getexif()
    assert len(set(image_headers)) == 1, "image responses differ in their headers"
    headers = dict(image_headers[0])
    assert len(sizes) == 1 and headers["Content-Length"] == str(sizes.pop())
    assert headers["Cache-Control"] == "no-store" and "ETag" not in headers and "Last-Modified" not in headers
    assert "Content-Disposition" not in headers and "Set-Cookie" not in headers
    page_status, page_headers, _ = http(f"{base}/read/{tokens['Reader A']}")
    assert page_headers["Referrer-Policy"] == "no-referrer" and "default-src 'none'" in page_headers[
        "Content-Security-Policy"]
    css = http(f"{base}/assets/study.css")[2].decode()
    assert "url(" not in css and "@import" not in css  # offline: no external assets
    assert not re.search(r"(src|href)=\"(https?:)?//", only_page)

    # Admin view: progress per reader, never an answer.
    chromium.get(f"{base}/admin/{study['admin']}")
    admin_text = chromium.find_element(By.TAG_NAME, "main").text
    assert f"{total} / {total}" in admin_text and "Reader A" in admin_text and "Reader B" in admin_text
    assert not any(c in admin_text for c in CLASSES)

    # Close, report, and compare with a hand computation from the clicks.
    from medisyn.cli import main
    from medisyn.study.report import load_study_report

    assert main(["study", "report", "--config", study["config"], "--db", study["url"], "--study",
                 created.study_id, "--out", str(study["root"] / "report")]) == 2  # still open: refused
    assert main(["study", "close", "--config", study["config"], "--db", study["url"], "--study",
                 created.study_id]) == 0
    status, _, body = http(f"{base}/read/{tokens['Reader A']}/answer", {"item": some_item, "label": CLASSES[0],
                                                                         "confidence": 3})
    assert status == 409  # closed: no more answers
    out = study["root"] / "report"
    assert main(["study", "report", "--config", study["config"], "--db", study["url"], "--study",
                 created.study_id, "--out", str(out)]) == 0
    report = load_study_report(str(out))
    stats = report.stats
    for reader_stats in stats.readers:
        mine = clicks[reader_stats.reader]
        for origin in ("real", "synthetic"):
            got = getattr(reader_stats, origin)
            rows = [(a, c, items[i][1]) for i, (a, c) in mine.items() if items[i][0] == origin]
            correct = sum(1 for a, _, t in rows if a == t)
            confs = [c for _, c, _ in rows]
            mean = sum(confs) / len(confs)
            sd = (sum((c - mean) ** 2 for c in confs) / (len(confs) - 1)) ** 0.5
            assert (got.n, got.correct) == (len(rows), correct) == (2 * len(CLASSES), correct)
            assert got.accuracy == pytest.approx(correct / len(rows))
            assert got.confidence_mean == pytest.approx(mean) and got.confidence_sd == pytest.approx(sd)
            confusion = [[sum(1 for a, _, t in rows if t == ti and a == ai) for ai in CLASSES] for ti in CLASSES]
            assert [list(r) for r in reader_stats.confusion[origin]] == confusion
    for origin in ("real", "synthetic"):
        rows = [(a, items[i][1]) for r in clicks.values() for i, (a, _c) in r.items() if items[i][0] == origin]
        assert stats.pooled[origin].correct == sum(1 for a, t in rows if a == t)
        assert stats.pooled[origin].n == len(rows)
        accs = [sum(1 for i, (a, _c) in r.items() if items[i] == (origin, a)) / (2 * len(CLASSES))
                for r in clicks.values()]
        assert stats.accuracy_across_readers[origin][0] == pytest.approx(sum(accs) / 2)
    # Fleiss' kappa by hand: two raters, two categories.
    n_items = len(items)
    agree = sum(1 for i in items if clicks["Reader A"][i][0] == clicks["Reader B"][i][0])
    p_bar = agree / n_items  # P_i is 1 when both raters agree, 0 otherwise (n = 2)
    share = [sum(1 for r in clicks.values() for a, _ in r.values() if a == c) / (2 * n_items) for c in CLASSES]
    p_e = sum(p * p for p in share)
    assert stats.fleiss_kappa["all"] == pytest.approx((p_bar - p_e) / (1 - p_e))
    assert stats.kappa_items["all"] == n_items

    # Logged on the model version, with the study's definition as an artifact.
    from mlflow import MlflowClient

    store = study["cfg"].tracking.tracking_uri
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    mv = client.get_model_version(created.model_name, created.model_version)
    assert mv.tags["reader_study.study_id"] == created.study_id
    assert mv.tags["reader_study.report_uri"] == report.out_uri
    assert report.mlflow_run_id == mv.run_id
    listed = {f.path for f in client.list_artifacts(mv.run_id, f"reader_study/{created.study_id}")}
    assert {f"reader_study/{created.study_id}/{n}" for n in ("definition.json", "reader_study.png", "table.csv",
                                                              "result.json")} <= listed
    definition = json.loads(Path(client.download_artifacts(
        mv.run_id, f"reader_study/{created.study_id}/definition.json", str(study["root"]))).read_text())
    assert {it["id"]: (it["origin"], it["class"]) for it in definition["items"]} == items
    assert definition["seed"] == created.seed and definition["classes"] == CLASSES
    assert load_study_report(f"models:/{created.model_name}/{created.model_version}") == report

    shutil.copy(Path(report.figure_uri.removeprefix("file://")), SHOTS / "report-figure.png")
    shutil.copy(Path(report.confusion_figure_uri.removeprefix("file://")), SHOTS / "confusion.png")
    chromium.get(f"{base}/admin/{study['admin']}")
    chromium.save_screenshot(str(SHOTS / "admin-page.png"))
