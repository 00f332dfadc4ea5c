// Recipe board (js_on_load of a gr.HTML; `element`, `props`, `watch` come from Gradio).
// props.value = {models: [{alias, color, layers}], slots: [{experts: ["alias:layer"], router: {type, top_k} | null}]}.
// Every edit assigns a new object to props.value, which fires the component's `change` event (mutating in
// place would not). Drag a palette chip onto a gap to insert a slot, onto a slot to add a candidate; drag a
// slot's handle to reorder. Each drag has a button/keyboard twin: chip click, "+ candidate", ↑, ↓, ✕.
// The same operations exist in Python (studio/draft_recipe.py) for the API. An edit that is refused or
// adjusted (a duplicate candidate, a top-k above the slot's candidates) says so in the board's note line.
const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
const EXPERT = "application/x-mango-expert";
const SLOT = "application/x-mango-slot";

const state = () => {
  const v = props.value && typeof props.value === "object" ? props.value : {};
  return {models: v.models || [], slots: v.slots || []};
};
const clone = (x) => JSON.parse(JSON.stringify(x));

// The router kinds mol has registered, the default first: [{type, takes_top_k}] (data-router-kinds, set by the
// server from mol's registry, so a kind registered there is offered here too).
const KINDS = JSON.parse(element.querySelector(".mango-board").dataset.routerKinds || "[]");
const kindOf = (type) => KINDS.find((k) => k.type === type) || KINDS[0];

function normalise(slot) {
  const experts = [...new Set(slot.experts || [])];
  let router = null;
  if (experts.length > 1) {
    const kind = kindOf((slot.router || {}).type);
    router = {type: kind.type, top_k: 1};
    if (kind.takes_top_k) router.top_k = Math.max(1, Math.min(parseInt((slot.router || {}).top_k) || 1, experts.length));
  }
  return {experts, router};
}

const ops = {
  addSlot(slots, expert, at) {
    const out = clone(slots);
    out.splice(at == null ? out.length : Math.max(0, Math.min(at, out.length)), 0, {experts: [expert], router: null});
    return out;
  },
  addExpert(slots, i, expert) {
    const out = clone(slots);
    if (!out[i]) return null;
    if (out[i].experts.includes(expert)) {
      say(`${expert} is already a candidate of slot ${i}: not added again (each candidate of a slot must be distinct).`);
      return null;
    }
    out[i] = normalise({...out[i], experts: [...out[i].experts, expert]});
    return out;
  },
  removeSlot(slots, i) { const out = clone(slots); out.splice(i, 1); return out; },
  removeExpert(slots, i, expert) {
    const out = clone(slots);
    const experts = out[i].experts.filter((e) => e !== expert);
    if (!experts.length) out.splice(i, 1); else out[i] = normalise({...out[i], experts});
    return out;
  },
  moveSlot(slots, from, to) {
    const out = clone(slots);
    const [moved] = out.splice(from, 1);
    out.splice(Math.max(0, Math.min(to, out.length)), 0, moved);
    return out;
  },
  setRouter(slots, i, patch) {
    const out = clone(slots);
    out[i] = normalise({...out[i], router: {...(out[i].router || {}), ...patch}});
    const asked = patch.top_k, got = (out[i].router || {}).top_k;
    if (asked != null && got != null && asked !== got) {
      const n = out[i].experts.length;
      say(`top-k ${asked} set to ${got}: slot ${i} has ${n} candidate${n === 1 ? "" : "s"}, and top-k must be between 1 and ${n}.`);
    }
    return out;
  },
};

// A board edit that changes nothing, or changes something else than asked, says so here (no silent no-op).
let note = "", said = "", committed = null;
function say(text) { said = text; }

let focusAfter = null;  // [slot index, action] to focus after re-render (keyboard users keep their place)

function commit(slots) {
  note = said;  // what this edit has to say (a refusal, an adjustment), else nothing
  said = "";
  if (!slots) { render(); return; }  // nothing changed: the note says why
  committed = {...state(), slots};
  props.value = committed;
  render();
}

