"""The console in a real browser: DCMTK storescu (the scanner) -> `mriqa serve` (bundled model)
-> rescan banner in headless Chromium, acknowledged by a technologist, audited in the database.

One node (SQLite) serves the whole module; each test gets its own browser context (cookies).
On failure the test prints the node's log tail and saves a screenshot next to it.
"""

from __future__ import annotations

import json
import shutil
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from mriqa_node.db.engine import make_engine, make_sessionmaker
from mriqa_node.db.models import Alert, Series, SeriesVerdict
from mriqa_node.node import BUNDLED_MODEL
from mriqa_node.phantom import synth_series, write_series
from mriqa_node.services.users import UserService
from tests.conftest import storescu, write_config
from tests.peers import NodeProcess, free_port, wait_for

sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
PASSWORD = "console-test-pass"
TECH, RADIOLOGIST = "tina.tech", "rob.rad"
VERDICT_TIMEOUT = 60.0  # s from the last C-STORE to the banner; scoring is ~1 s here
LOG_TAIL = 60  # node log lines printed when a test fails


# -- the node --------------------------------------------------------------------------------


@dataclass
class Console:
    node: NodeProcess
    db_url: str
    base_url: str
    root: Path

    def log_tail(self, lines: int = LOG_TAIL) -> str:
        return "\n".join(self.node.log().splitlines()[-lines:])

    def query(self, statement):
        """Rows from the node's database, read without taking SQLite's write lock."""
        engine = make_engine(self.db_url, readonly=True)
        try:
            with make_sessionmaker(engine)() as session:
                return session.execute(statement).all()
        finally:
            engine.dispose()

    def send(self, name: str, n: int, motion: float, seed: int, description: str) -> str:
        """Write a phantom series and send it with DCMTK storescu; returns its series UID."""
        datasets = synth_series(n, motion=motion, seed=seed, series_description=description)
        files = write_series(datasets, self.root / name)
        storescu(self.node.port, files)
        return str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)

    def verdict(self, series_uid: str) -> SeriesVerdict | None:
        rows = self.query(
            select(SeriesVerdict)
            .join(Series, SeriesVerdict.series_id == Series.id)
            .where(Series.series_uid == series_uid)
            .order_by(SeriesVerdict.id.desc())
        )
        return rows[0][0] if rows else None


def without_guard(model: Path, root: Path) -> Path:
    """A copy of ``model`` without its OOD guard. The console is under test here, not the
    model: which phantom slices a guard stops changes with the model (2.4.0's stops half the
    slices of one of the ten motion series below), and a series it stops raises no alert. The
    guard has its own tests (test_scope.py, test_bundled_real.py)."""
    target = root / "model"
    shutil.copytree(model, target, ignore=shutil.ignore_patterns("ood.npz"))
    meta = json.loads((target / "model.json").read_text())
    (target / "model.json").write_text(json.dumps({**meta, "ood": {}}))
    return target


@contextmanager
def running_console(root: Path, series_threshold: float) -> Iterator[Console]:
    """A real node with the bundled (trained) model, unguarded, and two users made in its
    database."""
    db_url = f"sqlite:///{root / 'mriqa.db'}"
    port, http_port = free_port(), free_port()
    model = without_guard(BUNDLED_MODEL, root)
    config = write_config(
        root / "node.toml", port, db_url, model,  # the trained model: [model] path
        series={"idle_seconds": 1.0, "release_grace_seconds": 0.5},
        console={"port": http_port},
        verdict={"series_threshold": series_threshold},
    )  # fmt: skip
    node = NodeProcess(config, port, root / "node.log").start(timeout=120)
    try:
        engine = make_engine(db_url)  # `serve` migrated the database before listening
        users = UserService(make_sessionmaker(engine))
        users.add(TECH, "technologist", PASSWORD)
        users.add(RADIOLOGIST, "radiologist", PASSWORD)
        engine.dispose()
        yield Console(node, db_url, f"http://127.0.0.1:{http_port}", root)
    finally:
        node.stop()


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    # The console is under test here, not the model: a threshold the phantom motion series
    # clears (the bundled model's own is set for real anatomy; see its card).
    with running_console(tmp_path_factory.mktemp("console"), series_threshold=0.5) as c:
        yield c


