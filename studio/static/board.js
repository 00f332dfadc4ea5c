// Recipe board (js_on_load of a gr.HTML; `element`, `props`, `watch` come from Gradio).
// props.value = {models: [{alias, color, layers}], slots: [{experts: ["alias:layer"], router: {type, top_k} | null}]}.
// Every edit assigns a new object to props.value, which fires the component's `change` event (mutating in
// place would not). Drag a palette chip onto a gap to insert a slot, onto a slot to add a candidate; drag a
// slot's handle to reorder. Each drag has a button/keyboard twin: chip click, "+ candidate", ↑, ↓, ✕.
// The same operations exist in Python (studio/draft_recipe.py) for the API. An edit that is refused or
// adjusted (a duplicate candidate, a top-k above the slot's candidates) says so in the board's note line.
// A lanes recipe (props.value.lanes: [{name, base, slots: [...] | null}], stitches: [{from, to, after: [i, j],
// type, rank}], mixture: "token" | "sequence") is drawn as its lanes side by side, each with its name (editable:
// its stitches follow a rename), its base model and its layers (slots null: all of the base's layers, in order),
// then its stitches and its output mixture.
const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
const EXPERT = "application/x-mango-expert";
const SLOT = "application/x-mango-slot";

const state = () => {
  const v = props.value && typeof props.value === "object" ? props.value : {};
  const out = {models: v.models || [], slots: v.slots || []};
  if (Array.isArray(v.lanes)) Object.assign(out, {lanes: v.lanes, stitches: v.stitches || [], mixture: v.mixture || MIXTURES[0]});
  return out;
};
const clone = (x) => JSON.parse(JSON.stringify(x));

// The router kinds mol has registered, the default first: [{type, takes_top_k}] (data-router-kinds, set by the
// server from mol's registry, so a kind registered there is offered here too).
const KINDS = JSON.parse(element.querySelector(".mango-board").dataset.routerKinds || "[]");
// mol's stitch types and mixture types, the default first (data-stitch-types, data-mixture-types).
const STITCHES = JSON.parse(element.querySelector(".mango-board").dataset.stitchTypes || '["linear"]');
const MIXTURES = JSON.parse(element.querySelector(".mango-board").dataset.mixtureTypes || '["token"]');
const MIXTURE_LABELS = JSON.parse(element.querySelector(".mango-board").dataset.mixtureLabels || "{}");
// mol's rule for a lane name (a key of the recipe's lanes: its ALIAS_RE, data-lane-name-pattern; without it any
// name passes here and the plan says what mol makes of it)
const LANE_NAME = new RegExp(element.querySelector(".mango-board").dataset.laneNamePattern || "");
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


// ---- lanes: the same operations as studio/draft_recipe.py's add_lane, set_lane_base, add_stitch, ...
const layersOf = (alias) => ((state().models.find((m) => m.alias === alias) || {}).layers) || 0;
const laneSlots = (lane) => lane.slots != null ? lane.slots
  : Array.from({length: layersOf(lane.base)}, (_, j) => ({experts: [`${lane.base}:${j}`], router: null}));
