// The Playground's token strip (js_on_load of a gr.HTML; `element`, `props`, `watch` come from Gradio).
// props.value = {tokens: [str], prompt: int, tail: str}: the routing trace's tokens (token t is column t of the
// router heatmap), how many of them are the prompt's, and the last generated token, which the model never read
// back (so it has no column). Hovering (or tapping) a token outlines its column in the heatmap; hovering a cell
// of the heatmap marks its token here. Plotly is not a global in Gradio's bundle: the outline is a positioned
// box over the plot, placed with the axis' own scale (xaxis.l2p).
const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
const shown = (t) => (t === "" ? "∅" : t.replace(/\t/g, "⇥").replace(/\r?\n/g, "⏎\n"));

function render() {
  const root = element.querySelector(".mango-tokens");
  if (!root) return;
  const v = props.value || {};
  const tokens = v.tokens || [];
  if (!tokens.length) {
    root.innerHTML = '<p class="mango-empty">The tokens of a run appear here; hover one to find its column in the router heatmap.</p>';
    return;
  }
  const k = v.prompt || 0;
  const span = (t, i) =>
    `<span class="tok${i < k ? " prompt" : ""}" data-pos="${i}" title="position ${i}${i < k ? " (prompt)" : ""}">${esc(shown(t))}</span>`;
  const tail = v.tail
    ? `<span class="tok tail" title="the last new token: the model never read it, so it has no column">${esc(shown(v.tail))}</span>`
    : "";
  root.innerHTML =
    `<div class="tok-legend"><span class="tok prompt">prompt</span> <span class="tok">output</span>` +
    ` <small>hover a token: its column in the heatmap</small></div>` +
    `<div class="tok-strip">${tokens.map(span).join("")}${tail}</div>`;
}

function plot() {
  return document.querySelector("#router-heatmap .js-plotly-plot");
}

function clearColumn() {
  document.querySelectorAll(".mango-col-highlight").forEach((b) => b.remove());
  const holder = document.getElementById("router-heatmap");
  if (holder) delete holder.dataset.highlight;
  element.querySelectorAll(".tok.active").forEach((s) => s.classList.remove("active"));
}

function showColumn(pos) {
  clearColumn();
  const gd = plot();
  const full = gd && gd._fullLayout;
  const xa = full && full.xaxis, ya = full && full.yaxis;
  if (!xa || !ya || typeof xa.l2p !== "function") return;
  const lo = Math.max(0, xa.l2p(pos - 0.5)), hi = Math.min(xa._length, xa.l2p(pos + 0.5));
  if (!(hi > lo)) return; // outside the visible range (zoomed away)
  const box = document.createElement("div");
  box.className = "mango-col-highlight";
  Object.assign(box.style, {
    left: `${xa._offset + lo}px`,
    width: `${hi - lo}px`,
    top: `${ya._offset}px`,
    height: `${ya._length}px`,
  });
  box.dataset.pos = String(pos);
  (gd.querySelector(".svg-container") || gd).appendChild(box);
  document.getElementById("router-heatmap").dataset.highlight = String(pos);
}

function markToken(pos) {
  element.querySelectorAll(".tok.active").forEach((s) => s.classList.remove("active"));
  const s = element.querySelector(`.tok[data-pos="${pos}"]`);
  if (s) s.classList.add("active");
}

element.addEventListener("pointerover", (e) => {
  const s = e.target.closest && e.target.closest(".tok[data-pos]");
  if (!s) return;
  showColumn(Number(s.dataset.pos));
  s.classList.add("active");
});
element.addEventListener("pointerleave", clearColumn);

// The other way round: a hovered heatmap cell marks its token. Plotly's graph div is replaced when the figure
// is, so the handler is attached to whichever one the pointer meets.
const hooked = new WeakSet();
document.addEventListener("pointerover", (e) => {
  if (!e.target.closest || !e.target.closest("#router-heatmap")) return;
  const gd = plot();
  if (!gd || hooked.has(gd) || typeof gd.on !== "function") return;
  hooked.add(gd);
  gd.on("plotly_hover", (ev) => {
    const p = ev && ev.points && ev.points[0];
    if (p && Number.isInteger(p.x)) markToken(p.x);
  });
  gd.on("plotly_unhover", () => markToken(-1));
});

render();
watch("value", render);
