// comfyui-dp-adapt: results on the canvas.
//
// 1. Every DP node's privacy report (ComfyUI's "executed" message, ui.text) is drawn in a
//    read-only text box on the node after it runs.
// 2. The Privacy Budget node shows its collection's ledger balance live: it is re-read from
//    the server (GET /dp_adapt/ledger_balance, nodes/ledger_route.py) whenever a prompt
//    finishes and whenever the node's ledger fields change, so it is never older than the
//    last release.
// Works in the current frontend and in the legacy one, with no other dependency. Both hold
// public values only (docs/privacy.md).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const PREFIX = "DPAdapt";
const REPORT_WIDGET = "dp_report";
const BUDGET_NODE = "DPAdaptPrivacyBudget";
const LEDGER_WIDGET = "dp_ledger_balance";
const LEDGER_FIELDS = ["ledger_name", "total_epsilon", "total_delta"];
const REFRESH_DELAY_MS = 300;
const LINE_HEIGHT_PX = 13;

function textBox(node, name, title, rows) {
  let widget = node.widgets?.find((w) => w.name === name);
  if (!widget) {
    const element = document.createElement("textarea");
    element.readOnly = true;
    element.rows = rows;
    element.className = `comfy-multiline-input ${name.replaceAll("_", "-")}`;
    element.style.fontFamily = "monospace";
    element.style.fontSize = "10px";
    element.style.opacity = "0.9";
    element.title = title;
    widget = node.addDOMWidget(name, "customtext", element, {
      getValue: () => element.value,
      setValue: (v) => {
        element.value = v;
      },
      getMinHeight: () => rows * LINE_HEIGHT_PX + 12,
      serialize: false,
    });
    widget.serialize = false;
    widget.dynamicPrompts = false; // a report, never a prompt to expand
    widget.element = element;
  }
  return widget;
}

function redraw(node, minHeight) {
  const [width, height] = node.size;
  const needed = node.computeSize?.() ?? [width, height];
  node.setSize([Math.max(width, needed[0], 320), Math.max(height, needed[1], minHeight)]);
  node.setDirtyCanvas?.(true, true);
  app.graph?.setDirtyCanvas(true, true);
}

function showReport(node, text) {
  const widget = textBox(node, REPORT_WIDGET, "Privacy report (public values only)", 8);
  widget.element.value = text;
  redraw(node, 260);
}

// --- the Privacy Budget node's live ledger balance -------------------------------------

const pending = new WeakMap();

function fieldValue(node, name) {
  return node.widgets?.find((w) => w.name === name)?.value;
}

async function refreshBalance(node) {
  const box = textBox(node, LEDGER_WIDGET, "Ledger balance, re-read after every run", 3);
  const params = new URLSearchParams();
  for (const field of LEDGER_FIELDS) params.set(field === "ledger_name" ? "name" : field, `${fieldValue(node, field) ?? ""}`);
  try {
    const response = await api.fetchApi(`/dp_adapt/ledger_balance?${params}`);
    const data = await response.json();
    box.element.value = response.ok ? data.line : `ledger: ${data.error}`;
  } catch (error) {
    box.element.value = `ledger balance unavailable: ${error}`;
  }
  redraw(node, 0);
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
      if (Array.isArray(lines) && lines.length) showReport(this, lines.join("\n\n"));
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
