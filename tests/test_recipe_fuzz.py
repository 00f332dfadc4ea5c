"""Property-based: 1000+ generated recipes, valid and broken, either plan or fail with a typed MolError."""

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mol
from mol.errors import MolError

ALIASES = ["a", "b", "c", "zz", "ünï", "", "x" * 300, "bad alias!", "0num"]
JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 10**12),
    st.floats(allow_nan=True),
    st.text(max_size=40),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


@pytest.fixture(scope="module")
def model_paths(tiny):
    return {
        "llama": str(tiny("llama")),
        "gpt2": str(tiny("gpt2", width=96)),
        "neox": str(tiny("gpt_neox", width=48, layers=2)),
    }


def expert_strings():
    return st.one_of(
        st.builds(lambda a, i: f"{a}:{i}", st.sampled_from(ALIASES), st.integers(-3, 12)),
        st.builds(
            lambda a, i, j: f"{a}:{i}-{j}", st.sampled_from(ALIASES), st.integers(0, 6), st.integers(0, 6)
        ),
        st.text(max_size=30),
        JUNK,
    )


def slots():
    router = st.one_of(
        st.none(),
        st.sampled_from(["token", "pooled", "magic"]),
        st.fixed_dictionaries(
            {
                "type": st.sampled_from(["token", "pooled", "x"]),
                "top_k": st.one_of(st.integers(-1, 10**9), JUNK),
            }
        ),
        JUNK,
    )
    slot = st.one_of(
        expert_strings(),
        st.lists(expert_strings(), max_size=4),
        st.fixed_dictionaries(
            {"experts": st.one_of(st.lists(expert_strings(), max_size=4), JUNK)},
            optional={"router": router, "extra": JUNK},
        ),
    )
    return st.one_of(st.lists(slot, max_size=6), JUNK)


@st.composite
def recipes(draw, paths):
    aliases = draw(st.lists(st.sampled_from(ALIASES), min_size=0, max_size=3, unique=True))
    refs = st.one_of(
        st.sampled_from(list(paths.values())), st.sampled_from(["no/such", "nowhere-at-all", "/etc"]), JUNK
    )
    data = {
        "name": draw(st.one_of(st.text(max_size=20), st.just("r" * 5000), JUNK)),
        "models": draw(st.one_of(st.fixed_dictionaries({a: refs for a in aliases}), JUNK)),
        "slots": draw(slots()),
    }
    if draw(st.booleans()):
        data["base"] = draw(st.one_of(st.sampled_from(ALIASES), JUNK))
    if draw(st.booleans()):
        data["adapter"] = draw(
            st.one_of(
                st.sampled_from(["linear", "bottleneck", "nope"]),
                st.fixed_dictionaries(
                    {
                        "type": st.sampled_from(["linear", "bottleneck"]),
                        "rank": st.one_of(st.integers(-2, 10**6), JUNK),
                    }
                ),
                JUNK,
            )
        )
    if draw(st.integers(0, 9)) == 0:
        data[draw(st.text(max_size=8))] = draw(JUNK)
    return data


LAYERS = {"llama": 4, "gpt2": 4, "neox": 2}


@st.composite
def valid_recipes(draw, paths):
    kinds = draw(st.lists(st.sampled_from(sorted(paths)), min_size=1, max_size=3, unique=True))
    aliases = {f"m{i}": k for i, k in enumerate(kinds)}
    expert = st.sampled_from([f"{a}:{i}" for a, k in aliases.items() for i in range(LAYERS[k])])
    slot = st.one_of(
        expert,
        st.lists(expert, min_size=2, max_size=3, unique=True).flatmap(
            lambda ex: st.fixed_dictionaries(
                {
                    "experts": st.just(ex),
                    "router": st.one_of(
                        st.just({"type": "pooled"}),
                        st.integers(1, len(ex)).map(lambda k: {"type": "token", "top_k": k}),
                    ),
                }
            )
        ),
    )
    return {
        "name": draw(st.text(min_size=1, max_size=30).filter(str.strip)),
        "base": draw(st.sampled_from(sorted(aliases))),
        "models": {a: paths[k] for a, k in aliases.items()},
        "adapter": draw(st.sampled_from([{"type": "linear"}, {"type": "bottleneck", "rank": 8}])),
        "slots": draw(st.lists(slot, min_size=1, max_size=6)),
    }


@st.composite
def mutated(draw, paths):
    """A valid recipe with one thing broken: the kind of mistake people really make."""
    data = draw(valid_recipes(paths))
    key = draw(st.sampled_from(["name", "base", "models", "slots", "adapter", "slot", "layer", "alias"]))
    if key == "slot":
        data["slots"][draw(st.integers(0, len(data["slots"]) - 1))] = draw(JUNK)
    elif key == "layer":
        data["slots"].append(f"{data['base']}:{draw(st.integers(4, 10**6))}")
    elif key == "alias":
        data["slots"].append(f"{draw(st.sampled_from(ALIASES))}:0")
    else:
        data[key] = draw(JUNK)
    return data


