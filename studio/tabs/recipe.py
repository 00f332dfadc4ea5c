"""Recipe tab: the layer palette, the slot board, recipe settings, inline plan validation, saved versions
(open, duplicate, compare, delete and restore) and YAML import/export (mergekit passthrough too)."""

from __future__ import annotations

import html
import json
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

import gradio as gr

from mol.errors import RecipeError
from mol.export import FORMATS
from mol.export.mergekit import export_mergekit
from mol.recipe import (
    ADAPTER_TYPES,
    DEFAULT_BOTTLENECK_RANK,
    AdapterSpec,
    MixtureSpec,
    RouterSpec,
    router_kind,
    router_types,
)
from studio import draft_recipe as rb
from studio.controller import StudioController, checked_yaml, edit_lanes_yaml, edit_yaml, save_recipe
from studio.engine import PlanReport
from studio.errors import flag, record_id, whole
from studio.errors import text as text_arg
from studio.tabs.common import (
    api_errors,
    fmt_bytes,
    fmt_count,
    message_html,
    palette_models,
    user_message,
    workspace_refs,
)

__all__ = ["create_recipe_tab", "save_recipe"]  # save_recipe: re-exported from studio.controller

STATIC = Path(__file__).resolve().parents[1] / "static"
VERSION_COLUMNS = ["Recipe", "Version", "Saved (UTC)", "Note", "Id", "State"]


# ---- rendering --------------------------------------------------------------------------------------


def plan_html(report: PlanReport | None) -> str:
    if report is None:
        return (
            '<div class="plan empty" role="status"><div class="plan-head">Empty recipe</div>'
            "Drag layer chips from the palette onto the board to add slots.</div>"
        )
    if not report.ok:
        return (
            f'<div class="plan error" role="alert"><div class="plan-head">Recipe error</div>'
            f'<div class="plan-message">{html.escape(report.error or "")}</div></div>'
        )
    s = report.summary
    mem = s["memory"]
    facts = [
        f"Reads {s['tensors_to_read']} tensors ({fmt_bytes(s['bytes_to_read'])}) from disk",
        f"Memory estimate (fp32, 2048-token context): weights {fmt_bytes(mem['weights'])}, "
        f"KV cache {fmt_bytes(mem['kv_cache'])}, total {fmt_bytes(mem['total'])}",
        f"Trainable (adapters and routers): {fmt_count(s['trainable_parameters'])} parameters",
    ]
    items = "".join(f"<li>{html.escape(f)}</li>" for f in facts)
    items += "".join(f'<li class="plan-warning">warning: {html.escape(w)}</li>' for w in report.warnings)
    head = (
        f"Valid: {s['slots']} slot{'s' if s['slots'] != 1 else ''} ({s['routed_slots']} routed), "
        f"base {s['base']}, width {s['width']}"
    )
    if s.get("lanes"):
        lanes = "; ".join(
            f"{ln['name']}: {ln['base']}, {ln['slots']} slots"
            + (f" ({ln['routed_slots']} routed)" if ln["routed_slots"] else "")
            + f", width {ln['width']}"
            for ln in s["lanes"]
        )
        n = s.get("stitches") or 0
        head = (
            f"Valid: {len(s['lanes'])} lanes side by side ({lanes}), {n} stitch{'es' if n != 1 else ''}, "
            f"output mixture: {rb.mixture_label(s.get('mixture') or 'token')}"
        )
    return f'<div class="plan ok" role="status"><div class="plan-head">{html.escape(head)}</div><ul>{items}</ul></div>'


def diff_html(diff: Any) -> str:
    """A version comparison: what changed outside the slots, which slots changed, and the text diff."""
    d = diff.diff
    title = f"{d_label(diff.old)} → {d_label(diff.new)}"
    if diff.identical:
        return f'<div class="version-diff"><strong>{html.escape(title)}</strong>: identical.</div>'
    items = []
    for c in d.changes:
        items.append(
            f"{c.path}: {c.kind}"
            + (
                f" ({c.old!r} → {c.new!r})"
                if c.kind == "changed"
                else f" ({c.new!r})"
                if c.kind == "added"
                else f" ({c.old!r})"
            )
        )
    for s in d.slots:
        if s.kind == "added":
            items.append(f"slot {s.new_index} added: {_slot_text(s.new)}")
        elif s.kind == "removed":
            items.append(f"slot {s.old_index} removed: {_slot_text(s.old)}")
        else:
            items.append(
                f"slot {s.old_index} → {s.new_index} changed: {_slot_text(s.old)} ⇒ {_slot_text(s.new)}"
            )
    lis = "".join(f"<li>{html.escape(i)}</li>" for i in items)
    return (
        f'<div class="version-diff"><strong>{html.escape(title)}</strong><ul>{lis}</ul>'
        f"<details><summary>YAML diff</summary><pre>{html.escape(d.text_diff)}</pre></details></div>"
    )


def d_label(v: Any) -> str:
    return f"{v.recipe_name} v{v.number}"


def _slot_text(slot: Any) -> str:
    if isinstance(slot, dict):
        experts = ", ".join(map(str, slot.get("experts") or []))
        router = slot.get("router")
        return f"[{experts}]" + (
            f" {router.get('type', RouterSpec.type)} router" if isinstance(router, dict) else ""
        )
    if isinstance(slot, list):  # shorthand: a list of experts
        return f"[{', '.join(map(str, slot))}]"
    return f"[{slot}]"  # shorthand: one expert or a range