function expertChip(ref, i, colors) {
  const alias = ref.split(":")[0];
  const color = colors[alias] || "#868e96";
  const unknown = colors[alias] ? "" : " unknown";
  return `<span class="expert-chip${unknown}" style="--chip:${esc(color)}" data-expert="${esc(ref)}"
    title="${unknown ? "No model with alias " + esc(alias) + " is loaded" : esc(ref)}">${esc(ref)}<button type="button"
    class="chip-x" data-action="remove-expert" data-slot="${i}" data-expert="${esc(ref)}"
    aria-label="Remove ${esc(ref)} from slot ${i}">×</button></span>`;
}

function slotHtml(slot, i, n, models, colors) {
  const routed = slot.experts.length > 1;
  const options = models.flatMap((m) => Array.from({length: m.layers || 0}, (_, j) => `${m.alias}:${j}`))
    .filter((ref) => !slot.experts.includes(ref))
    .map((ref) => `<option value="${esc(ref)}">${esc(ref)}</option>`).join("");
  let router = "";
  if (routed) {
    const r = slot.router || {type: KINDS[0].type, top_k: 1};
    const choices = KINDS.map((k) => `<option value="${esc(k.type)}"${r.type === k.type ? " selected" : ""}>${esc(k.type)}</option>`).join("");
    router = `<label class="router-type">router <select data-action="router-type" data-slot="${i}" aria-label="Router of slot ${i}">
        ${choices}</select></label>` +
      (kindOf(r.type).takes_top_k ? `<label class="router-topk">top-k <input type="number" data-action="top-k" data-slot="${i}"
        min="1" max="${slot.experts.length}" value="${r.top_k}" aria-label="top-k of slot ${i}"></label>` : "");
  }
  const kind = routed ? `${esc((slot.router || {}).type || KINDS[0].type)}-routed` : "plain";
  return `<div class="slot${routed ? " routed" : ""}" role="listitem" data-slot="${i}" aria-label="Slot ${i}">
    <div class="slot-head">
      <span class="slot-handle" draggable="true" data-slot="${i}" title="Drag to reorder">⠿</span>
      <span class="slot-title">Slot ${i}</span><span class="slot-kind">${kind}</span>
      <span class="slot-actions">
        <button type="button" data-action="up" data-slot="${i}" aria-label="Move slot ${i} up"${i === 0 ? " disabled" : ""}>↑</button>
        <button type="button" data-action="down" data-slot="${i}" aria-label="Move slot ${i} down"${i === n - 1 ? " disabled" : ""}>↓</button>
        <button type="button" data-action="remove-slot" data-slot="${i}" aria-label="Remove slot ${i}">✕</button>
      </span>
    </div>
    <div class="slot-experts">${slot.experts.map((e) => expertChip(e, i, colors)).join("")}</div>
    <div class="slot-controls">
      <select data-action="add-expert" data-slot="${i}" aria-label="Add a candidate to slot ${i}">
        <option value="">+ candidate…</option>${options}</select>${router}
    </div></div>`;
}

function render() {
  const root = element.querySelector(".mango-board");
  if (!root) return;
  const {models, slots} = state();
  const colors = Object.fromEntries(models.map((m) => [m.alias, m.color]));
  const gap = (k, last) => `<div class="slot-gap${last ? " last" : ""}" data-gap="${k}">${last ? (slots.length
    ? "Drop a layer here to append a slot" : "Drag layer chips here to build the recipe (or click a chip)") : ""}</div>`;
  let html = "";
  slots.forEach((s, i) => { html += gap(i, false) + slotHtml(s, i, slots.length, models, colors); });
  const shown = note;
  root.innerHTML = `<div class="board-count">${slots.length} slot${slots.length === 1 ? "" : "s"}</div>` +
    `<div class="board-note" role="status" aria-live="polite">${esc(shown)}</div>` +
    `<div class="board-slots" role="list">${html}${gap(slots.length, true)}</div>`;
  if (focusAfter) {
    const [i, action] = focusAfter;
    focusAfter = null;
    // the same button if it still applies, else the other direction (at an end of the list), else remove
    const other = action === "up" ? "down" : "up";
    const target = root.querySelector(`[data-slot="${i}"][data-action="${action}"]:not([disabled])`) ||
      root.querySelector(`[data-slot="${i}"][data-action="${other}"]:not([disabled])`) ||
      root.querySelector(`.slot[data-slot="${i}"] [data-action="remove-slot"]`);
    if (target) target.focus();
  }
}