const freeLane = (lanes, wanted) => { let out = wanted, n = 2; while (lanes.some((l) => l.name === out)) out = `${wanted}_${n++}`; return out; };
const lanesPart = () => { const v = state(); return {lanes: clone(v.lanes || []), stitches: clone(v.stitches || []), mixture: v.mixture || MIXTURES[0]}; };
const laneOps = {
  addLane(p, base) { p.lanes.push({name: freeLane(p.lanes, base), base, slots: null}); return p; },
  removeLane(p, i) {
    const name = p.lanes[i].name;
    p.lanes.splice(i, 1);
    const before = p.stitches.length;
    p.stitches = p.stitches.filter((s) => s.from !== name && s.to !== name);
    if (p.stitches.length < before) say(`Removed lane ${name} and the stitches that joined it.`);
    return p;
  },
  setBase(p, i, base) {
    const lane = p.lanes[i];
    let name = lane.name;
    if (name === lane.base && !p.lanes.some((l) => l.name === base)) {  // named after its base: follows it
      name = base;
      p.stitches.forEach((s) => { if (s.from === lane.name) s.from = name; if (s.to === lane.name) s.to = name; });
    }
    p.lanes[i] = {name, base, slots: null};
    return p;
  },
  rename(p, i, wanted) {  // as studio/draft_recipe.py's rename_lane: a refused name changes nothing and says why
    const old = p.lanes[i].name, name = String(wanted).trim();
    const problem = !name ? "a lane needs a name"
      : name !== old && p.lanes.some((l) => l.name === name) ? `there is a lane '${name}' already; each lane needs a name of its own`
      : !LANE_NAME.test(name) ? `'${name}' is not a lane name: it starts with a letter or '_' and has only letters, digits, '_', '-' and '.' (at most 64)`
      : null;
    if (problem) { say(`Lane '${old}' is not renamed: ${problem}.`); return null; }
    if (name === old) return null;
    p.lanes[i].name = name;
    p.stitches.forEach((s) => { if (s.from === old) s.from = name; if (s.to === old) s.to = name; });
    return p;
  },
  addLayer(p, i, expert) { p.lanes[i].slots = [...laneSlots(p.lanes[i]), {experts: [expert], router: null}]; return p; },
  removeLayer(p, i, j) {
    const slots = laneSlots(p.lanes[i]);
    if (slots.length <= 1) { say(`Lane ${p.lanes[i].name} keeps at least one layer: remove the lane instead.`); return null; }
    slots.splice(j, 1);
    p.lanes[i].slots = slots;
    return p;
  },
  resetLayers(p, i) { p.lanes[i].slots = null; return p; },
  addStitch(p) {
    if (p.lanes.length < 2) { say("A stitch joins two lanes: add another lane first."); return null; }
    p.stitches.push({from: p.lanes[1].name, to: p.lanes[0].name, after: [0, 0], type: STITCHES[0], rank: null});
    return p;
  },
  setStitch(p, k, patch) {
    const s = {...p.stitches[k], ...patch};
    if (s.type !== "lowrank") s.rank = null;
    p.stitches[k] = s;
    return p;
  },
  removeStitch(p, k) { p.stitches.splice(k, 1); return p; },
};

function commitLanes(part) {
  note = said;
  said = "";
  if (!part) { render(); return; }
  committed = {...state(), slots: [], ...part};
  props.value = committed;
  render();
}

function toLanes() {
  const {models, slots} = state();
  const used = [...new Set(slots.flatMap((s) => s.experts.map((e) => e.split(":")[0])))].filter((a) => models.some((m) => m.alias === a));
  const bases = used.length >= 2 ? used : models.slice(0, 2).map((m) => m.alias);
  const part = {lanes: [], stitches: [], mixture: MIXTURES[0]};
  bases.forEach((b) => laneOps.addLane(part, b));
  say(`Now ${bases.length} lanes side by side, each a model's own stream, layers and head; the output mixture picks among them.`);
  commitLanes(part);
}

function toSingle() {
  const v = state();
  const first = (v.lanes || [])[0];
  const slots = first ? laneSlots(first) : [];
  note = first ? `One stream again: lane ${first.name}'s layers are the slots.` : "";
  committed = {models: v.models, slots};
  props.value = committed;
  render();
}

function laneHtml(lane, i, models, colors) {
  const color = colors[lane.base] || "#868e96";
  const bases = models.map((m) => `<option value="${esc(m.alias)}"${m.alias === lane.base ? " selected" : ""}>${esc(m.alias)}</option>`).join("")
    + (models.some((m) => m.alias === lane.base) ? "" : `<option value="${esc(lane.base)}" selected>${esc(lane.base)}</option>`);
  const slots = laneSlots(lane);
  const chips = slots.map((s, j) => {
    const label = s.experts.join(" | ");
    const alias = s.experts[0].split(":")[0];
    const routed = s.experts.length > 1 ? ` title="${esc((s.router || {}).type || KINDS[0].type)}-routed"` : "";
    return `<span class="expert-chip lane-layer${lane.slots == null ? " default" : ""}" style="--chip:${esc(colors[alias] || "#868e96")}"
      data-lane="${esc(lane.name)}" data-slot="${j}"${routed}>${esc(label)}<button type="button" class="chip-x" data-action="lane-remove-layer"
      data-lane="${i}" data-slot="${j}" aria-label="Remove slot ${j} of lane ${esc(lane.name)}">×</button></span>`;
  }).join("");
  const options = models.flatMap((m) => Array.from({length: m.layers || 0}, (_, j) => `${m.alias}:${j}`))
    .map((ref) => `<option value="${esc(ref)}">${esc(ref)}</option>`).join("");
  const what = lane.slots == null
    ? `all ${slots.length || "the"} layers of ${esc(lane.base)}, in order (the default)`
    : `${slots.length} slot${slots.length === 1 ? "" : "s"} of its own`;
  return `<div class="lane" role="listitem" data-lane="${esc(lane.name)}" data-base="${esc(lane.base)}" style="--chip:${esc(color)}"
      aria-label="Lane ${esc(lane.name)}">
    <div class="lane-head"><label class="lane-title">lane <input type="text" class="lane-name" data-action="lane-name" data-lane="${i}"
        value="${esc(lane.name)}" spellcheck="false" aria-label="Name of lane ${esc(lane.name)}"></label>
      <button type="button" class="lane-x" data-action="remove-lane" data-lane="${i}" aria-label="Remove lane ${esc(lane.name)}">✕</button></div>
    <label class="lane-base">base <select data-action="lane-base" data-lane="${i}" aria-label="Base model of lane ${esc(lane.name)}">${bases}</select></label>
    <div class="lane-what">${what}</div>
    <div class="lane-slots">${chips}</div>
    <div class="slot-controls">
      <select data-action="lane-add-layer" data-lane="${i}" aria-label="Add a layer to lane ${esc(lane.name)}"><option value="">+ layer…</option>${options}</select>
      ${lane.slots != null ? `<button type="button" data-action="lane-reset" data-lane="${i}">all layers of ${esc(lane.base)}</button>` : ""}
    </div></div>`;
}