def palette_view(workspace: list[dict], marks: dict[str, str]) -> list[dict]:
    """The palette's models: every usable one (marked with why it cannot join the recipe, where it cannot),
    then the unreadable ones (no chips, their error)."""
    colors = rb.model_colors([c["alias"] for c in workspace or []])
    out = [{**m, "blocked": marks.get(m["alias"])} for m in palette_models(workspace)]
    for c in workspace or []:
        if "error" in c:
            out.append(
                {
                    "alias": c["alias"],
                    "color": colors[c["alias"]],
                    "layers": 0,
                    "family": "",
                    "width": None,
                    "blocked": marks.get(c["alias"]) or c["error"],
                }
            )
    return out


def _same_palette(a: Any, b: Any) -> bool:
    def norm(v: Any) -> list:
        models = (v or {}).get("models") if isinstance(v, dict) else None
        return [{**m, "blocked": m.get("blocked")} for m in models or [] if isinstance(m, dict)]

    return norm(a) == norm(b)


def editing_html(loaded: dict | None, name: str, dirty: bool, has_slots: bool) -> str:
    """The tab's header: which saved version the board edits, and whether it has unsaved changes."""
    if loaded and loaded.get("version"):
        head = f"editing {loaded.get('name') or name} v{loaded['version']}"
    elif has_slots:
        head = f"editing a new recipe '{(name or '').strip() or 'unnamed'}' (not saved yet)"
    else:
        head = "new recipe: nothing on the board yet"
    suffix = ' · <span class="unsaved">unsaved changes</span>' if dirty else ""
    kind = "dirty" if dirty else "clean"
    return f'<div class="recipe-editing {kind}" role="status">{html.escape(head)}{suffix}</div>'


def export_target_html(loaded: dict | None, dirty: bool, model: bool = False) -> str:
    """What the exports take (every export takes the same: the saved version the board edits), said where
    the export buttons are."""
    weights = (
        " Weights: as built (untrained adapters and routers), or those of the training run whose id you give."
        if model
        else ""
    )
    if not (loaded and loaded.get("version_id")):
        text = (
            "Exports take a saved version: save the board (or open a saved version) first. "
            "Nothing is saved yet; the YAML box shows the unsaved board."
        )
    elif dirty:
        text = (
            f"Exports take the saved version {loaded.get('name', '')} v{loaded['version']}, not the board: "
            "its unsaved changes are not exported until you save them."
        )
    else:
        text = f"Exports take the saved version {loaded.get('name', '')} v{loaded['version']} (the board shows it)."
    return f'<div class="export-target" role="note">{html.escape(text + weights)}</div>'


def adapter_view(board_v: Any) -> tuple[bool, str]:
    """Whether the board's adapter setting applies (shown), and a note on it for a lanes recipe. A lane runs its
    own model's layers on that model's stream, so it needs no adapter; only a layer it takes from another model
    enters its stream through one (then the setting applies to those layers alone)."""
    try:
        part = rb.board_lanes(board_v)
    except Exception:  # a board the browser sent wrong: the plan says why, the setting stays as it is
        return True, ""
    if part is None:
        return True, ""
    borrowing = [
        ln["name"]
        for ln in part["lanes"]
        if any(e.split(":", 1)[0] != ln["base"] for s in ln["slots"] or [] for e in s["experts"])
    ]
    if borrowing:
        lanes = ("lane " if len(borrowing) == 1 else "lanes ") + ", ".join(borrowing)
        return True, (
            f"Lanes: the adapter applies only to the layers a lane takes from another model (here in {lanes}); "
            "each lane's own layers need none."
        )
    return False, (
        "No adapter for lanes: each lane runs its own model's layers on that model's stream, and stitches join "
        "the lanes. The setting comes back when a lane takes a layer of another model."
    )


def adapter_note_html(text: str) -> str:
    return f'<div class="adapter-note" role="note">{html.escape(text)}</div>' if text else ""


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        obj = asdict(obj)
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, datetime):
        return obj.isoformat()
    return obj


# ---- the tab ----------------------------------------------------------------------------------------


def router_kinds_attr() -> str:
    """mol's registered router kinds, the default first, for the board (an HTML attribute value)."""
    default = RouterSpec().type
    kinds = [default] + [t for t in router_types() if t != default]
    data = [{"type": t, "takes_top_k": router_kind(t).takes_top_k} for t in kinds]
    return html.escape(json.dumps(data), quote=True)


def json_attr(value: Any) -> str:
    return html.escape(json.dumps(list(value)), quote=True)


def mixture_kinds() -> list[str]:
    """mol's mixture types, the default first."""
    default = MixtureSpec().type
    return [default] + [t for t in rb.mixture_types() if t != default]


