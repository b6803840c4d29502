// comfyui-dp-adapt: results on the canvas.
//
// 1. Every DP node's privacy report (ComfyUI's "executed" message) is drawn as a card on the
//    node after it runs: ONE plain sentence (ui.dp_card[0].headline, else the report's first
//    line), a small budget bar (spent / total of the collection, drawn in HTML/CSS) and the
//    details in a <details> fold, closed by default.
// 2. The Privacy Budget node shows its collection's ledger balance live: it is re-read from
//    the server (GET /dp_adapt/ledger_balance, nodes/ledger_route.py) whenever a prompt
//    finishes and whenever the node's ledger fields change, so it is never older than the
//    last release. It states what the ledger admits next for the releases the node feeds
//    (their sampling rate q, and T for DP-SGD, read from the wired DP nodes' widgets).
// Works in the current frontend and in the legacy one, with no build step and no other
// dependency. Both hold public values only (docs/privacy.md).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const PREFIX = "DPAdapt";
const REPORT_WIDGET = "dp_report";
const BUDGET_NODE = "DPAdaptPrivacyBudget";
const LEDGER_WIDGET = "dp_ledger_balance";
const LEDGER_FIELDS = ["ledger_name", "total_epsilon", "total_delta"];
const REFRESH_DELAY_MS = 300;
const CARD_HEIGHT_PX = 110;
const OPEN_EXTRA_PX = 170;
const MAX_PLANS = 4;

function el(tag, className, text) {
  const element = document.createElement(tag);
  if (className) element.className = className;
  if (text !== undefined) element.textContent = text;
  return element;
}

// A card in a DOM widget: label, headline, budget bar, details fold. Plain DOM and inline
// styles, so both frontends' addDOMWidget take it as it is.
function cardWidget(node, name, label) {
  let widget = node.widgets?.find((w) => w.name === name);
  if (!widget) {
    const root = el("div", `dp-card ${name.replaceAll("_", "-")}`);
    Object.assign(root.style, {
      fontFamily: "sans-serif",
      fontSize: "11px",
      lineHeight: "1.35",
      color: "var(--input-text, #ddd)",
      background: "var(--comfy-input-bg, #222)",
      borderRadius: "6px",
      padding: "4px 7px",
      boxSizing: "border-box",
      overflow: "auto",
    });
    const title = el("div", "dp-card-label", label);
    Object.assign(title.style, { fontSize: "9px", textTransform: "uppercase", opacity: "0.65" });
    const headline = el("div", "dp-card-headline");
    headline.style.fontWeight = "600";
    const bar = el("div", "dp-card-bar");
    Object.assign(bar.style, {
      height: "7px",
      borderRadius: "4px",
      background: "rgba(127,127,127,0.35)",
      margin: "4px 0 1px",
      overflow: "hidden",
      display: "none",
    });
    const fill = el("div", "dp-card-fill");
    Object.assign(fill.style, { height: "100%", width: "0%", background: "#2e8b57" });
    bar.append(fill);
    const barText = el("div", "dp-card-bar-text");
    Object.assign(barText.style, { fontSize: "9px", opacity: "0.75", display: "none" });
    const fold = el("details", "dp-card-details");
    const summary = el("summary", null, "details");
    summary.style.cursor = "pointer";
    const body = el("pre", "dp-card-body");
    Object.assign(body.style, { whiteSpace: "pre-wrap", fontSize: "10px", margin: "2px 0 0" });
    fold.append(summary, body);
    fold.addEventListener("toggle", () => redraw(node));
    root.append(title, headline, bar, barText, fold);
    widget = node.addDOMWidget(name, "dp_card", root, {
      getValue: () => `${headline.textContent}\n${body.textContent}`,
      setValue: () => {},
      getMinHeight: () => CARD_HEIGHT_PX + (fold.open ? OPEN_EXTRA_PX : 0),
      serialize: false,
    });
    widget.serialize = false;
    widget.dynamicPrompts = false; // a report, never a prompt to expand
    widget.element = root;
    widget.parts = { headline, bar, fill, barText, fold, body };
  }
  return widget;
}

// card: {headline, spent, total} (public values only; spent null when unknown); details: the
// text under the headline. Without a card the first line of the text is the headline.
function fillCard(widget, card, details) {
  const { headline, bar, fill, barText, fold, body } = widget.parts;
  const lines = `${details ?? ""}`.split("\n");
  headline.textContent = card?.headline ?? lines[0];
  body.textContent = (card?.headline ? lines : lines.slice(1)).join("\n").trim();
  fold.style.display = body.textContent ? "" : "none";
  const spent = Number(card?.spent);
  const total = Number(card?.total);
  const known = card != null && card.spent != null && Number.isFinite(spent) && total > 0;
  bar.style.display = known ? "" : "none";
  barText.style.display = known ? "" : "none";
  if (known) {
    const share = Math.min(1, Math.max(0, spent / total));
    fill.style.width = `${(share * 100).toFixed(1)}%`;
    fill.style.background = share >= 0.8 ? "#c0392b" : share >= 0.5 ? "#d4a017" : "#2e8b57";
    barText.textContent = `collection: eps ${Number(spent.toPrecision(4))} of ${total} spent (PLD estimate)`;
  }
}

