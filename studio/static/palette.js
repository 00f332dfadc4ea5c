// Layer palette (js_on_load of a gr.HTML; `element`, `props`, `watch` come from Gradio).
// props.value = {models: [{alias, color, layers, family, width, blocked}]} (blocked: why the model cannot
// join the recipe, or null). One row of chips per model: drag a chip
// onto the recipe board, or click it / press Enter to append it as a new slot (the keyboard path).
const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));

function render() {
  const root = element.querySelector(".mango-palette");
  if (!root) return;
  const models = (props.value && props.value.models) || [];
  if (!models.length) {
    root.innerHTML = '<p class="mango-empty">No models yet: add one in the Models tab.</p>';
    return;
  }
  root.innerHTML = models.map((m) => {
    const chips = Array.from({length: m.layers || 0}, (_, i) => {
      const ref = `${m.alias}:${i}`;
      return `<button type="button" class="layer-chip" draggable="true" data-expert="${esc(ref)}"
        style="--chip:${esc(m.color)}" title="Drag onto the board (onto a slot to add a candidate), or press Enter to add a new slot"
        aria-label="Add layer ${i} of ${esc(m.alias)} as a new slot">${esc(ref)}</button>`;
    }).join("");
    const facts = m.width ? `${esc(m.family || "")} · ${m.layers} layers · width ${m.width}` : "";
    // a model that cannot join the recipe on this base says why (mol's plan of the base with one of its blocks)
    const why = m.blocked ? `<div class="palette-blocked" role="note">cannot join this recipe: ${esc(m.blocked)}</div>` : "";
    return `<div class="palette-model${m.blocked ? " blocked" : ""}" data-alias="${esc(m.alias)}"${m.blocked ? ` title="${esc(m.blocked)}"` : ""}>
      <div class="palette-model-name"><span class="swatch" style="background:${esc(m.color)}"></span>
        <strong>${esc(m.alias)}</strong> <small>${facts}</small></div>${why}
      <div class="palette-chips">${chips}</div></div>`;
  }).join("");
}

element.addEventListener("dragstart", (e) => {
  const chip = e.target.closest && e.target.closest(".layer-chip");
  if (!chip) return;
  e.dataTransfer.setData("application/x-mango-expert", chip.dataset.expert);
  e.dataTransfer.setData("text/plain", chip.dataset.expert);
  e.dataTransfer.effectAllowed = "copy";
});

element.addEventListener("click", (e) => {
  const chip = e.target.closest && e.target.closest(".layer-chip");
  if (!chip) return;
  // The board listens for this; the two widgets share nothing else.
  window.dispatchEvent(new CustomEvent("mango:add-slot", {detail: {expert: chip.dataset.expert}}));
});

render();
watch("value", render);