function stitchHtml(st, k, lanes) {
  const laneOpts = (sel) => lanes.map((l) => `<option value="${esc(l.name)}"${l.name === sel ? " selected" : ""}>${esc(l.name)}</option>`).join("");
  const types = STITCHES.map((t) => `<option value="${esc(t)}"${t === st.type ? " selected" : ""}>${esc(t)}</option>`).join("");
  const after = st.after || [0, 0];
  return `<div class="stitch" role="listitem" data-stitch="${k}" aria-label="Stitch ${k}">
    from <select data-action="stitch-from" data-stitch="${k}" aria-label="Stitch ${k}: from lane">${laneOpts(st.from)}</select>
    after slot <input type="number" min="0" value="${after[0]}" data-action="stitch-after-from" data-stitch="${k}" aria-label="Stitch ${k}: after slot of the from lane">
    → <select data-action="stitch-to" data-stitch="${k}" aria-label="Stitch ${k}: to lane">${laneOpts(st.to)}</select>
    after slot <input type="number" min="0" value="${after[1]}" data-action="stitch-after-to" data-stitch="${k}" aria-label="Stitch ${k}: after slot of the to lane">
    <select data-action="stitch-type" data-stitch="${k}" aria-label="Stitch ${k}: type">${types}</select>
    ${st.type === "lowrank" ? `rank <input type="number" min="1" value="${st.rank || 64}" data-action="stitch-rank" data-stitch="${k}" aria-label="Stitch ${k}: rank">` : ""}
    <button type="button" data-action="remove-stitch" data-stitch="${k}" aria-label="Remove stitch ${k}">✕</button></div>`;
}

function renderLanes(root) {
  const {models, lanes, stitches, mixture} = state();
  const colors = Object.fromEntries(models.map((m) => [m.alias, m.color]));
  const addLane = models.map((m) => `<option value="${esc(m.alias)}">${esc(m.alias)}</option>`).join("");
  const mixtures = MIXTURES.map((t) => `<option value="${esc(t)}"${t === mixture ? " selected" : ""}>${
    esc(MIXTURE_LABELS[t] ? `${t}: ${MIXTURE_LABELS[t]}` : t)}</option>`).join("");
  root.innerHTML = `<div class="board-count">${lanes.length} lane${lanes.length === 1 ? "" : "s"} side by side</div>` +
    `<div class="board-note" role="status" aria-live="polite">${esc(note)}</div>` +
    `<div class="board-lanes" role="list">${lanes.map((l, i) => laneHtml(l, i, models, colors)).join("")}
      <div class="lane add"><select data-action="add-lane" aria-label="Add a lane"><option value="">+ lane…</option>${addLane}</select></div></div>` +
    `<div class="board-stitches"><div class="board-section">Stitches <small>(a lane's state after one of its slots, added into another lane)</small></div>
      <div role="list">${stitches.map((s, k) => stitchHtml(s, k, lanes)).join("")}</div>
      <button type="button" data-action="add-stitch"${lanes.length < 2 ? " disabled" : ""}>+ stitch</button></div>` +
    `<div class="board-mixture"><label>Output mixture <select data-action="mixture" aria-label="Output mixture">${mixtures}</select></label></div>` +
    `<div class="board-mode"><button type="button" data-action="to-single">One stream instead</button></div>`;
}

