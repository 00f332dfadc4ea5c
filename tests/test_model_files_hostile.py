"""Hostile model folders. A real tiny checkpoint is copied and damaged one way per case; `mol.plan` and
`mol plan` must answer each with a typed one-line error (a MolError: exit status 2 from the CLI) that names the
problem and quotes no bytes of a file that is not what its name says. In hosted mode (and for a shard index
everywhere) no file outside the allowed folders is opened at all: an audit hook watches every `open`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import sys
from pathlib import Path

import pytest

import mol
from mol.cli import main
from mol.errors import AccessError, CheckpointError, ModelNotFoundError, MolError
from studio.limits import hosted_policy

# A foreign file (what /etc/passwd is to a server): none of its bytes may reach a message.
SECRET = b"root:x:0:0:CANARY-7f3a:/root:/bin/bash\n" * 4
SECRET_LENGTH = str(struct.unpack("<Q", SECRET[:8])[0])  # what it reads as a safetensors "header length"


def recipe(ref: str, slots=("a:0", "a:1")) -> mol.Recipe:
    return mol.Recipe.from_dict({"name": "hostile", "models": {"a": ref}, "slots": list(slots)})


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data))


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    write_json(path, data)


def edit_header(model: Path, edit) -> None:
    """Rewrite model.safetensors' JSON header in place (`edit` mutates the dict), its data kept."""
    f = model / "model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    blob = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])


def header_is(value):
    """model.safetensors whose whole header is the JSON `value`, data kept."""

    def damage(m, ctx):
        f = m / "model.safetensors"
        raw = f.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        blob = json.dumps(value).encode()
        f.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])

    return damage


def with_index(model: Path, edit=None) -> None:
    """Add a shard index naming model.safetensors for every tensor, then let `edit` damage it."""
    raw = (model / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    names = [k for k in json.loads(raw[8 : 8 + n]) if k != "__metadata__"]
    index = {"metadata": {}, "weight_map": dict.fromkeys(names, "model.safetensors")}
    if edit is not None:
        index = edit(index) or index
    write_json(model / "model.safetensors.index.json", index)


def set_config(**fields):
    return lambda m, ctx: edit_json(m / "config.json", lambda c: c.update(fields))


def header_entry(name: str, **fields):
    return lambda m, ctx: edit_header(m, lambda h: h[name].update(fields))


Q = "model.layers.0.self_attn.q_proj.weight"  # [64, 64] F32
NORM = "model.layers.0.input_layernorm.weight"  # [64] F32


def _overlap(h):
    h[NORM]["data_offsets"] = list(h["model.embed_tokens.weight"]["data_offsets"][:1]) + [
        h["model.embed_tokens.weight"]["data_offsets"][0] + 256
    ]


def _short_range(h):
    start, end = h[Q]["data_offsets"]
    h[Q]["data_offsets"] = [start, end - 4]


def _not_utf8(m, ctx):
    (m / "config.json").write_bytes(b"\xff\xfe\x80" + SECRET)


def _deep(m, ctx):
    (m / "config.json").write_text("[" * 200_000 + "]" * 200_000)


def _fifo(name):
    def damage(m, ctx):
        (m / name).unlink()
        os.mkfifo(m / name)

    return damage


def _folder(name):
    def damage(m, ctx):
        (m / name).unlink()
        (m / name).mkdir()

    return damage


def _secret_as(name):
    return lambda m, ctx: (m / name).write_bytes(SECRET)


def _long_header(m, ctx):
    f = m / "model.safetensors"
    raw = f.read_bytes()
    f.write_bytes(struct.pack("<Q", len(raw) * 4) + raw[8:])


def _truncate(m, ctx):
    f = m / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-5000])


def _swap_shape(h):
    h[Q]["shape"] = [32, 128]  # same bytes, wrong shape for q_proj ([heads * head_dim, hidden])


def _drop(name):
    return lambda m, ctx: edit_header(m, lambda h: h.pop(name))


def _index_names(target):
    """An index entry naming `target` (a string, or a callable of the context giving one)."""

    def damage(m, ctx):
        name = target(ctx) if callable(target) else target
        with_index(m, lambda i: i["weight_map"].update({Q: name}))

    return damage