def create_recipe_tab(ctl: StudioController, workspace: gr.State) -> dict[str, Any]:
    models = palette_models(workspace.value)
    aliases = [m["alias"] for m in models]
    # {"recipe_id", "version", "version_id", "name", "draft"} of the version being edited; "draft" is the board's
    # YAML of it as opened or saved (the board differs from it: unsaved changes)
    loaded = gr.State(None)
    dirty_state = gr.State(False)
    pending_save = gr.State(None)  # the name a save waits on a confirmation for
    # the board while it has unsaved changes, kept in the browser (localStorage) so that it survives a reload
    draft_store = gr.BrowserState(None, storage_key="mango-recipe-board-draft", secret="mango-recipe-board")
    editing = gr.HTML(editing_html(None, "", False, False), elem_id="recipe-editing")
    with gr.Row():
        with gr.Column(scale=1, min_width=220):
            gr.Markdown("**Layer palette** — drag a chip onto the board")
            palette = gr.HTML(
                value={"models": models},
                html_template='<div class="mango-palette"></div>',
                js_on_load=(STATIC / "palette.js").read_text(),
                elem_id="layer-palette",
                apply_default_css=False,
            )
        with gr.Column(scale=2, min_width=320):
            gr.Markdown("**Recipe board** — one row per slot; several candidates make a routed slot")
            board = gr.HTML(
                value={"models": models, "slots": []},
                html_template=(
                    f'<div class="mango-board" data-router-kinds="{router_kinds_attr()}" '
                    f'data-stitch-types="{json_attr(rb.stitch_types())}" '
                    f'data-mixture-types="{json_attr(mixture_kinds())}" '
                    f'data-lane-name-pattern="{html.escape(rb.ALIAS_RE.pattern, quote=True)}" '
                    f'data-mixture-labels="{html.escape(json.dumps({k: rb.mixture_label(k) for k in mixture_kinds()}), quote=True)}"></div>'
                ),
                js_on_load=(STATIC / "board.js").read_text(),
                elem_id="recipe-board",
                apply_default_css=False,
            )
            plan_status = gr.HTML(plan_html(None), elem_id="plan-status")
        with gr.Column(scale=1, min_width=260):
            gr.Markdown("**The fused model** — as the board describes it")
            diagram = gr.HTML(ctl.draft_diagram(None, workspace.value), elem_id="recipe-diagram")
        with gr.Column(scale=1, min_width=240):
            name = gr.Textbox(label="Recipe name", value="my-recipe", elem_id="recipe-name")
            base = gr.Dropdown(
                choices=aliases,
                value=aliases[0] if aliases else None,
                label="Base model",
                info="embeddings, final norm and head come from it",
                elem_id="recipe-base",
            )
            with gr.Row(elem_id="recipe-adapter-row") as adapter_row:  # hidden for lanes: see adapter_view
                adapter = gr.Radio(
                    list(ADAPTER_TYPES), value=AdapterSpec.type, label="Adapter", elem_id="recipe-adapter"
                )
                rank = gr.Number(
                    value=DEFAULT_BOTTLENECK_RANK,
                    precision=0,
                    minimum=1,
                    label="Bottleneck rank",
                    info="only a bottleneck adapter has a rank",
                    interactive=AdapterSpec.type == "bottleneck",
                    elem_id="recipe-rank",
                )
            adapter_note = gr.HTML("", visible=False, elem_id="recipe-adapter-note")
            note = gr.Textbox(label="Version note", placeholder="what changed", elem_id="recipe-note")
            save = gr.Button("Save version", variant="primary", elem_id="save-recipe")
            with gr.Row(visible=False, elem_id="confirm-save-row") as confirm_row:
                confirm_btn = gr.Button(
                    "Yes, add a version to it", variant="primary", size="sm", elem_id="confirm-save"
                )
                cancel_btn = gr.Button("Cancel", size="sm", elem_id="cancel-save")
            save_status = gr.HTML(elem_id="save-status")

    with gr.Accordion("Saved recipes and versions", open=True):
        show_deleted = gr.Checkbox(label="Show deleted recipes", value=False, elem_id="show-deleted")
        versions = gr.Dataframe(
            headers=VERSION_COLUMNS,
            value=[],
            interactive=False,
            elem_id="recipe-versions",
            label="Versions (newest first)",
            max_height=320,
        )
        with gr.Row():
            with gr.Column(scale=2):
                version_pick = gr.Dropdown(choices=[], label="Version", elem_id="version-pick")
                with gr.Row():
                    open_btn = gr.Button("Open", size="sm", elem_id="open-version", min_width=90)
                    duplicate_btn = gr.Button(
                        "Duplicate", size="sm", elem_id="duplicate-version", min_width=90
                    )
                    delete_btn = gr.Button(
                        "Delete recipe", size="sm", variant="stop", elem_id="delete-recipe", min_width=90
                    )
                    restore_btn = gr.Button(
                        "Restore recipe", size="sm", elem_id="restore-recipe", min_width=90
                    )
            with gr.Column(scale=2):
                compare_with = gr.Dropdown(choices=[], label="Compare with", elem_id="compare-with")
                compare_btn = gr.Button(
                    "Compare the two versions (older → newer)", size="sm", elem_id="compare-versions"
                )
        versions_status = gr.HTML(elem_id="versions-status")
        diff_view = gr.HTML(elem_id="version-diff")

    with gr.Accordion("YAML: import and export", open=False):
        yaml_code = gr.Code(
            language="yaml",
            label="Recipe YAML of the board (Mango or mergekit passthrough)",
            elem_id="recipe-yaml",
            interactive=True,
        )
        with gr.Row():
            import_btn = gr.Button("Import YAML above", elem_id="import-yaml")
            upload = gr.UploadButton("Import file…", file_types=[".yaml", ".yml"], elem_id="upload-yaml")
            export_btn = gr.Button("Export YAML (saved version)", elem_id="export-yaml")
            export_mk_btn = gr.Button("Export mergekit YAML (saved version)", elem_id="export-mergekit")
        examples = gr.Dropdown(  # a row of its own: the full file names fit
            choices=ctl.example_names(),
            label="Example recipes",
            elem_id="recipe-examples",
        )
        yaml_target = gr.HTML(export_target_html(None, False), elem_id="yaml-export-target")
        export_file = gr.File(label="Exported recipe", elem_id="recipe-export", visible=True)
        import_status = gr.HTML(elem_id="import-status")

    with gr.Accordion("Export the model", open=False):
        gr.Markdown(
            "The saved version being edited as a Hugging Face folder: a plain same-architecture stack in its own "
            "architecture, anything else as `MoLForCausalLM`."
        )
        model_target = gr.HTML(export_target_html(None, False, model=True), elem_id="model-export-target")
        with gr.Row():
            export_format = gr.Radio(list(FORMATS), value=FORMATS[0], label="Format", elem_id="export-format")
            export_run = gr.Dropdown(  # app.py keeps its choices those of the open version
                choices=ctl.weight_choices(None),
                value=0,
                label="Weights",
                elem_id="export-training-run",
            )
            export_model_btn = gr.Button("Export model (.zip)", elem_id="export-model")
        with gr.Row():
            push_repo = gr.Textbox(
                label="Hub repository", placeholder="user-or-org/name", elem_id="push-repo"
            )
            push_token = gr.Textbox(label="Hugging Face token", type="password", elem_id="push-token")
            push_btn = gr.Button("Push to the Hub", elem_id="push-model")
        model_file = gr.File(label="Exported model", elem_id="model-export")
        export_status = gr.HTML(elem_id="export-status")

    settings = [name, base, adapter, rank]

    # ---- what the board's state says: header, export targets, the copy kept in the browser ----
    def state_views(name_v, base_v, adapter_v, rank_v, ws, board_v, loaded_v) -> dict:
        try:
            slots = rb.board_slots(board_v)
            lanes = rb.board_lanes(board_v)
        except Exception:
            slots, lanes = None, None
        try:
            draft = rb.board_draft(name_v, base_v, adapter_v, rank_v, workspace_refs(ws), board_v)
            signature = rb.draft_yaml(draft)
        except Exception:
            draft, signature = None, None
        if lanes is not None:  # a lanes board: "slots" below stands for what the board holds
            slots = lanes["lanes"]
        if loaded_v and loaded_v.get("version_id"):
            dirty = signature is None or signature != loaded_v.get("draft")
        else:
            dirty = bool(slots) or slots is None
        stored = None
        if dirty and slots:
            used = set((draft or {}).get("models") or {}) | {base_v}
            stored = {
                "name": name_v if isinstance(name_v, str) else "",
                "base": base_v,
                "adapter": adapter_v,
                "rank": int(rank_v) if isinstance(rank_v, int | float) and rank_v == rank_v else None,
                "slots": slots if lanes is None else [],
                "lanes": lanes,
                "models": {a: r for a, r in workspace_refs(ws).items() if a in used},
                "loaded": {k: loaded_v.get(k) for k in ("recipe_id", "version", "version_id")}
                if loaded_v
                else None,
            }
        return {
            editing: editing_html(loaded_v, name_v, dirty, bool(slots)),
            dirty_state: dirty,
            draft_store: stored,
            yaml_target: export_target_html(loaded_v, dirty),
            model_target: export_target_html(loaded_v, dirty, model=True),
        }

    state_outputs = [editing, dirty_state, draft_store, yaml_target, model_target]

    # ---- validation: every edit of the board or the settings ----
    def validate(name_v, base_v, adapter_v, rank_v, ws, board_v, loaded_v, palette_v):
        views = state_views(name_v, base_v, adapter_v, rank_v, ws, board_v, loaded_v)
        shown, adapter_text = adapter_view(board_v)
        views[adapter_row] = gr.update(visible=shown)
        views[adapter_note] = gr.update(value=adapter_note_html(adapter_text), visible=bool(adapter_text))
        pm = {"models": palette_view(ws, ctl.join_marks(ws, base_v))}
        # redrawn only when it changed: a redraw under a drag that starts from it would drop the drag
        views[palette] = gr.update() if _same_palette(pm, palette_v) else pm
        try:
            draft = rb.board_draft(name_v, base_v, adapter_v, rank_v, workspace_refs(ws), board_v)
            content = rb.board_has_content(board_v)
        except Exception as exc:
            return {**views, plan_status: plan_html(PlanReport(False, user_message(exc)))}
        report, plan = ctl.check_draft_with_plan(draft, content)
        return {
            **views,
            plan_status: plan_html(report),
            yaml_code: rb.draft_yaml(draft),
            diagram: ctl.draft_diagram(draft, ws, plan),
        }

    for comp in (board, base, adapter, rank, name):
        comp.change(
            validate,
            [*settings, workspace, board, loaded, palette],
            [plan_status, yaml_code, diagram, palette, adapter_row, adapter_note, *state_outputs],
            api_visibility="private",
            trigger_mode="always_last",
            show_progress="hidden",
        )

    adapter.change(  # the rank belongs to the bottleneck adapter only
        lambda a: gr.update(interactive=a == "bottleneck"), adapter, rank, api_visibility="private"
    )

    # ---- versions list ----
    def refresh_versions(include_deleted: bool, keep: int | None = None) -> dict:
        choices = ctl.version_choices(rows := ctl.version_rows(include_deleted))
        ids = [c[1] for c in choices]
        pick = keep if keep in ids else (ids[0] if ids else None)
        return {
            versions: rows,
            version_pick: gr.update(choices=choices, value=pick),
            compare_with: gr.update(choices=choices, value=None),
        }

    version_outputs = [versions, version_pick, compare_with]
    show_deleted.change(refresh_versions, show_deleted, version_outputs, api_visibility="private")

    def on_select_row(evt: gr.SelectData, rows):
        try:
            row = evt.index[0]
            picked = int(rows.iloc[row]["Id"]) if hasattr(rows, "iloc") else int(rows[row][4])
        except Exception:  # not a row of versions: the pick stays
            return {version_pick: gr.update()}
        return {version_pick: gr.update(value=picked)}

    versions.select(on_select_row, versions, version_pick, api_visibility="private")

    # ---- save: only a recipe that plans, and into another recipe only when confirmed ----
    def on_save(
        name_v, base_v, adapter_v, rank_v, note_v, ws, board_v, loaded_v, include_deleted, confirmed=False
    ):
        hide = {confirm_row: gr.update(visible=False), pending_save: None}
        try:
            draft = rb.board_draft(name_v, base_v, adapter_v, rank_v, workspace_refs(ws), board_v)
            report = ctl.check_draft(draft, rb.board_has_content(board_v))
            if report is not None and not report.ok:
                raise RecipeError(
                    f"{report.error} A recipe whose plan fails cannot be saved to run; fix it first."
                )
            taken = ctl.name_taken(draft["name"], loaded_v)
            if taken is not None and not confirmed:
                return {
                    save_status: message_html(
                        f"A recipe named '{taken.name}' already exists (latest version {taken.latest_version}). "
                        f"Saving adds version {taken.latest_version + 1} to it. Confirm, cancel, or change "
                        "the name."
                    ),
                    confirm_row: gr.update(visible=True),
                    pending_save: draft["name"],
                }
            version, warning = ctl.save_recipe(rb.draft_yaml(draft), note_v or "", loaded_v)
        except Exception as exc:
            return {save_status: message_html("Not saved: " + user_message(exc), ok=False), **hide}
        state = {
            "recipe_id": version.recipe_id,
            "version": version.number,
            "version_id": version.id,
            "name": version.recipe_name,
            "draft": rb.draft_yaml(draft),
        }
        msg = warning or f"Saved '{version.recipe_name}' as version {version.number}."
        return {
            save_status: message_html(msg, ok=warning is None),
            loaded: state,
            **refresh_versions(include_deleted, version.id),
            note: "",
            **hide,
            **state_views(name_v, base_v, adapter_v, rank_v, ws, board_v, state),
        }

    save_inputs = [*settings, note, workspace, board, loaded, show_deleted]
    save_outputs = [save_status, loaded, *version_outputs, note, confirm_row, pending_save, *state_outputs]
    saved = save.click(
        on_save,
        save_inputs,
        save_outputs,
        api_name="ui_save_recipe",
        api_visibility="undocumented",
    )

    def refresh_state(name_v, base_v, adapter_v, rank_v, ws, board_v, loaded_v):
        # once more after a save: a validation still running when Save was clicked saw the state before it
        return state_views(name_v, base_v, adapter_v, rank_v, ws, board_v, loaded_v)

    state_inputs = [*settings, workspace, board, loaded]
    saved.then(refresh_state, state_inputs, state_outputs, api_visibility="private")

    def on_confirm(*args):
        *values, pending_v = args
        if not pending_v or (values[0] or "").strip() != pending_v:  # the name changed since: ask again
            return on_save(*values)
        return on_save(*values, confirmed=True)

    confirmed_save = confirm_btn.click(
        on_confirm, [*save_inputs, pending_save], save_outputs, api_visibility="private"
    )
    confirmed_save.then(refresh_state, state_inputs, state_outputs, api_visibility="private")
    cancel_btn.click(
        lambda: {
            confirm_row: gr.update(visible=False),
            pending_save: None,
            save_status: message_html("Not saved: cancelled."),
        },
        None,
        [confirm_row, pending_save, save_status],
        api_visibility="private",
    )

    # ---- open / import: a recipe into the board ----
    def clean_state(recipe, ws, ids: dict | None) -> dict | None:
        """The `loaded` state of a saved version opened into the board (None: not a saved version)."""
        if not ids:
            return None
        rank_v = recipe.adapter.rank or DEFAULT_BOTTLENECK_RANK
        draft = rb.board_draft(
            recipe.name,
            recipe.base,
            recipe.adapter.type,
            rank_v,
            workspace_refs(ws),
            rb.board_value(recipe, []),
        )
        return {**ids, "name": recipe.name, "draft": rb.draft_yaml(draft)}

    def load_recipe(recipe, ws, ids) -> dict:
        ws = ctl.merge_models(ws, dict(recipe.models))
        pm = palette_models(ws)
        state = clean_state(recipe, ws, ids)
        return {
            name: recipe.name,
            base: gr.update(choices=[c["alias"] for c in ws], value=recipe.base),
            adapter: recipe.adapter.type,
            rank: gr.update(
                value=recipe.adapter.rank or DEFAULT_BOTTLENECK_RANK,
                interactive=recipe.adapter.type == "bottleneck",
            ),
            workspace: ws,
            palette: {"models": pm},
            board: rb.board_value(recipe, pm),
            loaded: state,
            editing: editing_html(state, recipe.name, state is None, True),
        }

    load_outputs = [name, base, adapter, rank, workspace, palette, board, loaded, editing]

    def on_open(version_id, ws):
        try:
            v, recipe = ctl.open_version(version_id)
        except Exception as exc:
            return {versions_status: message_html(user_message(exc), ok=False)}
        state = {"recipe_id": v.recipe_id, "version": v.number, "version_id": v.id}
        return {
            **load_recipe(recipe, ws, state),
            versions_status: message_html(f"Opened '{v.recipe_name}' version {v.number}."),
        }

    opened = open_btn.click(
        on_open,
        [version_pick, workspace],
        [*load_outputs, versions_status],
        api_name="ui_open_version",
        api_visibility="undocumented",
    )

    def on_duplicate(version_id, ws, include_deleted):
        try:
            copy = ctl.duplicate_version(version_id)
        except Exception as exc:
            return {versions_status: message_html(user_message(exc), ok=False)}
        return {
            **on_open(copy.id, ws),
            versions_status: message_html(f"Duplicated as '{copy.recipe_name}' (version 1), now open."),
            **refresh_versions(include_deleted, copy.id),
        }

    duplicated = duplicate_btn.click(
        on_duplicate,
        [version_pick, workspace, show_deleted],
        [*load_outputs, versions_status, *version_outputs],
        api_name="ui_duplicate_version",
        api_visibility="undocumented",
    )

    def on_delete(version_id, include_deleted):
        try:
            v = ctl.delete_recipe_of(version_id)
        except Exception as exc:
            return {versions_status: message_html(user_message(exc), ok=False)}
        return {
            versions_status: message_html(
                f"Deleted '{v.recipe_name}'. Tick 'Show deleted recipes' to restore it."
            ),
            **refresh_versions(include_deleted),
        }

    deleted = delete_btn.click(
        on_delete,
        [version_pick, show_deleted],
        [versions_status, *version_outputs],
        api_name="ui_delete_recipe",
        api_visibility="undocumented",
    )

    def on_restore(version_id, include_deleted):
        try:
            info = ctl.restore_recipe_of(version_id)
        except Exception as exc:
            return {versions_status: message_html(user_message(exc), ok=False)}
        return {
            versions_status: message_html(f"Restored '{info.name}'."),
            **refresh_versions(include_deleted, int(version_id)),
        }

    restored = restore_btn.click(
        on_restore,
        [version_pick, show_deleted],
        [versions_status, *version_outputs],
        api_name="ui_restore_recipe",
        api_visibility="undocumented",
    )

    def on_compare(old_id, new_id):
        try:
            return {diff_view: diff_html(ctl.compare(old_id, new_id)), versions_status: ""}
        except Exception as exc:
            return {diff_view: "", versions_status: message_html(user_message(exc), ok=False)}

    compare_btn.click(
        on_compare,
        [version_pick, compare_with],
        [diff_view, versions_status],
        api_name="ui_compare_versions",
        api_visibility="undocumented",
    )

    def on_import(text_v, ws):
        try:
            recipe, notes = ctl.import_reusing_aliases(text_v, ws)
        except Exception as exc:
            return {import_status: message_html("Not imported: " + user_message(exc), ok=False)}
        size = f"{len(recipe.lanes)} lanes" if recipe.lanes else f"{len(recipe.slots)} slots"
        msg = f"Imported '{recipe.name}' ({size})." + "".join(f" Note: {n}" for n in notes)
        return {**load_recipe(recipe, ws, None), import_status: message_html(msg)}

    imported = import_btn.click(
        on_import,
        [yaml_code, workspace],
        [*load_outputs, import_status],
        api_name="ui_import_yaml",
        api_visibility="undocumented",
    )

    def on_upload(file, ws):
        try:
            text_v = ctl.read_recipe_upload(file)
        except Exception as exc:
            return {import_status: message_html("Not imported: " + user_message(exc), ok=False)}
        return on_import(text_v, ws)

    uploaded = upload.upload(
        on_upload, [upload, workspace], [*load_outputs, import_status], api_visibility="private"
    )

    def on_example(filename, ws):
        try:
            recipe = ctl.example_recipe(filename)
        except Exception as exc:
            return {import_status: message_html(user_message(exc), ok=False)}
        return {
            **load_recipe(recipe, ws, None),
            import_status: message_html(f"Loaded the example '{recipe.name}'."),
        }

    example_loaded = examples.change(
        on_example, [examples, workspace], [*load_outputs, import_status], api_visibility="private"
    )

    # ---- exports: all take the saved version the board edits, and say so ----
    def unsaved_note(dirty_v) -> str:
        return " The board's unsaved changes are not in it: save them to export them." if dirty_v else ""

    def on_export(name_v, base_v, adapter_v, rank_v, ws, board_v, loaded_v=None, dirty_v=False, fmt="mango"):
        try:
            path, v = ctl.export_saved_yaml(loaded_v, fmt)
        except Exception as exc:
            return {
                export_file: None,
                import_status: message_html("Not exported: " + user_message(exc), ok=False),
            }
        kind = "mergekit passthrough YAML" if fmt == "mergekit" else "Mango recipe YAML"
        return {
            export_file: str(path),
            import_status: message_html(
                f"Exported the saved version '{v.recipe_name}' v{v.number} as {kind}: {path.name}."
                + unsaved_note(dirty_v)
            ),
        }

    export_inputs = [*settings, workspace, board, loaded, dirty_state]
    export_btn.click(
        on_export,
        export_inputs,
        [export_file, import_status],
        api_name="ui_export_yaml",
        api_visibility="undocumented",
    )
    export_mk_btn.click(
        lambda *a: on_export(*a, fmt="mergekit"),
        export_inputs,
        [export_file, import_status],
        api_name="ui_export_mergekit",
        api_visibility="undocumented",
    )

    def weights_text(run_id) -> str:
        return (
            f"the weights of training run #{int(run_id)}"
            if run_id
            else "as built (untrained adapters and routers)"
        )

    def on_export_model(fmt, run_id, loaded_v, dirty_v=False):
        try:
            v = ctl.saved_version(loaded_v)
            path = ctl.export_model(fmt, run_id, loaded_v)
        except Exception as exc:
            return {
                model_file: None,
                export_status: message_html("Not exported: " + user_message(exc), ok=False),
            }
        return {
            model_file: str(path),
            export_status: message_html(
                f"Exported the saved version '{v.recipe_name}' v{v.number}, {weights_text(run_id)}, "
                f"format {fmt}: {path.name}." + unsaved_note(dirty_v)
            ),
        }

    def on_push(repo_id, token, run_id, loaded_v, dirty_v=False):
        try:
            v = ctl.saved_version(loaded_v)
            url = ctl.push_model(repo_id, token, run_id, loaded_v)
        except Exception as exc:
            return {export_status: message_html("Not pushed: " + user_message(exc), ok=False)}
        return {
            export_status: message_html(
                f"Pushed the saved version '{v.recipe_name}' v{v.number}, {weights_text(run_id)}: {url}"
                + unsaved_note(dirty_v)
            )
        }

    export_model_btn.click(
        on_export_model,
        [export_format, export_run, loaded, dirty_state],
        [model_file, export_status],
        api_name="ui_export_model",
        api_visibility="undocumented",
    )
    push_btn.click(
        on_push,
        [push_repo, push_token, export_run, loaded, dirty_state],
        export_status,
        api_name="ui_push_model",
        api_visibility="undocumented",
    )

    # ---- the board kept in the browser: restored when the page loads (app.py wires it to the load) ----
    def restore_board(stored, ws) -> dict:
        d = ctl.restore_draft(stored, ws)
        if d is None:
            return {draft_store: None}
        ws = d["workspace"]
        pm = palette_models(ws)
        aliases = [c["alias"] for c in ws]
        state = None
        if d["loaded"]:
            try:
                v, recipe = ctl.open_version(d["loaded"]["version_id"])
                state = clean_state(recipe, ws, d["loaded"])
            except Exception:
                state = None
        rank_v = d["rank"] or DEFAULT_BOTTLENECK_RANK
        return {
            name: d["name"],
            base: gr.update(choices=aliases, value=d["base"] if d["base"] in aliases else None),
            adapter: d["adapter"],
            rank: gr.update(value=rank_v, interactive=d["adapter"] == "bottleneck"),
            workspace: ws,
            palette: {"models": pm},
            board: {"models": pm, "slots": d["slots"], **(d.get("lanes") or {})},
            loaded: state,
            editing: editing_html(state, d["name"], True, True),
            save_status: message_html("Restored the board's unsaved changes from this browser."),
        }

    restore_outputs = [name, base, adapter, rank, workspace, palette, board, loaded, editing, save_status]
    restore_outputs.append(draft_store)

    _register_api(ctl)
    return {
        "palette": palette,
        "board": board,
        "name": name,
        "base": base,
        "adapter": adapter,
        "rank": rank,
        "note": note,
        "save": save,
        "save_status": save_status,
        "plan_status": plan_status,
        "loaded": loaded,
        "versions": versions,
        "version_pick": version_pick,
        "compare_with": compare_with,
        "show_deleted": show_deleted,
        "versions_status": versions_status,
        "diff_view": diff_view,
        "yaml_code": yaml_code,
        "import_status": import_status,
        "export_file": export_file,
        "export_weights": export_run,
        "diagram": diagram,
        "editing": editing,
        "refresh_versions": refresh_versions,
        "version_outputs": version_outputs,
        "recipe_loaded": [opened, duplicated, imported, uploaded, example_loaded],
        "saved": saved,
        "changed_versions": [deleted, restored, confirmed_save],
        # the page's load event restores the board kept in the browser (app.py wires it)
        "restore_board": (restore_board, [draft_store, workspace], restore_outputs),
    }


