"""Property-based: generated bad input (wrong types, huge, unicode and NUL strings, broken YAML, alias bombs,
unknown ids, out-of-range and negative numbers) sent to the studio's API endpoints through `gradio_client`,
against a served app. Every call either succeeds or fails with a message meant for people: no traceback, no
exception class name, no internal-error line (that would be a bug the studio did not anticipate); and the
server keeps serving."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.studio_server import local_client, serving_studio

LEAKS = re.compile(
    r"Traceback|File \"|line \d+, in |\b\w+(Error|Exception|Exit|Interrupt)\b|"
    r"verbose error reporting|Something went wrong inside the studio"
)

TEXT = st.text(
    st.characters(exclude_categories=("Cs",)), max_size=60
)  # lone surrogates cannot be sent as JSON
HUGE = st.sampled_from(["x" * 200_001, "🥭" * 30_000, "\x00", "a\x00b", "\u202e" * 10, " " * 5000, "١٢"])
JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**20), 10**20),
    st.floats(allow_nan=False, allow_infinity=False),
    TEXT,
    HUGE,
    st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
INTS = st.one_of(
    st.integers(-3, 12), st.integers(-(10**30), 10**30), st.sampled_from([2**63, -(2**63) - 1, 2**64])
)
IDS = st.one_of(
    st.integers(1, 2), st.integers(0, 5), INTS, st.sampled_from(["1", " 2 ", "1.0", "1e3", "0x1"]), JUNK
)
EXPERTS = st.one_of(
    st.sampled_from(["bard:0", "bard:1", "coder:1", "coder:2", "bard:3"]),
    st.sampled_from(
        ["base:1", "bard:99", "ghost:0", "bard:-1", "bard:0-2", "bard", ":", "bard:1:2", "bard:０"]
    ),
    TEXT,
    JUNK,
)
BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 10) + "]\n" for i in range(8)
)


def recipe_doc(models: dict, name, base, slots, adapter) -> str:
    doc = {"name": name, "base": base, "models": models, "slots": slots}
    if adapter is not None:
        doc["adapter"] = adapter
    return yaml.safe_dump(doc, allow_unicode=True)


@st.composite
def recipe_texts(draw, models: dict) -> str:
    """Valid recipes, recipes with wrong parts, broken YAML, alias bombs, mergekit configs, and non-text."""
    slot = st.one_of(
        EXPERTS,
        st.lists(EXPERTS, max_size=3),
        st.fixed_dictionaries(
            {"experts": st.one_of(st.lists(EXPERTS, max_size=3), JUNK)},
            optional={"router": st.one_of(st.sampled_from(["token", "pooled", "x"]), JUNK)},
        ),
    )
    refs = st.one_of(
        st.just(models),
        st.just({"bard": models["bard"], "ghost": "no/such-model"}),
        st.just({"bard": "../../etc"}),
        st.dictionaries(TEXT, st.one_of(TEXT, JUNK), max_size=2),
        JUNK,
    )
    valid = recipe_doc(
        {"bard": models["bard"], "coder": models["coder"]},
        "fuzz",
        "bard",
        ["bard:0", ["bard:1", "coder:1"]],
        None,
    )
    kind = draw(st.integers(-2, 6))
    if kind <= 0:
        return valid
    if kind == 1:
        return recipe_doc(
            draw(refs),
            draw(st.one_of(st.just("fuzz"), TEXT, JUNK)),
            draw(st.one_of(st.sampled_from(["bard", "coder", "ghost"]), JUNK)),
            draw(st.one_of(st.lists(slot, max_size=4), JUNK)),
            draw(st.one_of(st.none(), st.sampled_from(["linear", "bottleneck", "magic"]), JUNK)),
        )
    if kind == 2:  # cut or spliced text
        at = draw(st.integers(0, len(valid)))
        return valid[:at] + draw(
            st.one_of(
                TEXT, st.sampled_from([":", "- ", "\t", "{", "&a", "*a", "!!python/object:os.system ''"])
            )
        )
    if kind == 3:
        return draw(
            st.sampled_from(
                [
                    BOMB + "name: *i\n",
                    "x: " + BOMB.replace("\n", "\n  ") + "\nname: n\nslots: *i\n",
                    "[" * 3000 + "]" * 3000,
                    "{" * 50 + "}" * 50,
                    ": : :",
                    "---\n---\n",
                    "",
                    "slices: 5",
                    "slices:\n - sources: [{model: x, layer_range: [5, 1]}]\n",
                    "slices: []\nmerge_method: passthrough\n",
                    "a: !!binary AAAA",
                ]
            )
        )
    if kind == 4:
        model = draw(st.sampled_from([models["bard"], "nowhere", "../x"]))
        first, last = draw(st.integers(-2, 9)), draw(st.integers(-2, 9))
        method = draw(st.sampled_from(["passthrough", "slerp"]))
        return (
            f"slices:\n  - sources: [{{model: {model}, layer_range: [{first}, {last}]}}]\n"
            f"merge_method: {method}\n"
        )
    return draw(st.one_of(HUGE, JUNK))


def endpoint_args(models: dict) -> dict:
    """Per endpoint: a strategy for its positional arguments."""
    yamls = recipe_texts(models)
    small = st.one_of(st.integers(0, 3), st.integers(-5, 40), INTS, JUNK)
    real = st.one_of(
        st.floats(-1e6, 1e6, allow_nan=False), st.floats(allow_nan=False, allow_infinity=False), JUNK
    )
    calls = {
        "/validate_recipe": st.tuples(yamls),
        "/import_recipe": st.tuples(yamls),
        "/export_mergekit": st.tuples(yamls),
        "/save_recipe": st.tuples(yamls, st.one_of(TEXT, HUGE, JUNK)),
        "/add_slot": st.tuples(yamls, EXPERTS, small),
        "/add_expert": st.tuples(yamls, small, EXPERTS),
        "/remove_slot": st.tuples(yamls, small),
        "/remove_expert": st.tuples(yamls, small, EXPERTS),
        "/move_slot": st.tuples(yamls, small, small),
        "/set_router": st.tuples(
            yamls, small, st.one_of(st.sampled_from(["token", "pooled", "x"]), JUNK), small
        ),
        "/list_recipes": st.tuples(st.one_of(st.booleans(), JUNK)),
        "/list_versions": st.tuples(IDS),
        "/get_version": st.tuples(IDS),
        "/duplicate_version": st.tuples(IDS, st.one_of(TEXT, HUGE, JUNK)),
        "/compare_versions": st.tuples(IDS, IDS),
        "/delete_recipe": st.tuples(
            st.one_of(st.integers(3, 40), IDS)
        ),  # 1 and 2 stay: the last check uses them
        "/restore_recipe": st.tuples(IDS, st.one_of(TEXT, JUNK)),
        "/generate": st.tuples(
            IDS,
            st.one_of(TEXT, TEXT, HUGE, JUNK),
            small,
            st.one_of(st.booleans(), JUNK),
            real,
            small,
            real,
            st.one_of(INTS, JUNK),
            st.one_of(st.just(0), IDS),
        ),
        "/generate_stream": st.tuples(
            IDS,
            st.one_of(TEXT, TEXT, HUGE, JUNK),
            small,
            st.one_of(st.booleans(), JUNK),
            real,
            small,
            real,
            st.one_of(INTS, JUNK),
            st.one_of(st.just(0), IDS),
        ),
        "/generate_source": st.tuples(
            IDS, st.one_of(st.sampled_from(["bard", "coder", "ghost"]), JUNK), st.one_of(TEXT, JUNK), small
        ),
        "/list_runs": st.tuples(small),
        "/get_run": st.tuples(IDS),
        "/inspect_model": st.tuples(
            st.one_of(
                st.sampled_from([models["bard"], "../../etc", "/", "org/name", "a" * 5000, "x\x00y"]),
                TEXT,
                JUNK,
            ),
            st.one_of(TEXT, JUNK),
        ),
        "/list_training_runs": st.tuples(IDS),
        # train and evaluate with arguments that never start a real run (a version that does not exist, or an
        # argument of the wrong kind): the check of every argument is what is fuzzed here
        "/train": st.tuples(
            st.one_of(st.integers(1000, 10**30), JUNK),
            st.one_of(st.lists(TEXT, max_size=2), JUNK),
            small,
            small,
            small,
            small,
        ),
        "/evaluate": st.tuples(
            st.one_of(st.integers(1000, 10**30), JUNK),
            st.one_of(st.lists(TEXT, max_size=2), JUNK),
            IDS,
            small,
            small,
            st.one_of(st.booleans(), JUNK),
        ),
    }
    return calls


def assert_for_people(message: str, call) -> None:
    """A message for people: short, and no traceback or exception name in it, unless the input itself held those
    words and the message quotes it (a recipe named "KeyError" is named in messages about it)."""
    assert message.strip() and len(message) < 3000, (call, message[:300])
    given = json.dumps(call, ensure_ascii=False, default=str) + repr(call)
    leaks = [m.group(0) for m in LEAKS.finditer(message) if m.group(0) not in given]
    assert not leaks, (call, message, leaks)


@pytest.fixture(scope="module")
def studio(tmp_path_factory, tiny):
    with serving_studio(tmp_path_factory, tiny, "fuzz", max_new_tokens=12) as running:
        yield running


@pytest.fixture(scope="module")
def client(studio):
    c = local_client(studio.url)
    models = studio.engine.embedded_models()
    for name, slots in (("routed", ["bard:0", ["bard:1", "coder:1"]]), ("plain", ["bard:0-1"])):
        c.predict(
            recipe_doc({"bard": models["bard"], "coder": models["coder"]}, name, "bard", slots, None),
            "",
            api_name="/save_recipe",
        )
    c.predict(1, "To be", 3, api_name="/generate")  # a stored run
    return c


ENDPOINTS = [
    "/validate_recipe",
    "/import_recipe",
    "/export_mergekit",
    "/save_recipe",
    "/add_slot",
    "/add_expert",
    "/remove_slot",
    "/remove_expert",
    "/move_slot",
    "/set_router",
    "/list_recipes",
    "/list_versions",
    "/get_version",
    "/duplicate_version",
    "/compare_versions",
    "/delete_recipe",
    "/restore_recipe",
    "/generate",
    "/generate_stream",
    "/generate_source",
    "/list_runs",
    "/get_run",
    "/inspect_model",
    "/list_training_runs",
    "/train",
    "/evaluate",
]


@pytest.mark.parametrize("api_name", ENDPOINTS)
def test_bad_input_gets_a_message_for_people(client, studio, api_name):
    from gradio_client.exceptions import AppError

    args_strategy = endpoint_args(studio.engine.embedded_models())[api_name]

    @settings(
        max_examples=10,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )
    @given(args=args_strategy)
    def one_call(args):
        try:
            result = client.predict(*args, api_name=api_name)
        except AppError as exc:
            assert_for_people(str(exc), (api_name, args))
            return
        if api_name == "/validate_recipe" and not result["ok"]:
            assert_for_people(result["error"], (api_name, args))

    one_call()


def test_every_fuzzed_endpoint_has_its_strategy(studio):
    assert sorted(ENDPOINTS) == sorted(endpoint_args(studio.engine.embedded_models()))


# Hostile texts sent, one at a time, in every text argument of every endpoint taking text (hypothesis above
# samples them; this reaches each one everywhere). A recipe argument must refuse every one: none is a recipe,
# and a path is never read as one (the shipped example file included). Other text (a note, a prompt, a name) may
# be accepted as the text it is; what must never come back is a traceback or the generic error-id line.
HOSTILE_TEXTS = {
    "JSON list": "[1, 2, 3]",
    "JSON number": "42",
    "JSON string": '"a string"',
    "JSON null": "null",
    "JSON true": "true",
    "empty mapping": "{}",
    "huge int": "1" + "0" * 5000,
    "huge int in a recipe": "name: x\nbase: bard\nmodels: {bard: m}\nslots: [" + "9" * 5000 + "]\n",
    "huge layer": "name: x\nbase: bard\nmodels: {bard: m}\nslots: ['bard:" + "9" * 40 + "']\n",
    "deep flow nesting": "[" * 5000 + "]" * 5000,
    "deep JSON nesting": '{"a": ' * 3000 + "1" + "}" * 3000,
    "deep block nesting": "".join(" " * i + "a:\n" for i in range(300)) + " " * 300 + "b\n",
    "long text": "x" * 300_001,
    "long line of YAML": "name: " + "n" * 150_000 + "\n",
    "absolute path": "/etc/passwd",
    "relative path": "../../../../etc/passwd",
    "home path": "~/.ssh/id_rsa",
    "file URL": "file:///etc/passwd",
    "a real recipe file": "assets/recipes/prose-code-token.yaml",
    "a real folder": "assets/models/mango-bard",
    "Windows path": "C:\\Windows\\system32\\config",
}


def text_calls(models: dict) -> dict[str, tuple[tuple, set[int], set[int]]]:
    """Per endpoint taking text: valid arguments, the positions of its text arguments, and which of those are
    recipe text (that must refuse every hostile text)."""
    y = recipe_doc(
        {"bard": models["bard"], "coder": models["coder"]}, "hostile", "bard", ["bard:0", "bard:1"], None
    )
    far = (
        10**6
    )  # a version that does not exist: train and evaluate check their arguments and never start a run
    return {
        "/validate_recipe": ((y,), {0}, {0}),
        "/import_recipe": ((y,), {0}, {0}),
        "/export_mergekit": ((y,), {0}, {0}),
        "/save_recipe": ((y, "note"), {0, 1}, {0}),
        "/add_slot": ((y, "bard:2", -1), {0, 1}, {0}),
        "/add_expert": ((y, 0, "coder:1"), {0, 2}, {0}),
        "/remove_slot": ((y, 0), {0}, {0}),
        "/remove_expert": ((y, 0, "bard:0"), {0, 2}, {0}),
        "/move_slot": ((y, 0, 1), {0}, {0}),
        "/set_router": ((y, 0, "token", 1), {0, 2}, {0}),
        "/duplicate_version": ((1, "copy"), {1}, set()),
        "/restore_recipe": ((1, "restored"), {1}, set()),
        "/generate": ((1, "To be", 2), {1}, set()),
        "/generate_stream": ((1, "To be", 2), {1}, set()),
        "/generate_source": ((1, "bard", "To be", 2), {1, 2}, set()),
        "/inspect_model": ((models["bard"], "b2"), {0, 1}, set()),
        "/train": ((far, ["prose"], 1, 1, 16, 0), {1}, set()),
        "/evaluate": ((far, ["prose"], 0, 32, 64, False), {1}, set()),
    }


@pytest.mark.parametrize("api_name", sorted(text_calls({"bard": "b", "coder": "c"})))
def test_hostile_text_gets_a_user_error(client, studio, api_name):
    from gradio_client.exceptions import AppError

    args, text_positions, recipe_positions = text_calls(studio.engine.embedded_models())[api_name]
    problems, tried, refused = [], 0, 0
    for position in sorted(text_positions):
        for case, hostile in HOSTILE_TEXTS.items():
            value = [hostile] if api_name in ("/train", "/evaluate") else hostile  # corpora: a list of names
            call = [*args[:position], value, *args[position + 1 :]]
            tried += 1
            try:
                result = client.submit(*call, api_name=api_name).result(timeout=120)
                error = result["error"] if api_name == "/validate_recipe" and not result["ok"] else None
            except AppError as exc:
                error = str(exc)
            if error is None:
                if position in recipe_positions:
                    problems.append(f"argument {position}, {case}: accepted as a recipe: {str(result)[:200]}")
                continue
            refused += 1
            try:
                assert_for_people(error, (api_name, case))
            except AssertionError:
                problems.append(f"argument {position}, {case}: {error[:200]}")
    print(f"{api_name}: {tried} hostile texts, {refused} refused with a user error, {len(problems)} problems")
    assert not problems, "\n".join(problems)


def test_the_server_keeps_serving_after_the_fuzzing(client, studio):
    """Runs after the fuzzing above (pytest keeps the order of a module), on the same server and database."""
    models = studio.engine.embedded_models()
    # still serving, and with a working model cache and database: a valid save, generation and read-back
    text = recipe_doc(
        {"bard": models["bard"], "coder": models["coder"]},
        "after-fuzz",
        "bard",
        ["bard:0", ["bard:1", "coder:1"], "bard:2"],
        None,
    )
    assert client.predict(text, api_name="/validate_recipe")["ok"]
    version = client.predict(text, "after the fuzzing", api_name="/save_recipe")
    out = client.predict(version["id"], "To be, or not", 4, api_name="/generate")
    assert client.predict(out["run_id"], api_name="/get_run")["output"] == out["text"]
    gate = studio.engine.gate.snapshot()
    assert (gate["running"], gate["waiting"]) == (0, 0)  # every admitted generation gave its slot back
    assert studio.engine.cache.building() == []