def _no_tokenizer_json(edit):
    def damage(m, ctx):
        (m / "tokenizer.json").unlink()
        edit(m, ctx)

    return damage


# (id, damage(model_folder, ctx), words the message must contain)
CASES = [
    # config.json
    ("config-array", lambda m, ctx: write_json(m / "config.json", []), "not a JSON object"),
    ("config-null", lambda m, ctx: write_json(m / "config.json", None), "not a JSON object"),
    ("config-string", lambda m, ctx: write_json(m / "config.json", "x"), "not a JSON object"),
    ("config-bad-json", lambda m, ctx: (m / "config.json").write_text('{"model_type": '), "not JSON"),
    ("config-not-utf8", _not_utf8, "not JSON"),
    ("config-deep-nesting", _deep, "config.json"),
    ("config-directory", _folder("config.json"), "not a regular file"),
    ("config-fifo", _fifo("config.json"), "not a regular file"),
    ("model-type-list", set_config(model_type=["llama"]), "model_type"),
    ("model-type-unknown-multiline", set_config(model_type="llama\nmamba"), "not supported"),
    ("hidden-size-string", set_config(hidden_size="x"), "hidden_size"),
    ("layers-negative", set_config(num_hidden_layers=-1), "num_hidden_layers"),
    ("layers-bool", set_config(num_hidden_layers=True), "num_hidden_layers"),
    ("vocab-zero", set_config(vocab_size=0), "vocab_size"),
    ("heads-zero", set_config(num_attention_heads=0), "num_attention_heads"),
    ("kv-heads-not-dividing", set_config(num_key_value_heads=3), "num_key_value_heads"),
    ("intermediate-negative", set_config(intermediate_size=-5), "intermediate_size"),
    ("rope-type-unknown", set_config(rope_scaling={"rope_type": "bogus", "factor": 2.0}), "rope_type"),
    ("rope-type-list", set_config(rope_scaling={"rope_type": ["linear"], "factor": 2.0}), "rope_type"),
    ("rope-theta-string", set_config(rope_theta="x"), "rope_theta"),
    ("rope-theta-negative", set_config(rope_theta=-1.0), "rope_theta"),
    ("rope-linear-without-factor", set_config(rope_scaling={"rope_type": "linear"}), "factor"),
    ("hidden-act-unknown", set_config(hidden_act="bogus"), "hidden_act"),
    ("hidden-act-list", set_config(hidden_act=["silu"]), "hidden_act"),
    ("sliding-window-string", set_config(sliding_window="x"), "sliding_window"),
    ("width-lies", set_config(hidden_size=128), "width 128"),
    ("head-dim-lies", set_config(head_dim=32), "implies"),
    ("intermediate-lies", set_config(intermediate_size=256), "implies"),
    # model.safetensors
    ("header-array", header_is([]), "not a safetensors file"),
    ("header-null", header_is(None), "not a safetensors file"),
    ("header-string", header_is("x"), "not a safetensors file"),
    (
        "header-metadata-list",
        lambda m, ctx: edit_header(m, lambda h: h.update({"__metadata__": []})),
        "not a safetensors file",
    ),
    ("entry-not-object", lambda m, ctx: edit_header(m, lambda h: h.update({NORM: 5})), "malformed"),
    ("shape-string", header_entry(Q, shape="abc"), "shape"),
    ("shape-minus-one", header_entry(Q, shape=[-1, 64]), "shape"),
    ("shape-float", header_entry(Q, shape=[64.0, 64]), "shape"),
    ("dtype-unsupported", header_entry(Q, dtype="Q4_K"), "dtype"),
    ("dtype-list", header_entry(Q, dtype=["F32"]), "dtype"),
    ("dtype-integer-for-weights", header_entry(Q, dtype="I32"), "dtype I32"),
    ("offsets-end-before-start", header_entry(Q, data_offsets=[500, 100]), "data_offsets"),
    ("offsets-strings", header_entry(Q, data_offsets=["0", "4"]), "data_offsets"),
    ("offsets-three", header_entry(Q, data_offsets=[0, 4, 8]), "data_offsets"),
    ("range-too-short", lambda m, ctx: edit_header(m, _short_range), "bytes"),
    ("ranges-overlap", lambda m, ctx: edit_header(m, _overlap), "overlap"),
    ("range-past-end", header_entry(Q, data_offsets=[10**9, 10**9 + 16384]), "truncated"),
    ("header-longer-than-file", _long_header, "not a safetensors file"),
    ("file-truncated", _truncate, "truncated"),
    ("empty-file", lambda m, ctx: (m / "model.safetensors").write_bytes(b""), "truncated"),
    ("foreign-file-as-weights", _secret_as("model.safetensors"), "not a safetensors file"),
    ("weights-directory", _folder("model.safetensors"), "not a regular file"),
    ("weights-fifo", _fifo("model.safetensors"), "not a regular file"),
    ("shape-lies-about-q-proj", lambda m, ctx: edit_header(m, _swap_shape), "implies [64, 64]"),
    ("planned-tensor-missing", _drop(NORM), "missing"),
    ("embedding-missing", _drop("model.embed_tokens.weight"), "model.embed_tokens.weight"),
    # model.safetensors.index.json
    ("index-array", lambda m, ctx: write_json(m / "model.safetensors.index.json", []), "not a JSON object"),
    ("index-bad-json", lambda m, ctx: (m / "model.safetensors.index.json").write_text("{"), "not JSON"),
    (
        "weight-map-list",
        lambda m, ctx: with_index(m, lambda i: {"weight_map": ["model.safetensors"]}),
        "weight_map",
    ),
    ("weight-map-missing", lambda m, ctx: with_index(m, lambda i: {"metadata": {}}), "weight_map"),
    ("weight-map-number", _index_names(5), "weight_map"),
    ("index-dotdot", _index_names("../elsewhere/model.safetensors"), "inside the model folder"),
    ("index-absolute", _index_names(lambda ctx: str(ctx["secret"])), "inside the model folder"),
    ("index-foreign-file", _index_names("config.json"), "inside the model folder"),
    ("index-shard-missing", _index_names("model-00009-of-00009.safetensors"), "missing"),
    (
        "index-shard-directory",
        lambda m, ctx: ((m / "sub.safetensors").mkdir(), _index_names("sub.safetensors")(m, ctx)),
        "not a regular file",
    ),
    ("index-nul", _index_names("model\u0000.safetensors"), "inside the model folder"),
    ("index-name-too-long", _index_names("x" * 300 + ".safetensors"), "cannot be read"),
    # tokenizer and generation files
    ("tokenizer-array", lambda m, ctx: write_json(m / "tokenizer.json", []), "not a JSON object"),
    (
        "tokenizer-corrupt",
        lambda m, ctx: edit_json(m / "tokenizer.json", lambda t: t.update({"model": 5})),
        "tokenizer",
    ),
    ("tokenizer-bad-json", lambda m, ctx: (m / "tokenizer.json").write_text('{"model": {'), "not JSON"),
    ("tokenizer-foreign-file", _secret_as("tokenizer.json"), "not JSON"),
    ("tokenizer-fifo", _fifo("tokenizer.json"), "not a regular file"),
    (
        "tokenizer-config-array",
        lambda m, ctx: write_json(m / "tokenizer_config.json", []),
        "not a JSON object",
    ),
    (
        "tokenizer-class-list",
        lambda m, ctx: edit_json(m / "tokenizer_config.json", lambda t: t.update({"tokenizer_class": ["x"]})),
        "tokenizer",
    ),
    (
        "tokenizer-eos-number",
        lambda m, ctx: edit_json(m / "tokenizer_config.json", lambda t: t.update({"eos_token": 5})),
        "tokenizer",
    ),
    (
        "tokenizer-added-tokens-list",
        lambda m, ctx: edit_json(
            m / "tokenizer_config.json", lambda t: t.update({"added_tokens_decoder": []})
        ),
        "tokenizer",
    ),
    (
        "special-tokens-string",
        lambda m, ctx: write_json(m / "special_tokens_map.json", "x"),
        "not a JSON object",
    ),
    ("vocab-array", _no_tokenizer_json(lambda m, ctx: write_json(m / "vocab.json", [])), "not a JSON object"),
    (
        "vocab-ids-strings",
        _no_tokenizer_json(lambda m, ctx: write_json(m / "vocab.json", {"a": "x"})),
        "vocab",
    ),
    (
        "generation-config-array",
        lambda m, ctx: write_json(m / "generation_config.json", []),
        "not a JSON object",
    ),
    ("generation-config-directory", _folder("generation_config.json"), "not a regular file"),
]