OUTCOMES = {"planned": 0, "typed error": 0}


@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(data=st.data())
def test_every_recipe_plans_or_fails_with_a_typed_error(model_paths, data):
    raw = data.draw(st.one_of(valid_recipes(model_paths), mutated(model_paths), recipes(model_paths)))
    try:
        mol.plan(mol.Recipe.from_dict(raw))
        OUTCOMES["planned"] += 1
    except MolError as exc:
        assert str(exc).strip(), "a typed error must carry a message"
        OUTCOMES["typed error"] += 1


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(
    text=st.one_of(
        st.text(max_size=300),
        st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
        st.builds(lambda d: yaml.safe_dump(d), st.dictionaries(st.text(max_size=6), JUNK, max_size=4)),
    )
)
def test_any_yaml_text_parses_or_fails_with_a_typed_error(text):
    try:
        mol.Recipe.from_yaml(text)  # text is text: even a one-line "x.yaml" is parsed, never opened
    except MolError:
        pass


def test_the_fuzzer_reached_both_outcomes():
    # Runs after the property test in file order: both valid and broken recipes were really generated.
    assert OUTCOMES["planned"] > 100 and OUTCOMES["typed error"] > 300, OUTCOMES


# ---- hostile text: what a hosted client may send to /save_recipe or /export_mergekit --------------------------
HOSTILE_VALUES = st.one_of(
    st.integers(4301, 12_000).map(lambda n: "9" * n),  # more digits than Python's int() converts
    st.integers(20, 99).map(lambda n: str(10**n)),  # finite but absurd
    st.integers(65, 3000).map(lambda d: "[" * d + "]" * d),
    st.integers(65, 3000).map(lambda d: "{a: " * d + "1" + "}" * d),
    st.integers(65, 3000).map(lambda d: "[" * d),
    st.sampled_from(
        [
            "!!binary aGVsbG8=",
            "!!binary '%%'",
            "!!python/object/apply:os.system ['id']",
            "!!python/name:os.system",
            "!!python/object/new:str []",
            "!!set {a}",
            "2024-13-45",
            "2024-02-30 25:61:00",
            "\x00",
            "'\x00'",
            "\ud800",
            "&a [*a]",
            "1" + ":00" * 40,
            "0x" + "f" * 6000,
            "0b" + "1" * 20_000,
            "0o" + "7" * 6000,
            "-" + "9" * 5000,
        ]
    ),
    st.builds(
        lambda tag: f"!<{tag}> x",
        st.text(st.characters(min_codepoint=97, max_codepoint=122), min_size=1, max_size=5000),
    ),
    st.sampled_from(
        [
            "/etc/passwd",
            "../../x.yaml",
            "C:\\x.yml",
            "~/.ssh/id_rsa",
            "/proc/self/environ",
            "assets/recipes/prose-code-token.yaml",
            "file:///etc/passwd",
            "\\\\server\\share\\x.yml",
        ]
    ),
    st.integers(1000, 200_000).map(lambda n: "x" * n),
    st.text(max_size=40),
)
HOSTILE_PLACES = st.sampled_from(
    [
        "{}",
        "name: {}\nmodels: {a: p}\nslots: [a:0]",
        "name: x\nmodels: {a: {}}\nslots: [a:0]",
        "name: x\nmodels: {a: p}\nslots: [{}]",
        "name: x\nmodels: {a: p}\nslots: ['a:{}']",
        "name: x\nmodels: {a: p}\nslots: ['a:0-{}']",
        "name: x\nmodels: {a: p}\nslots: [{experts: [{model: a, layer: {}}]}]",
        "name: x\nmodels: {a: p, b: q}\nslots: [{experts: [a:0, b:0], router: {top_k: {}}}]",
        "name: x\nmodels: {a: p}\nadapter: {type: bottleneck, rank: {}}\nslots: [a:0]",
        "{}: 1\nname: x\nmodels: {a: p}\nslots: [a:0]",
        "name: x\nmodels: {{}: p}\nslots: [a:0]",
    ]
)
HOSTILE_SEEN = {"cases": 0}


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(place=HOSTILE_PLACES, value=HOSTILE_VALUES)
def test_hostile_text_parses_or_fails_with_one_short_typed_line(place, value):
    HOSTILE_SEEN["cases"] += 1
    text = place.replace("{}", value, 1)
    try:
        mol.Recipe.from_yaml(text)
    except MolError as exc:  # anything else (ValueError, RecursionError, TypeError...) fails the test
        message = str(exc)
        assert message.strip() and "\n" not in message and len(message) <= 300, message[:300]
        assert value not in message or len(value) <= 60, message[:300]  # at most a short excerpt of the input


def test_the_hostile_fuzzer_ran():
    assert HOSTILE_SEEN["cases"] >= 400, HOSTILE_SEEN