# -- the browser -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} missing (Debian package chromium)")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield browser
        browser.close()


@pytest.fixture
def context(browser, console: Console):
    """A fresh browser profile (no cookies) per test; tall enough that no slice is lazy."""
    ctx = browser.new_context(base_url=console.base_url, viewport={"width": 1400, "height": 2000})
    ctx.set_default_timeout(15_000)
    yield ctx
    ctx.close()


def sign_in(context, console: Console, user: str, path: str = "/"):
    """Through the real login form, as a person would: ask for the page, get the form."""
    page = context.new_page()
    page.goto(path)
    expect(page).to_have_url(f"{console.base_url}/login?next={path}")
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", PASSWORD)
    page.click("form.login button[type=submit]")
    expect(page).to_have_url(f"{console.base_url}{path}")
    return page


@contextmanager
def explained(console: Console, page, tmp_path: Path) -> Iterator[None]:
    """On failure: print the node log tail and save a screenshot (shown with the failure)."""
    try:
        yield
    except BaseException:
        print(f"--- node log, last {LOG_TAIL} lines ---\n{console.log_tail()}")
        try:
            shot = tmp_path / "failure.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"--- screenshot: {shot} ({page.url})")
        except Exception:
            print(f"--- no screenshot:\n{traceback.format_exc(limit=1)}")
        raise


def loaded_images(page, selector: str) -> list[int]:
    """naturalWidth of every image matched, once each has finished loading (or failed)."""
    page.locator(selector).last.scroll_into_view_if_needed()  # lazy images: bring them in
    page.wait_for_function(
        "sel => [...document.querySelectorAll(sel)].every(i => i.complete)", arg=selector,
        timeout=60_000,
    )  # fmt: skip
    return page.eval_on_selector_all(selector, "imgs => imgs.map(i => i.naturalWidth)")


# -- the tests -------------------------------------------------------------------------------