@pytest.fixture
def damaged(tiny, tmp_path):
    """damaged(damage) -> a copy of a tiny Llama with `damage` applied (and a foreign file beside it)."""
    secret = tmp_path / "secret" / "passwd"
    secret.parent.mkdir()
    secret.write_bytes(SECRET)
    elsewhere = shutil.copytree(tiny("llama"), tmp_path / "elsewhere")
    ctx = {"secret": secret, "elsewhere": elsewhere}

    def make(damage) -> Path:
        model = shutil.copytree(tiny("llama"), tmp_path / "models" / "m")
        damage(model, ctx)
        return model

    return make


@pytest.fixture
def deadline():
    """A read that blocks (a FIFO) fails the test instead of hanging it."""

    def expire(*_):
        raise TimeoutError("blocked reading a model file")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def assert_clean(msg: str, words: str) -> None:
    assert "\n" not in msg and msg.strip(), msg
    assert words.lower() in msg.lower(), msg
    assert "CANARY" not in msg and "root:x" not in msg and SECRET_LENGTH not in msg, msg
    assert "Traceback" not in msg


@pytest.mark.parametrize("damage, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_folder_gives_a_typed_one_line_error(damaged, damage, words, deadline, tmp_path, capsys):
    model = damaged(damage)
    with pytest.raises(MolError) as info:
        mol.plan(recipe(str(model)))
    assert_clean(str(info.value), words)
    assert "0..-2" not in str(info.value)
    assert "listed in the index is missing" not in str(info.value)
    assert "no tokenizer files" not in str(info.value)

    r = tmp_path / "r.yaml"
    r.write_text(f"name: hostile\nmodels: {{a: {json.dumps(str(model))}}}\nslots: [a:0, a:1]\n")
    capsys.readouterr()
    assert main(["plan", str(r)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert_clean(err.strip(), words)


@pytest.mark.parametrize("hosted", [True, False], ids=["hosted", "local"])
@pytest.mark.parametrize(
    "ref",
    ["x" * 300, "{tmp}/" + "x" * 300, "{tmp}/a\u0000b", "a\nb", "~no-such-user-here/m"],
    ids=["long-name", "long-absolute", "nul", "newline", "no-such-user"],
)
def test_odd_model_paths_are_one_line_errors(tmp_path, ref, hosted):
    policy = hosted_policy([tmp_path]) if hosted else mol.AccessPolicy()
    with pytest.raises((ModelNotFoundError, AccessError)) as info:
        mol.plan(recipe(ref.format(tmp=tmp_path)), policy=policy)
    assert "\n" not in str(info.value)


def test_a_symlink_loop_is_a_typed_error(tmp_path, tiny):
    model = shutil.copytree(tiny("llama"), tmp_path / "m")
    (model / "model.safetensors").unlink()
    (model / "model.safetensors").symlink_to(model / "model.safetensors")
    with pytest.raises(CheckpointError) as info:
        mol.plan(recipe(str(model)))
    assert_clean(str(info.value), "model.safetensors")


def test_a_valid_model_still_plans_and_builds(tiny, tmp_path):
    model = shutil.copytree(tiny("llama"), tmp_path / "m")
    with_index(model)  # an index naming its one file is fine
    p = mol.plan(recipe(str(model), ["a:0", "a:3"]))
    assert {t.name for t in p.reads["a"]} >= {Q, "model.embed_tokens.weight", "lm_head.weight"}
    fused = mol.build(p, device="cpu", dtype="float32")
    assert fused.bytes_read == p.bytes_to_read
    assert fused.tokenizer is not None


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "opt", "phi", "qwen3"])
def test_other_families_plan_exactly_what_they_build(tiny, family):
    p = mol.plan(recipe(str(tiny(family)), ["a:1", "a:2"]))
    assert mol.build(p, device="cpu", dtype="float32").bytes_read == p.bytes_to_read


# ---- what is opened: an audit hook (hooks cannot be removed, so one is added once and switched by a flag) ----

_AUDIT: dict = {"on": False, "opened": []}


def _hook(event, args):
    if _AUDIT["on"] and event == "open" and isinstance(args[0], str | bytes | os.PathLike):
        _AUDIT["opened"].append(os.fsdecode(args[0]))


@pytest.fixture
def audit():
    """audit() -> list of paths opened while the block inside `with audit():` ran."""
    if not _AUDIT.get("installed"):
        sys.addaudithook(_hook)
        _AUDIT["installed"] = True

    class Watch:
        def __enter__(self):
            _AUDIT["opened"] = []
            _AUDIT["on"] = True
            return _AUDIT["opened"]

        def __exit__(self, *exc):
            _AUDIT["on"] = False

    yield Watch
    _AUDIT["on"] = False


def _outside(opened: list[str], allowed: Path, watched: Path) -> list[str]:
    """Files under `watched` (the test's folder) opened outside `allowed`."""
    real = [Path(os.path.realpath(p)) for p in opened]
    return [str(p) for p in real if watched in p.parents and p != allowed and allowed not in p.parents]


@pytest.fixture
def world(tmp_path, tiny, monkeypatch):
    """An allowed folder holding one good model, and beside it (not allowed) a model and a foreign file."""
    allowed = tmp_path / "allowed"
    shutil.copytree(tiny("llama"), allowed / "good")
    outside = shutil.copytree(tiny("llama"), tmp_path / "elsewhere")
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    return {"root": tmp_path.resolve(), "allowed": allowed.resolve(), "outside": outside, "secret": secret}


def _hosted(world) -> mol.AccessPolicy:
    """The policy the hosted studio passes, with the test's allowed folder (the library reads no env)."""
    return hosted_policy([world["allowed"]])


def _links_everything(m, w):
    for f in w["outside"].iterdir():
        (m / f.name).symlink_to(f)


def _link(name, target):
    def damage(m, w):
        (m / name).unlink(missing_ok=True)
        (m / name).symlink_to(target(w))

    return damage


HOSTED_CASES = [
    ("all-files-linked-out", _links_everything),
    ("weights-linked-out", _link("model.safetensors", lambda w: w["outside"] / "model.safetensors")),
    ("config-linked-to-foreign-file", _link("config.json", lambda w: w["secret"])),
    ("tokenizer-linked-out", _link("tokenizer.json", lambda w: w["outside"] / "tokenizer.json")),
    (
        "tokenizer-config-linked-out",
        _link("tokenizer_config.json", lambda w: w["outside"] / "tokenizer_config.json"),
    ),
    ("generation-config-linked-out", _link("generation_config.json", lambda w: w["secret"])),
    ("readme-linked-out", _link("README.md", lambda w: w["secret"])),
    ("subfolder-linked-out", _link("original", lambda w: w["outside"])),
]
INDEX_CASES = [
    ("index-dotdot", lambda w: "../../elsewhere/model.safetensors"),
    ("index-absolute", lambda w: str(w["outside"] / "model.safetensors")),
    ("index-absolute-foreign", lambda w: str(w["secret"])),
]


def _model_with(world, damage) -> Path:
    model = world["allowed"] / "m"
    if damage is _links_everything:
        model.mkdir()
    else:
        shutil.copytree(world["allowed"] / "good", model)
    damage(model, world)
    return model


@pytest.mark.parametrize("damage", [c[1] for c in HOSTED_CASES], ids=[c[0] for c in HOSTED_CASES])
def test_hosted_mode_opens_nothing_a_link_leads_to(world, audit, damage):
    policy = _hosted(world)
    model = _model_with(world, damage)
    with audit() as opened, pytest.raises(AccessError) as info:
        mol.plan(recipe(str(model)), policy=policy)
    assert_clean(str(info.value), "outside the folders")
    assert _outside(opened, world["allowed"], world["root"]) == []


@pytest.mark.parametrize("hosted", [True, False], ids=["hosted", "local"])
@pytest.mark.parametrize("target", [c[1] for c in INDEX_CASES], ids=[c[0] for c in INDEX_CASES])
def test_a_shard_index_cannot_lead_out_of_its_folder(world, audit, target, hosted):
    policy = _hosted(world) if hosted else mol.AccessPolicy()
    model = _model_with(world, lambda m, w: with_index(m, lambda i: i["weight_map"].update({Q: target(w)})))
    with audit() as opened, pytest.raises((CheckpointError, AccessError)) as info:
        mol.plan(recipe(str(model)), policy=policy)
    assert_clean(str(info.value), "inside the model folder")
    assert _outside(opened, world["allowed"], world["root"]) == []


def test_a_shard_linked_out_is_refused_hosted_and_followed_locally(world, audit):
    """The index names a file inside the folder that links elsewhere: a server refuses it (realpath outside
    the allowed folders) without opening it; on the user's own machine such links (an annex, a blob store) are
    theirs to make, and the shard is read."""

    def annexed(m, w):  # the weights live in a store outside the folder; the folder holds a link to them
        with_index(
            m, lambda i: i["weight_map"].update(dict.fromkeys(i["weight_map"], "model-00001.safetensors"))
        )
        blob = w["outside"] / "annex-blob"
        shutil.move(m / "model.safetensors", blob)
        (m / "model-00001.safetensors").symlink_to(blob)

    model = _model_with(world, annexed)
    with audit() as opened, pytest.raises(MolError) as info:
        mol.plan(recipe(str(model)), policy=_hosted(world))
    assert_clean(str(info.value), "outside")
    assert _outside(opened, world["allowed"], world["root"]) == []
    p = mol.plan(recipe(str(model)))
    assert p.base.tensors[Q].file == model / "model-00001.safetensors"
    assert mol.build(p, device="cpu", dtype="float32") is not None


def test_hosted_links_inside_the_allowed_folders_are_fine(world, audit):
    """A folder whose files link to another allowed model (as a Hub snapshot links to its blobs) is served,
    and planning and building it opens nothing outside the allowed folders."""
    policy = _hosted(world)
    model = world["allowed"] / "linked"
    model.mkdir()
    for f in (world["allowed"] / "good").iterdir():
        (model / f.name).symlink_to(f)
    with audit() as opened:
        p = mol.plan(recipe(str(model)), policy=policy)
        fused = mol.build(p, device="cpu", dtype="float32")  # the plan's sources keep their policy
    assert fused.tokenizer is not None and p.base.policy == policy
    assert any(
        os.path.realpath(o).startswith(str(world["allowed"])) for o in opened
    )  # the hook does see opens
    assert _outside(opened, world["allowed"], world["root"]) == []


def test_the_studio_does_not_list_a_folder_that_links_out(world, tmp_path):
    from studio.engine import StudioConfig, StudioEngine

    (world["allowed"] / "mango-evil").symlink_to(world["outside"], target_is_directory=True)
    (world["allowed"] / "mango-sly").mkdir()
    (world["allowed"] / "mango-sly" / "config.json").symlink_to(world["outside"] / "config.json")
    config = StudioConfig(
        models_dir=world["allowed"],
        db_url=f"sqlite:///{tmp_path / 's.db'}",
        hosted=True,
        model_dirs=[world["allowed"]],
    )
    assert set(StudioEngine(config).embedded_models()) == {"good"}


@pytest.mark.parametrize("hosted", [True, False], ids=["hosted", "local"])
def test_a_hub_snapshot_whose_files_link_to_blobs_plans(tiny, tmp_path, monkeypatch, hosted):
    """Hub cache snapshots are links into ../../blobs: they stay inside the repository's cache folder, so they
    are not taken for links out (shard index included), hosted (with the Hub allowed) or not."""
    import huggingface_hub.constants as hf_constants

    hub = tmp_path / "hub"
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    policy = hosted_policy([tmp_path / "allowed"], allow_hub=True) if hosted else mol.AccessPolicy()
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hub / "models--mango-test--linked"
    snap, blobs = repo / "snapshots" / commit, repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    staged = shutil.copytree(tiny("llama"), tmp_path / "staged")
    with_index(staged)
    for i, f in enumerate(sorted(staged.iterdir())):
        shutil.copy(f, blobs / f"blob{i}")
        (snap / f.name).symlink_to(Path("../../blobs") / f"blob{i}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    p = mol.plan(recipe("mango-test/linked"), policy=policy)
    assert p.base.hub_id == "mango-test/linked" and p.tensors_to_read > 0