function onLaneEvent(action, el) {
  const p = lanesPart();
  const i = parseInt(el.dataset.lane), k = parseInt(el.dataset.stitch);
  const num = (x, lo) => { const n = parseInt(x); return Number.isNaN(n) ? lo : Math.max(lo, n); };
  switch (action) {
    case "add-lane": if (el.value) commitLanes(laneOps.addLane(p, el.value)); return true;
    case "remove-lane": commitLanes(laneOps.removeLane(p, i)); return true;
    case "lane-base": commitLanes(laneOps.setBase(p, i, el.value)); return true;
    case "lane-name": commitLanes(laneOps.rename(p, i, el.value)); return true;
    case "lane-add-layer": if (el.value) commitLanes(laneOps.addLayer(p, i, el.value)); return true;
    case "lane-remove-layer": commitLanes(laneOps.removeLayer(p, i, parseInt(el.dataset.slot))); return true;
    case "lane-reset": commitLanes(laneOps.resetLayers(p, i)); return true;
    case "add-stitch": commitLanes(laneOps.addStitch(p)); return true;
    case "remove-stitch": commitLanes(laneOps.removeStitch(p, k)); return true;
    case "stitch-from": commitLanes(laneOps.setStitch(p, k, {from: el.value})); return true;
    case "stitch-to": commitLanes(laneOps.setStitch(p, k, {to: el.value})); return true;
    case "stitch-after-from": commitLanes(laneOps.setStitch(p, k, {after: [num(el.value, 0), p.stitches[k].after[1]]})); return true;
    case "stitch-after-to": commitLanes(laneOps.setStitch(p, k, {after: [p.stitches[k].after[0], num(el.value, 0)]})); return true;
    case "stitch-type": commitLanes(laneOps.setStitch(p, k, {type: el.value})); return true;
    case "stitch-rank": commitLanes(laneOps.setStitch(p, k, {rank: num(el.value, 1)})); return true;
    case "mixture": commitLanes({...p, mixture: el.value}); return true;
    case "to-single": toSingle(); return true;
    case "to-lanes": toLanes(); return true;
  }
  return false;
}

function render() {
  const root = element.querySelector(".mango-board");
  if (!root) return;
  if (state().lanes) { renderLanes(root); return; }
  const {models, slots} = state();
  const colors = Object.fromEntries(models.map((m) => [m.alias, m.color]));
  const gap = (k, last) => `<div class="slot-gap${last ? " last" : ""}" data-gap="${k}">${last ? (slots.length
    ? "Drop a layer here to append a slot" : "Drag layer chips here to build the recipe (or click a chip)") : ""}</div>`;
  let html = "";
  slots.forEach((s, i) => { html += gap(i, false) + slotHtml(s, i, slots.length, models, colors); });
  const shown = note;
  root.innerHTML = `<div class="board-count">${slots.length} slot${slots.length === 1 ? "" : "s"}</div>` +
    `<div class="board-note" role="status" aria-live="polite">${esc(shown)}</div>` +
    `<div class="board-slots" role="list">${html}${gap(slots.length, true)}</div>` +
    `<div class="board-mode"><button type="button" data-action="to-lanes" title="Each model on its own stream with its own head, joined by stitches and an output mixture">Run models side by side (lanes)</button></div>`;
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
  if (onLaneEvent(btn.dataset.action, btn)) return;
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
  if (state().lanes) { onLaneEvent(el.dataset.action, el); return; }
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

const dropTarget = (e) => e.target.closest && (e.target.closest(".slot") || e.target.closest(".slot-gap") || e.target.closest(".lane[data-lane]"));
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
  if (state().lanes) {  // a layer dropped onto a lane joins it
    const laneEl = e.target.closest && e.target.closest(".lane[data-lane]");
    const i = laneEl ? state().lanes.findIndex((l) => l.name === laneEl.dataset.lane) : -1;
    if (expert && i >= 0) commitLanes(laneOps.addLayer(lanesPart(), i, expert));
    return;
  }
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
window.__mangoAddSlot = (e) => {
  const v = state();
  if (!v.lanes) { commit(ops.addSlot(v.slots, e.detail.expert, null)); return; }
  // lanes: the layer joins the (last) lane on its model; elsewhere it is dragged onto the lane it joins
  const alias = e.detail.expert.split(":")[0];
  const i = v.lanes.map((l) => l.base).lastIndexOf(alias);
  if (i < 0) { say(`No lane runs on ${alias}: drag ${e.detail.expert} onto the lane it should join, or add a lane on ${alias}.`); commitLanes(null); return; }
  commitLanes(laneOps.addLayer(lanesPart(), i, e.detail.expert));
};
window.addEventListener("mango:add-slot", window.__mangoAddSlot);

render();
watch("value", () => {
  if (props.value !== committed) note = "";  // a value from the server (a recipe opened): no stale note
  render();
});