def test_rescan_banner_live_then_acknowledged(console: Console, context, tmp_path: Path) -> None:
    page = sign_in(context, console, TECH)
    with explained(console, page, tmp_path):
        expect(page.locator("#live-status.live-on")).to_have_count(1)  # the event stream is up
        page.evaluate("window.__noReload = true")
        assert page.locator("section.alert-banner").count() == 0

        uid = console.send("motion", 12, motion=1.0, seed=21, description="BROWSER MOTION AX")
        banner = page.locator("section.alert-banner[data-alert-id]")
        expect(banner).to_have_count(1, timeout=VERDICT_TIMEOUT * 1000)
        assert page.evaluate("window.__noReload") is True, "the page reloaded"
        expect(banner).to_be_visible()
        red, green, blue = banner.evaluate(
            "b => getComputedStyle(b).backgroundColor.match(/\\d+/g).slice(0, 3).map(Number)"
        )
        assert red >= 120 and red > 2 * green and red > 2 * blue, (red, green, blue)

        verdict = console.verdict(uid)
        assert verdict is not None and verdict.label == "non_diagnostic", verdict
        alert_id = int(banner.get_attribute("data-alert-id"))
        (alert,) = console.query(select(Alert).where(Alert.id == alert_id))[0]
        assert alert.verdict_id == verdict.id and alert.state == "open"
        assert page.evaluate(f"window.mriqa.bannerShownAt['{alert_id}']") > 0

        worst = ", ".join(str(w["slice_index"] + 1) for w in verdict.worst_slices)
        expect(banner.locator(".alert-series")).to_have_text("BROWSER MOTION AX")
        expect(banner).to_contain_text("NON-DIAGNOSTIC")
        expect(banner).to_contain_text(f"Worst slices: {worst}.")
        expect(banner.locator(f'a[href="/series/{uid}"]')).to_have_count(1)

        row = page.locator(f'#series-rows tr[data-series-uid="{uid}"]')
        expect(row.locator(".badge.badge-non_diagnostic")).to_have_text("non-diagnostic")
        expect(row).to_contain_text("BROWSER MOTION AX")

        shot = tmp_path / "banner.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.is_file() and shot.stat().st_size > 1000
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        banner.locator(".ack-comment").fill("patient moved; repeated with breath-hold")
        banner.locator("button[data-action=rescanned]").click()
        expect(banner).to_have_count(0)
        assert page.evaluate("window.__noReload") is True

        (alert,) = console.query(select(Alert).where(Alert.id == alert_id))[0]
        assert alert.state == "acknowledged"
        assert alert.acknowledged_by == TECH and alert.action == "rescanned"
        assert alert.comment == "patient moved; repeated with breath-hold"
        assert alert.acknowledged_at is not None

        page.goto("/alerts")
        history = page.locator(f'table.history tr[data-alert-id="{alert_id}"]')
        expect(history).to_contain_text("BROWSER MOTION AX")
        expect(history).to_contain_text("acknowledged")
        expect(history).to_contain_text("rescanned")
        expect(history).to_contain_text(TECH)
        expect(history).to_contain_text("patient moved; repeated with breath-hold")
        expect(page.locator("section.alert-banner")).to_have_count(0)  # nothing left open

        page.goto(f"/series/{uid}")
        figures = page.locator("#slices figure.slice")
        expect(figures).to_have_count(12)
        expect(page.locator(".series-head .badge-non_diagnostic")).to_have_count(1)
        widths = loaded_images(page, ".slice img")
        assert len(widths) == 24, "a thumbnail and a heat map per slice"
        assert all(w > 0 for w in widths), f"images that did not load: {widths}"
        expect(page.locator(".slice.worst")).to_have_count(len(verdict.worst_slices))
        assert len(verdict.worst_slices) > 0
        worst_captions = page.locator(".slice.worst figcaption").all_inner_texts()
        assert sorted(int(c.split()[0].lstrip("#")) for c in worst_captions) == sorted(
            w["slice_index"] + 1 for w in verdict.worst_slices
        )

        page.locator(".slice.worst .pic").first.click()
        viewer = page.locator("dialog#viewer")
        expect(viewer).to_have_attribute("open", "")
        assert loaded_images(page, "dialog#viewer img")[0] == 512

        # Scanners: the series' scanner charted, too new to compare with its own past.
        page.goto("/scanners")
        section = page.locator("section.scanner")
        expect(section).to_have_count(1)
        expect(section.locator(".drift-state")).to_have_text("too few series")
        box = section.locator("svg.drift-chart").bounding_box()
        assert box and box["width"] > 300 and box["height"] > 60, box
        expect(section.locator("circle.alert-rate")).to_have_count(1)


def test_roles_and_sign_in_required(console: Console, context, browser, tmp_path: Path) -> None:
    # Not signed in: the console sends you to the login form, and the API says 401.
    page = context.new_page()
    with explained(console, page, tmp_path):
        page.goto("/")
        expect(page).to_have_url(f"{console.base_url}/login?next=/")
        expect(page.locator("form.login input[name=csrf_token]")).to_have_count(1)
        assert page.request.get("/api/series").status == 401

        page.fill("input[name=username]", TECH)
        page.fill("input[name=password]", "not-the-password")
        page.click("form.login button[type=submit]")
        expect(page.locator("form.login .error")).to_contain_text("Wrong user name or password")

    uid = console.send("clean", 4, motion=0.0, seed=22, description="BROWSER CLEAN AX")
    wait_for(lambda: console.verdict(uid), VERDICT_TIMEOUT, what="a verdict for the clean series")
    assert console.verdict(uid).label == "diagnostic"

    # A technologist may acknowledge alerts but not rate slices: no rating buttons at all.
    page = sign_in(context, console, TECH, f"/series/{uid}")
    with explained(console, page, tmp_path):
        expect(page.locator("#slices figure.slice")).to_have_count(4)
        expect(page.locator(".series-head .badge-diagnostic")).to_have_count(1)
        expect(page.locator("button.rate")).to_have_count(0)
        expect(page.locator(".rate-series, .rate-slice")).to_have_count(0)
        page.goto("/")
        row = page.locator(f'#series-rows tr[data-series-uid="{uid}"]')
        expect(row.locator(".badge.badge-diagnostic")).to_have_text("diagnostic")

    # The control: a radiologist (other profile) gets the buttons on the same page.
    other = browser.new_context(base_url=console.base_url)
    try:
        page = sign_in(other, console, RADIOLOGIST, f"/series/{uid}")
        with explained(console, page, tmp_path):
            expect(page.locator(".rate-series button.rate")).to_have_count(3)
            expect(page.locator(".rate-slice button.rate")).to_have_count(4 * 3)
    finally:
        other.close()