def _register_api(ctl: StudioController) -> None:
    """The recipe tab's actions as API endpoints over recipe YAML (usable from gradio_client)."""
    engine = ctl.engine

    def edited(yaml_text: str, op, *args) -> str:
        return edit_yaml(yaml_text, op, *args, limit=engine.config.limits.recipe_chars)

    @api_errors
    def validate_recipe(yaml_text: str) -> dict:
        """Plan a recipe: {ok, error, summary, warnings}."""
        recipe, _ = rb.parse_recipe_text(checked_yaml(yaml_text, engine.config.limits.recipe_chars))
        report = engine.check(recipe.to_dict())
        return asdict(report)

    @api_errors
    def save_recipe_api(yaml_text: str, note: str = "") -> dict:
        """Save a recipe as a new version (a new recipe if no live recipe has its name)."""
        version, warning = save_recipe(engine, yaml_text, note)
        return {**_jsonable(version), "warning": warning}

    @api_errors
    def list_recipes(include_deleted: bool = False) -> list[dict]:
        return _jsonable(
            engine.repo.list_recipes(deleted=None if flag(include_deleted, "include_deleted") else False)
        )

    @api_errors
    def list_versions(recipe_id: int) -> list[dict]:
        return _jsonable(engine.repo.list_versions(record_id(recipe_id, "recipe")))

    @api_errors
    def get_version(version_id: int) -> dict:
        return _jsonable(engine.repo.get_version_by_id(record_id(version_id, "recipe version")))

    @api_errors
    def duplicate_version(version_id: int, new_name: str = "") -> dict:
        return _jsonable(
            engine.repo.duplicate_recipe(
                record_id(version_id, "recipe version"), text_arg(new_name, "The new name", 10_000) or None
            )
        )

    @api_errors
    def compare_versions(old_version_id: int, new_version_id: int) -> dict:
        d = engine.repo.compare_versions(
            record_id(old_version_id, "recipe version"), record_id(new_version_id, "recipe version")
        ).diff

        def change(c) -> dict:  # "key", not "path": API clients take a "path" entry for a file to download
            return {"key": c.path, "kind": c.kind, "old": c.old, "new": c.new}

        slots = [
            {
                "kind": s.kind,
                "old_index": s.old_index,
                "new_index": s.new_index,
                "old": s.old,
                "new": s.new,
                "fields": [change(f) for f in s.fields],
            }
            for s in d.slots
        ]
        return {
            "identical": d.identical,
            "changed_keys": list(d.changed_keys),
            "changes": [change(c) for c in d.changes],
            "slots": slots,
            "text_diff": d.text_diff,
        }

    @api_errors
    def delete_recipe(recipe_id: int) -> dict:
        return _jsonable(engine.repo.delete_recipe(record_id(recipe_id, "recipe")))

    @api_errors
    def restore_recipe(recipe_id: int, new_name: str = "") -> dict:
        return _jsonable(
            engine.repo.restore_recipe(
                record_id(recipe_id, "recipe"), text_arg(new_name, "The new name", 10_000) or None
            )
        )

    @api_errors
    def export_mergekit_yaml(yaml_text: str) -> str:
        """A plain-stacking recipe as mergekit passthrough YAML (or an error saying why it has none)."""
        return export_mergekit(
            engine.plan(engine.recipe_from_yaml(checked_yaml(yaml_text, engine.config.limits.recipe_chars)))
        )

    @api_errors
    def import_recipe(text: str) -> str:
        """Mango or mergekit passthrough YAML in, canonical Mango YAML out."""
        return rb.parse_recipe_text(checked_yaml(text, engine.config.limits.recipe_chars))[0].to_yaml()

    def expert_arg(value: object) -> str:
        return text_arg(value, "The expert", 200, allow_none=False)

    def slot_arg(value: object, what: str = "The slot") -> int:
        return whole(value, what)

    @api_errors
    def add_slot(yaml_text: str, expert: str, index: int = -1) -> str:
        """Insert a plain slot holding `expert` ("alias:layer") before `index` (-1: append)."""
        index = slot_arg(index, "The index")
        return edited(yaml_text, rb.add_slot, expert_arg(expert), None if index < 0 else index)

    @api_errors
    def add_expert(yaml_text: str, slot: int, expert: str) -> str:
        return edited(yaml_text, rb.add_expert, slot_arg(slot), expert_arg(expert))

    @api_errors
    def remove_slot(yaml_text: str, slot: int) -> str:
        return edited(yaml_text, rb.remove_slot, slot_arg(slot))

    @api_errors
    def remove_expert(yaml_text: str, slot: int, expert: str) -> str:
        return edited(yaml_text, rb.remove_expert, slot_arg(slot), expert_arg(expert))

    @api_errors
    def move_slot(yaml_text: str, slot: int, to: int) -> str:
        return edited(yaml_text, rb.move_slot, slot_arg(slot), slot_arg(to, "The target position"))

    @api_errors
    def set_router(
        yaml_text: str, slot: int, router_type: str = RouterSpec.type, top_k: int = RouterSpec.top_k
    ) -> str:
        return edited(
            yaml_text,
            rb.set_router,
            slot_arg(slot),
            text_arg(router_type, "The router type", 100),
            whole(top_k, "top_k"),
        )

    def lanes_edited(yaml_text: str, op, *args) -> str:
        return edit_lanes_yaml(yaml_text, op, *args, limit=engine.config.limits.recipe_chars)

    def name_arg(value: object, what: str) -> str:
        return text_arg(value, what, 200, allow_none=False)

    @api_errors
    def add_lane(yaml_text: str, base: str, name: str = "") -> str:
        """One more lane running model `base`'s layers (a single-stream recipe's lanes start from nothing)."""
        return lanes_edited(
            yaml_text, rb.add_lane, name_arg(base, "The base"), text_arg(name, "The name", 200) or None
        )

    @api_errors
    def remove_lane(yaml_text: str, lane: str) -> str:
        return lanes_edited(yaml_text, rb.remove_lane, name_arg(lane, "The lane"))

    @api_errors
    def rename_lane(yaml_text: str, lane: str, name: str) -> str:
        """Call lane `lane` `name` (a name of mol's lane rule, no other lane's); its stitches follow."""
        return lanes_edited(
            yaml_text, rb.rename_lane, name_arg(lane, "The lane"), text_arg(name, "The name", 200)
        )

    @api_errors
    def set_lane_base(yaml_text: str, lane: str, base: str) -> str:
        return lanes_edited(
            yaml_text, rb.set_lane_base, name_arg(lane, "The lane"), name_arg(base, "The base")
        )

    @api_errors
    def add_stitch(
        yaml_text: str, source: str, target: str, after_source: int, after_target: int, type: str = "linear"
    ) -> str:
        """A stitch from lane `source` after its slot `after_source` into lane `target` after `after_target`."""
        return lanes_edited(
            yaml_text,
            rb.add_stitch,
            name_arg(source, "The source lane"),
            name_arg(target, "The target lane"),
            [whole(after_source, "after_source"), whole(after_target, "after_target")],
            text_arg(type, "The stitch type", 100),
        )

    @api_errors
    def remove_stitch(yaml_text: str, index: int) -> str:
        return lanes_edited(yaml_text, rb.remove_stitch, whole(index, "The stitch"))

    @api_errors
    def set_mixture(yaml_text: str, type: str) -> str:
        """The output mixture: a gate per token ("token") or one lane per sequence ("sequence")."""
        return lanes_edited(yaml_text, rb.set_mixture, text_arg(type, "The mixture type", 100))

    for fn, name in [
        (add_lane, "add_lane"),
        (remove_lane, "remove_lane"),
        (rename_lane, "rename_lane"),
        (set_lane_base, "set_lane_base"),
        (add_stitch, "add_stitch"),
        (remove_stitch, "remove_stitch"),
        (set_mixture, "set_mixture"),
        (validate_recipe, "validate_recipe"),
        (save_recipe_api, "save_recipe"),
        (list_recipes, "list_recipes"),
        (list_versions, "list_versions"),
        (get_version, "get_version"),
        (duplicate_version, "duplicate_version"),
        (compare_versions, "compare_versions"),
        (delete_recipe, "delete_recipe"),
        (restore_recipe, "restore_recipe"),
        (import_recipe, "import_recipe"),
        (export_mergekit_yaml, "export_mergekit"),
        (add_slot, "add_slot"),
        (add_expert, "add_expert"),
        (remove_slot, "remove_slot"),
        (remove_expert, "remove_expert"),
        (move_slot, "move_slot"),
        (set_router, "set_router"),
    ]:
        gr.api(fn, api_name=name)
