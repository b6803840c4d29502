// comfyui-dp-adapt: draw each DP node's privacy report on the node after it runs.
//
// The nodes return their report as ui.text (ComfyUI's "executed" message). This extension
// shows it in a read-only text box on the node, in the current frontend and in the legacy
// one, without any other dependency. The report holds public values only (docs/privacy.md).
import { app } from "../../scripts/app.js";

const REPORT_WIDGET = "dp_report";
const PREFIX = "DPAdapt";

function showReport(node, text) {
  let widget = node.widgets?.find((w) => w.name === REPORT_WIDGET);
  if (!widget) {
    const element = document.createElement("textarea");
    element.readOnly = true;
    element.className = "comfy-multiline-input dp-adapt-report";
    element.style.fontFamily = "monospace";
    element.style.fontSize = "10px";
    element.style.opacity = "0.9";
    widget = node.addDOMWidget(REPORT_WIDGET, "customtext", element, {
      getValue: () => element.value,
      setValue: (v) => {
        element.value = v;
      },
      serialize: false,
    });
    widget.element = element;
  }
  widget.element.value = text;
  widget.element.title = "Privacy report (public values only)";
  const [width, height] = node.size;
  node.setSize([Math.max(width, 420), Math.max(height, 260)]);
  node.setDirtyCanvas?.(true, true);
  app.graph?.setDirtyCanvas(true, true);
}

app.registerExtension({
  name: "comfyui-dp-adapt.report",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith(PREFIX)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const lines = message?.text;
      if (Array.isArray(lines) && lines.length) showReport(this, lines.join("\n\n"));
    };
  },
});