def test_ten_open_alerts_one_banner_a_compact_list_and_the_series_on_screen(
    browser, tmp_path: Path
) -> None:
    """A 1280x800 screen: the newest alert is the banner and says how many more are open; the
    older ones are a compact list, each with its buttons; the series list stays visible; the
    tone sounds for each new alert. Its own node, where every scored series alerts (series
    threshold 0): the console is under test, not the model."""
    (tmp_path / "node").mkdir()
    with running_console(tmp_path / "node", series_threshold=0.0) as console:
        ctx = browser.new_context(base_url=console.base_url,
                                  viewport={"width": 1280, "height": 800})  # fmt: skip
        ctx.set_default_timeout(15_000)
        page = sign_in(ctx, console, TECH)
        with explained(console, page, tmp_path):
            expect(page.locator("#live-status.live-on")).to_have_count(1)
            for i in range(10):
                console.send(f"many{i}", 4, motion=1.0, seed=300 + i, description=f"MANY {i}")
            banners = page.locator("section.alert-banner[data-alert-id]")
            expect(banners).to_have_count(10, timeout=VERDICT_TIMEOUT * 1000)
            assert page.evaluate("window.mriqa.tones") >= 10
            newest = banners.first
            expect(newest).to_contain_text("9 more open alerts below.")
            big, small = newest.bounding_box(), banners.nth(1).bounding_box()
            assert small["height"] < big["height"] / 2, (big, small)
            rows = page.locator("#series-rows tr")
            expect(rows.first).to_be_visible()
            # Live updates may redraw the row between two calls: ask until it is laid out.
            top = wait_for(rows.first.bounding_box, 15, 0.1, "the first series row laid out")
            assert top["y"] + top["height"] <= 800, top  # the live list is on the screen
            shot = tmp_path / "ten-alerts.png"
            page.screenshot(path=str(shot))
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            for left in range(9, -1, -1):  # each one acknowledged from the list, newest first
                banners.first.locator("button[data-action=accepted]").click()
                expect(banners).to_have_count(left, timeout=15_000)
            expect(page.locator(".alert-more")).to_have_count(0, timeout=15_000)

            # A localizer: not assessed, a grey badge with its reason, and no alert at all
            # although every scored series alerts on this node.
            series = synth_series(3, size=128, seed=400, series_description="head overview")
            for ds in series:
                ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
            storescu(console.node.port, write_series(series, console.root / "localizer"))
            uid = str(series[0].SeriesInstanceUID)
            row = page.locator(f'#series-rows tr[data-series-uid="{uid}"]')
            badge = row.locator(".badge.badge-not_assessed")
            expect(badge).to_have_text("not-assessed", timeout=VERDICT_TIMEOUT * 1000)
            expect(row.locator(".reason")).to_have_text(
                "model: ImageType LOCALIZER", timeout=15_000
            )
            grey = badge.evaluate("b => getComputedStyle(b).backgroundColor")
            assert grey != "rgb(0, 0, 0)" and "255, 0" not in grey, grey
            expect(banners).to_have_count(0)
            page.goto(f"/series/{uid}")
            expect(page.locator("p.reason")).to_contain_text(
                "not assessed: model: ImageType LOCALIZER", timeout=15_000
            )
        ctx.close()