function redraw(node) {
  const [width, height] = node.size;
  const needed = node.computeSize?.() ?? [width, height];
  node.setSize([Math.max(width, needed[0], 340), Math.max(height, needed[1])]);
  node.setDirtyCanvas?.(true, true);
  app.graph?.setDirtyCanvas(true, true);
}

function isBudgetNode(node) {
  return (node.comfyClass ?? node.type) === BUDGET_NODE;
}

function showReport(node, text, card) {
  const label = isBudgetNode(node) ? "Budget" : "Privacy";
  fillCard(cardWidget(node, REPORT_WIDGET, label), card, text);
  redraw(node);
}

// --- the Privacy Budget node's live ledger balance -------------------------------------

const pending = new WeakMap();

function fieldValue(node, name) {
  return node?.widgets?.find((w) => w.name === name)?.value;
}

async function refreshBalance(node) {
  const box = cardWidget(node, LEDGER_WIDGET, "Ledger balance (live)");
  const params = new URLSearchParams();
  for (const field of LEDGER_FIELDS) params.set(field === "ledger_name" ? "name" : field, `${fieldValue(node, field) ?? ""}`);
  params.set("delta", `${fieldValue(node, "delta") ?? ""}`);
  params.set("plans", plannedReleases(node).join(","));
  if (!box.parts.headline.textContent) box.parts.headline.textContent = "reading the ledger…";
  try {
    const response = await api.fetchApi(`/dp_adapt/ledger_balance?${params}`);
    const data = await response.json();
    if (response.ok) {
      const [first, ...rest] = data.line.split("\n");
      const spent = data.releases ? data.spent_epsilon : 0;
      fillCard(box, { headline: first, spent, total: data.total_epsilon }, rest.join("\n"));
      box.parts.fold.open = true; // what the ledger admits next is the point: shown unfolded
    } else {
      fillCard(box, null, `ledger: ${data.error}`);
    }
  } catch (error) {
    fillCard(box, null, `ledger balance unavailable: ${error}`);
  }
  redraw(node);
}

// The releases this budget feeds, as the route's plans: "q" for one release at sampling rate
// q, "q:T" for DP-SGD with T steps (public widget values of the wired DP nodes); "1" if none.
function plannedReleases(node) {
  const plans = new Set();
  for (const output of node.outputs ?? []) {
    for (const id of output.links ?? []) {
      const link = app.graph.links?.get?.(id) ?? app.graph.links?.[id];
      const target = link ? app.graph.getNodeById(link.target_id) : null;
      const q = Number(fieldValue(target, "sampling_rate"));
      if (!target || !(q > 0 && q <= 1)) continue;
      const sgd = fieldValue(target, "method") === "DP-SGD";
      plans.add(sgd ? `${q}:${fieldValue(target, "steps")}` : `${q}`);
    }
  }
  return plans.size ? [...plans].slice(0, MAX_PLANS) : ["1"];
}

function scheduleRefresh(node) {
  clearTimeout(pending.get(node));
  pending.set(node, setTimeout(() => refreshBalance(node), REFRESH_DELAY_MS));
}

function budgetNodes() {
  return (app.graph?._nodes ?? []).filter((n) => (n.comfyClass ?? n.type) === BUDGET_NODE);
}

function refreshAllBalances() {
  for (const node of budgetNodes()) scheduleRefresh(node);
}

function watchLedgerFields(node) {
  for (const widget of node.widgets ?? []) {
    if (!LEDGER_FIELDS.includes(widget.name)) continue;
    const callback = widget.callback;
    widget.callback = function () {
      const result = callback?.apply(this, arguments);
      scheduleRefresh(node);
      return result;
    };
  }
}

app.registerExtension({
  name: "comfyui-dp-adapt.report",
  async setup() {
    // A prompt has finished (legacy and current frontends both send these).
    api.addEventListener("executing", ({ detail }) => {
      if (detail === null || detail?.node === null) refreshAllBalances();
    });
    api.addEventListener("status", ({ detail }) => {
      if (detail?.exec_info?.queue_remaining === 0) refreshAllBalances();
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith(PREFIX)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const lines = message?.text;
      const card = Array.isArray(message?.dp_card) ? message.dp_card[0] : null;
      if (Array.isArray(lines) && lines.length) showReport(this, lines.join("\n\n"), card);
    };
    if (nodeData.name !== BUDGET_NODE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      watchLedgerFields(this);
      scheduleRefresh(this);
      return result;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const result = onConfigure?.apply(this, arguments);
      scheduleRefresh(this);
      return result;
    };
  },
});