element.addEventListener("click", (e) => {
  const btn = e.target.closest && e.target.closest("button[data-action]");
  if (!btn) return;
  const {slots} = state();
  const i = parseInt(btn.dataset.slot);
  const action = btn.dataset.action;
  if (action === "up" && i > 0) { focusAfter = [i - 1, "up"]; commit(ops.moveSlot(slots, i, i - 1)); }
  else if (action === "down" && i < slots.length - 1) { focusAfter = [i + 1, "down"]; commit(ops.moveSlot(slots, i, i + 1)); }
  else if (action === "remove-slot") commit(ops.removeSlot(slots, i));
  else if (action === "remove-expert") commit(ops.removeExpert(slots, i, btn.dataset.expert));
});

element.addEventListener("change", (e) => {
  const el = e.target;
  if (!el.dataset || !el.dataset.action) return;
  const {slots} = state();
  const i = parseInt(el.dataset.slot);
  if (el.dataset.action === "add-expert" && el.value) commit(ops.addExpert(slots, i, el.value));
  else if (el.dataset.action === "router-type") commit(ops.setRouter(slots, i, {type: el.value}));
  else if (el.dataset.action === "top-k") {
    const k = parseInt(el.value);
    commit(ops.setRouter(slots, i, {top_k: Number.isNaN(k) ? 1 : k}));
  }
});

element.addEventListener("dragstart", (e) => {
  const handle = e.target.closest && e.target.closest(".slot-handle");
  if (!handle) return;
  e.dataTransfer.setData(SLOT, handle.dataset.slot);
  e.dataTransfer.setData("text/plain", "slot " + handle.dataset.slot);
  e.dataTransfer.effectAllowed = "move";
  const slotEl = handle.closest(".slot");
  if (slotEl) e.dataTransfer.setDragImage(slotEl, 10, 10);
});

const dropTarget = (e) => e.target.closest && (e.target.closest(".slot") || e.target.closest(".slot-gap"));
const clearHighlight = () => element.querySelectorAll(".drop-over").forEach((el) => el.classList.remove("drop-over"));

element.addEventListener("dragover", (e) => {
  const types = Array.from(e.dataTransfer.types || []);
  if (!types.includes(EXPERT) && !types.includes(SLOT)) return;
  e.preventDefault();
  e.dataTransfer.dropEffect = types.includes(SLOT) ? "move" : "copy";
  clearHighlight();
  const t = dropTarget(e);
  if (t) t.classList.add("drop-over");
});
element.addEventListener("dragleave", (e) => { if (!element.contains(e.relatedTarget)) clearHighlight(); });

element.addEventListener("drop", (e) => {
  const expert = e.dataTransfer.getData(EXPERT);
  const from = e.dataTransfer.getData(SLOT);
  if (!expert && from === "") return;
  e.preventDefault();
  clearHighlight();
  const {slots} = state();
  const t = dropTarget(e);
  const onSlot = t && t.classList.contains("slot") ? parseInt(t.dataset.slot) : null;
  const gap = t && t.classList.contains("slot-gap") ? parseInt(t.dataset.gap) : null;
  if (expert) {
    commit(onSlot != null ? ops.addExpert(slots, onSlot, expert) : ops.addSlot(slots, expert, gap));
  } else {
    const i = parseInt(from);
    let to = onSlot != null ? onSlot : gap != null ? (gap > i ? gap - 1 : gap) : slots.length - 1;
    if (to !== i) commit(ops.moveSlot(slots, i, to));
  }
});

// Palette chips clicked (keyboard path) append a slot; one listener per page.
if (window.__mangoAddSlot) window.removeEventListener("mango:add-slot", window.__mangoAddSlot);
window.__mangoAddSlot = (e) => commit(ops.addSlot(state().slots, e.detail.expert, null));
window.addEventListener("mango:add-slot", window.__mangoAddSlot);

render();
watch("value", () => {
  if (props.value !== committed) note = "";  // a value from the server (a recipe opened): no stale note
  render();
});
