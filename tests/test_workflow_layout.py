"""The shipped workflows' canvas layout, checked geometrically (no server, no browser).

Rules an artist saw broken in the browser: notes drawn over the title bars of the nodes
below them, related nodes scattered, and a view so far out that no text was readable.
LiteGraph draws a node's title bar above its ``pos`` (``NODE_TITLE_HEIGHT``, 30 px), so
every box here is ``[x, y - 30, x + width, y + height]``.
"""

from __future__ import annotations

import itertools
import json

import pytest

from comfyui_dp_adapt.tests.support.pack import shipped_workflows

WORKFLOWS = shipped_workflows()
TITLE_BAR = 30  # LiteGraph.NODE_TITLE_HEIGHT
NOTE_CLEARANCE = 40  # free space between a note's bottom and a title bar below it
GROUP_TITLE = 34  # a group's own title band (font_size 24 x 1.4)
MIN_SCALE = 0.8  # extra.ds.scale: the zoom the workflow opens with
ON_SCREEN = 120  # the first group's top-left must land within this many screen px
# Frontends >= 1.2x fit templates to the view instead (0.75 of the canvas, see
# DragAndScale.fitToBounds): on a 1080p screen (about 1920 x 977 canvas px) this bounding
# box opens at about 0.65 or more, where the old 1980 x 1437 layout opened at 0.51.
MAX_EXTENT = (2100, 1100)
# The steps each DP workflow walks through, in the order its groups must show them.
STEP_NODES = (
    ("DPAdaptLoadPrivateImages",),
    ("DPAdaptPrivacyBudget",),
    ("DPAdaptTextualInversionTrain", "DPAdaptAggregateCLIPEmbeddings"),
    ("KSampler", "DPAdaptUniversalGuidanceSampler"),
)


def _load(path):
    return json.loads(path.read_text())


def _box(node) -> tuple[float, float, float, float]:
    x, y = node["pos"]
    width, height = node["size"]
    return (x, y - TITLE_BAR, x + width, y + height)


def _overlap_1d(a0, a1, b0, b1) -> bool:
    return a0 < b1 and b0 < a1


def _overlap(a, b) -> bool:
    return _overlap_1d(a[0], a[2], b[0], b[2]) and _overlap_1d(a[1], a[3], b[1], b[3])


def _group_box(group) -> tuple[float, float, float, float]:
    x, y, width, height = group["bounding"]
    return (x, y, x + width, y + height)


def _ids(path):
    return path.name


@pytest.mark.parametrize("path", WORKFLOWS, ids=_ids)
def test_notes_keep_clear_of_the_title_bars_below_them(path):
    nodes = _load(path)["nodes"]
    for note in (n for n in nodes if n["type"] == "Note"):
        left, _top, right, bottom = _box(note)
        for other in nodes:
            if other is note or not _overlap_1d(left, right, other["pos"][0], _box(other)[2]):
                continue
            if other["pos"][1] <= note["pos"][1]:
                continue  # above the note: covered by the overlap test
            title_top = other["pos"][1] - TITLE_BAR
            assert bottom + NOTE_CLEARANCE <= title_top, (
                f"{path.name}: note {note['id']} ends at y={bottom}, only "
                f"{title_top - bottom} px above the title bar of node {other['id']} "
                f"({other['type']}); at least {NOTE_CLEARANCE} px are needed"
            )


@pytest.mark.parametrize("path", WORKFLOWS, ids=_ids)
def test_no_two_nodes_overlap_title_bars_included(path):
    nodes = _load(path)["nodes"]
    for a, b in itertools.combinations(nodes, 2):
        assert not _overlap(_box(a), _box(b)), (
            f"{path.name}: node {a['id']} ({a['type']}) overlaps node {b['id']} ({b['type']})"
        )


@pytest.mark.parametrize("path", WORKFLOWS, ids=_ids)
def test_every_node_sits_inside_exactly_one_group_below_its_title(path):
    workflow = _load(path)
    groups = workflow.get("groups") or []
    assert len(groups) >= 2, f"{path.name}: related nodes are not grouped"
    for group in groups:
        assert set(group) >= {"title", "bounding", "color", "font_size"}, group
        assert group["title"].strip() and len(group["bounding"]) == 4
    for node in workflow["nodes"]:
        left, top, right, bottom = _box(node)
        holders = [
            g["title"]
            for g in groups
            if _group_box(g)[0] <= left
            and _group_box(g)[1] + GROUP_TITLE <= top
            and right <= _group_box(g)[2]
            and bottom <= _group_box(g)[3]
        ]
        assert len(holders) == 1, (
            f"{path.name}: node {node['id']} ({node['type']}) with its title bar lies in "
            f"{len(holders)} groups {holders}; it must lie in exactly one"
        )


