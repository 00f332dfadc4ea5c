"""Models tab: the session's source models with their architecture cards; add one by Hub id or local folder."""

from __future__ import annotations

import html
from typing import Any

import gradio as gr

from studio.controller import StudioController
from studio.tabs.common import api_errors, fmt_count, fusable_notes, message_html, user_message

MODEL_COLUMNS = [
    "Alias",
    "Family",
    "Layers",
    "Width",
    "Heads",
    "KV heads",
    "Parameters",
    "Tokenizer",
    "Fusable",
    "Source",
]


def shared_tokenizer(workspace: list[dict], alias: str) -> list[str]:
    """The other loaded models whose tokenizer is this one's (same vocabulary hash, `fingerprint`)."""
    cards = [c for c in workspace or [] if "error" not in c]
    me = next((c for c in cards if c["alias"] == alias), None)
    fp = (me or {}).get("fingerprint")
    return [c["alias"] for c in cards if fp and c is not me and c.get("fingerprint") == fp]


def tokenizer_text(workspace: list[dict], card: dict) -> str:
    """The tokenizer in words ("byte-level BPE, 4,096 tokens · 3f2a9c1d") and which loaded models share it."""
    name = card.get("tokenizer_name") or card.get("tokenizer") or ""
    shared = shared_tokenizer(workspace, card["alias"])
    return name + (" — shared with: " + ", ".join(shared) if shared else " — not shared")


def model_rows(workspace: list[dict]) -> list[list]:
    notes = fusable_notes(workspace)
    rows = []
    for c in workspace or []:
        if "error" in c:
            rows.append([c["alias"], "—", "", "", "", "", "", "", notes[c["alias"]], c["ref"]])
            continue
        rows.append(
            [
                c["alias"],
                c["family"],
                c["layers"],
                c["width"],
                c["heads"],
                c["kv_heads"],
                fmt_count(c["parameters"]),
                tokenizer_text(workspace, c),
                notes[c["alias"]],
                c["ref"],
            ]
        )
    return rows


def card_html(
    card: dict, note: str = "", details: dict | None = None, shared: list[str] | None = None
) -> str:
    """A model's card: its architecture, and where its folder says so (`details`, see
    `StudioController.model_details`) what it is good at, what it was trained on and its perplexities."""
    if "error" in card:
        return message_html(card["error"], ok=False)
    details = details or {}
    tokenizer = card.get("tokenizer_name") or card["tokenizer"]
    if shared is not None:
        tokenizer += " — shared with: " + ", ".join(shared) if shared else " — not shared with a loaded model"
    rows = [
        ("Good at", details.get("good_at")),
        ("Family", f"{card['family']} ({card['model_type']})"),
        ("Layers", card["layers"]),
        ("Width", card["width"]),
        ("Heads", f"{card['heads']} ({card['kv_heads']} key/value)"),
        ("Parameters", f"{card['parameters']:,}"),
        ("Vocabulary", f"{card['vocab_size']:,}"),
        ("Tokenizer", tokenizer),
        ("Trained on", details.get("trained_on")),
        ("Training", details.get("training")),
        (
            "Validation perplexity",
            ", ".join(f"{d} {v:,.1f}" for d, v in (details.get("perplexity") or {}).items()) or None,
        ),
        ("Fusable", note),
        ("Source", card["ref"]),
    ]
    body = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows if v is not None
    )
    return f'<div class="model-card"><h4>{html.escape(card["alias"])}</h4><table>{body}</table></div>'


def create_models_tab(ctl: StudioController, workspace: gr.State) -> dict[str, Any]:
    gr.Markdown(
        "The models this session can fuse. Blocks fuse only between models with the same tokenizer; "
        "widths and families may differ (adapters bridge them). Click a row for the model's card."
    )
    model_list = gr.Dataframe(
        headers=MODEL_COLUMNS,
        value=model_rows(workspace.value),
        interactive=False,
        elem_id="model-list",
        label="Source models",
        wrap=True,
        column_widths=["8%", "9%", "7%", "7%", "7%", "8%", "9%", "15%", "14%", "16%"],
    )
    with gr.Row():
        ref = gr.Textbox(
            label="Hub id or local folder",
            placeholder="org/name or path/to/model-folder",
            elem_id="model-ref",
            scale=3,
        )
        alias = gr.Textbox(
            label="Alias (optional)", placeholder="short name used in recipes", elem_id="model-alias", scale=1
        )
    add = gr.Button("Add model", variant="primary", elem_id="add-model")
    status = gr.HTML(elem_id="model-status")
    card = gr.HTML(elem_id="model-card")

    def on_add(ws: list[dict], ref_text: str, alias_text: str):
        try:
            ws, new_card = ctl.add_model(ws, ref_text, alias_text)
        except Exception as exc:
            return {status: message_html(user_message(exc), ok=False), card: ""}
        note = fusable_notes(ws)[new_card["alias"]]
        details = ctl.model_details(new_card)
        return {
            workspace: ws,
            model_list: model_rows(ws),
            status: message_html(f"Added '{new_card['alias']}'."),
            card: card_html(new_card, note, details, shared_tokenizer(ws, new_card["alias"])),
        }

    def on_row(ws: list[dict], evt: gr.SelectData):
        row = evt.index[0] if isinstance(evt.index, list | tuple) else evt.index
        cards = list(ws or [])
        if not isinstance(row, int) or not 0 <= row < len(cards):
            return {card: gr.skip()}
        c = cards[row]
        if "error" in c:
            return {card: card_html(c)}
        return {
            card: card_html(
                c, fusable_notes(cards)[c["alias"]], ctl.model_details(c), shared_tokenizer(cards, c["alias"])
            )
        }

    model_list.select(on_row, workspace, card, api_visibility="private")

    added = add.click(
        on_add,
        [workspace, ref, alias],
        [workspace, model_list, status, card],
        api_name="ui_add_model",
        api_visibility="undocumented",
    )
    ref.submit(
        on_add, [workspace, ref, alias], [workspace, model_list, status, card], api_visibility="private"
    )

    @api_errors
    def list_models() -> list[dict]:
        """Architecture cards of the embedded models."""
        ws = [ctl.engine.model_card(a, r) for a, r in ctl.engine.embedded_models().items()]
        notes = fusable_notes(ws)
        return [{**c, "fusable": notes[c["alias"]]} for c in ws]

    @api_errors
    def inspect_model(ref: str, alias: str = "") -> dict:
        """Validate a model by Hub id or local folder and return its architecture card."""
        _, new_card = ctl.add_model([], ref, alias)
        return new_card

    gr.api(list_models, api_name="list_models")
    gr.api(inspect_model, api_name="inspect_model")
    return {
        "model_list": model_list,
        "model_ref": ref,
        "model_alias": alias,
        "add_model": add,
        "model_status": status,
        "model_card": card,
        "added": added,
    }