@pytest.mark.parametrize("path", WORKFLOWS, ids=_ids)
def test_groups_do_not_overlap_and_read_in_step_order(path):
    workflow = _load(path)
    groups = workflow["groups"]
    for a, b in itertools.combinations(groups, 2):
        assert not _overlap(_group_box(a), _group_box(b)), (
            f"{path.name}: groups '{a['title']}' and '{b['title']}' overlap"
        )
    reading_order = sorted(groups, key=lambda g: (g["bounding"][0], g["bounding"][1]))
    assert [g["title"] for g in reading_order] == [g["title"] for g in groups], (
        f"{path.name}: groups are not listed left to right, top to bottom"
    )

    def group_of(node):
        box = _box(node)
        return next(
            i
            for i, g in enumerate(groups)
            if _group_box(g)[0] <= box[0]
            and _group_box(g)[1] <= box[1]
            and box[2] <= _group_box(g)[2]
            and box[3] <= _group_box(g)[3]
        )

    steps = []
    for types in STEP_NODES:
        found = [group_of(n) for n in workflow["nodes"] if n["type"] in types]
        if found:
            steps.append(min(found))
    if len(steps) == len(STEP_NODES):  # a DP workflow: load -> budget -> release -> use
        assert steps == sorted(steps) and len(set(steps)) == len(steps), (
            f"{path.name}: groups of the steps {STEP_NODES} are {steps}: each step needs "
            "its own group, in this order"
        )


@pytest.mark.parametrize("path", WORKFLOWS, ids=_ids)
def test_opens_readable_on_its_first_group(path):
    workflow = _load(path)
    ds = workflow["extra"]["ds"]
    scale, (offset_x, offset_y) = ds["scale"], ds["offset"]
    assert scale >= MIN_SCALE, f"{path.name}: opens at {scale:.0%}, text needs >= {MIN_SCALE:.0%}"
    x, y, _, _ = workflow["groups"][0]["bounding"]
    screen = ((x + offset_x) * scale, (y + offset_y) * scale)
    assert all(0 <= v <= ON_SCREEN for v in screen), (
        f"{path.name}: the first group's top-left is drawn at screen {screen}; it must be "
        f"within 0..{ON_SCREEN} px of the canvas' top-left"
    )


@pytest.mark.parametrize("path", WORKFLOWS, ids=_ids)
def test_layout_is_compact_enough_to_fit_a_screen_readably(path):
    boxes = [_box(n) for n in _load(path)["nodes"]]
    width = max(b[2] for b in boxes) - min(b[0] for b in boxes)
    height = max(b[3] for b in boxes) - min(b[1] for b in boxes)
    assert width <= MAX_EXTENT[0] and height <= MAX_EXTENT[1], (
        f"{path.name}: nodes span {width} x {height} canvas px; at most {MAX_EXTENT} keeps "
        "text readable when the frontend fits the template to the screen"
    )


QUICK_STARTS = [p for p in WORKFLOWS if p.name.startswith("Quick start")]


def test_there_are_two_quick_starts_on_the_demo_model():
    """A DP style token and DP guidance, both on the demo model (no checkpoint to fetch)."""
    assert len(QUICK_STARTS) == 2
    kinds = {n["type"] for p in QUICK_STARTS for n in _load(p)["nodes"]}
    assert {"DPAdaptTextualInversionTrain", "DPAdaptUniversalGuidanceSampler"} <= kinds
    assert all(
        n["type"] != "CheckpointLoaderSimple" for p in QUICK_STARTS for n in _load(p)["nodes"]
    )


@pytest.mark.parametrize("path", QUICK_STARTS, ids=_ids)
def test_quick_start_needs_no_terminal(path):
    """The quick start's private pictures come from the loader's built-in demo choice, and
    no note asks the artist to run a command."""
    from comfyui_dp_adapt.nodes.private_images import DEMO_FOLDER

    workflow = _load(path)
    (loader,) = [n for n in workflow["nodes"] if n["type"] == "DPAdaptLoadPrivateImages"]
    assert loader["widgets_values"][0] == DEMO_FOLDER
    for note in (n for n in workflow["nodes"] if n["type"] == "Note"):
        text = note["widgets_values"][0]
        for command in ("python ", ".py", "pip ", "terminal:"):
            assert command not in text, f"note {note['id']} asks for a terminal: {command!r}"
    assert any(
        DEMO_FOLDER in n["widgets_values"][0] for n in workflow["nodes"] if n["type"] == "Note"
    )
