"""Recipe parsing: canonical form round-trips, shorthands expand, malformed input fails with a clear message."""

import pytest

import mol
from mol.errors import RecipeError

CANONICAL = """
name: prose-code
base: bard
models:
  bard: assets/models/mango-bard
  coder: assets/models/mango-coder
adapter: {type: linear}
slots:
  - experts: ["bard:0"]
  - experts: ["bard:1", "coder:1"]
    router: {type: token, top_k: 1}
  - experts: ["bard:2", "coder:5"]
    router: {type: pooled}
"""


def test_canonical_round_trip():
    r = mol.Recipe.from_yaml(CANONICAL)
    assert r.name == "prose-code" and r.base == "bard"
    assert [str(e) for e in r.slots[1].experts] == ["bard:1", "coder:1"]
    assert r.slots[0].router is None
    assert r.slots[2].router == mol.RouterSpec("pooled", 1)
    again = mol.Recipe.from_yaml(r.to_yaml())
    assert again == r
    assert again.to_yaml() == r.to_yaml()


def test_shorthands_expand_to_canonical():
    r = mol.Recipe.from_yaml("""
name: short
models: {a: x, b: y}
adapter: bottleneck
slots:
  - a:0-2
  - [a:3, b:1]
  - {experts: [a:4, b:2], router: pooled}
  - b:3
""")
    assert r.base == "a"  # first model by default
    assert [str(s.experts[0]) for s in r.slots[:3]] == ["a:0", "a:1", "a:2"]
    assert r.slots[3].router == mol.RouterSpec("token", 1)
    assert r.slots[4].router.type == "pooled"
    assert r.adapter == mol.AdapterSpec("bottleneck", 64)
    assert len(r.slots) == 6


def test_python_constructor_matches_yaml():
    r = mol.Recipe(name="p", base="a", models={"a": "x"}, slots=[mol.Slot((mol.ExpertRef("a", 0),))])
    assert mol.Recipe.from_yaml(r.to_yaml()) == r


def test_a_layer_may_be_used_twice():
    r = mol.Recipe.from_yaml("name: r\nmodels: {a: x}\nslots: [a:0, a:1, a:0]")
    assert [str(s.experts[0]) for s in r.slots] == ["a:0", "a:1", "a:0"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("name: x\nmodels: {a: p}\nslots: [a:0]\n  bad: [", "line"),
        ("models: {a: p}\nslots: [a:0]", "needs 'name'"),
        ("name: x\nmodels: {a: p}\nslots: []", "needs 'slots'"),
        ("name: x\nmodels: {a: p}\nslots: [c:0]", "unknown model alias 'c'"),
        ("name: x\nbase: z\nmodels: {a: p}\nslots: [a:0]", "base 'z'"),
        ("name: x\nmodels: {a: p}\nslots: [a:-1]", "negative"),
        ("name: x\nmodels: {a: p}\nslots: [a]", "alias:layer"),
        (
            "name: x\nmodels: {a: p, b: q}\nslots: [{experts: [a:0, b:0], router: {top_k: 3}}]",
            "between 1 and 2",
        ),
        ("name: x\nmodels: {a: p}\nslots: [{experts: []}]", "non-empty"),
        ("name: x\nmodels: {a: p}\nslots: [a:0]\ncolour: red", "Unknown recipe key"),
        (
            "name: x\nmodels: {a: p, b: q}\nslots: [{experts: [a:0, b:0], router: {type: magic}}]",
            "router.type",
        ),
        (
            "name: x\nmodels: {a: p}\nadapter: {type: linear, rank: 4}\nslots: [a:0]",
            "bottleneck adapter only",
        ),
        ("name: x\nmodels: {a: p}\nslots: [{experts: [a:0, a:0]}]", "same expert twice"),
        ("- just\n- a list", "mapping"),
        ("name: x\nmodels: {'bad alias!': p}\nslots: ['bad alias!:0']", "not allowed"),
    ],
)
def test_malformed_recipes_fail_clearly(text, message):
    with pytest.raises(RecipeError) as info:
        mol.Recipe.from_yaml(text)
    assert message in str(info.value)


def test_yaml_error_names_the_line():
    with pytest.raises(RecipeError, match=r"line 2"):
        mol.Recipe.from_yaml("name: x\nmodels: {a: p}}\nslots: [a:0]\n")


def test_yaml_alias_bomb_is_refused_quickly():
    bomb = (
        "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
        + "".join(
            f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
            for p, c in zip("abcdefgh", "bcdefghi", strict=True)
        )
        + "name: x\nmodels: {m: p}\nslots: *i\n"
    )
    with pytest.raises(RecipeError, match="too large"):
        mol.Recipe.from_yaml(bomb)


def test_messages_about_huge_values_stay_short():
    with pytest.raises(RecipeError) as info:
        mol.Recipe.from_dict({"name": "x", "models": {"a": "p"}, "slots": [list(range(5000))]})
    assert len(str(info.value)) < 300


# ---- hostile text: every case is a typed, one-line RecipeError quoting at most a short excerpt ------------------
ROUTED = "name: x\nmodels: {a: p, b: q}\nslots: [{experts: [a:0, b:0], router: {top_k: %s}}]"
PLAIN = "name: x\nmodels: {a: p}\nslots: [%s]"
HOSTILE = {
    "bare huge number": "9" * 5000,
    "huge top_k digits": ROUTED % ("9" * 5000),
    "huge explicit int tag": ROUTED % ("!!int " + "9" * 5000),
    "huge negative int": ROUTED % ("-" + "9" * 5000),
    "huge hex int": ROUTED % ("0x" + "f" * 5000),
    "huge sexagesimal": ROUTED % ("1" + ":00" * 3000),
    "finite huge top_k": ROUTED % (10**50),
    "sexagesimal top_k": ROUTED % ("1" + ":00" * 16),
    "huge rank": "name: x\nmodels: {a: p}\nadapter: {type: bottleneck, rank: "
    + "9" * 5000
    + "}\nslots: [a:0]",
    "layer digits": PLAIN % ("'a:" + "9" * 5000 + "'"),
    "layer 10**21": PLAIN % "'a:1000000000000000000000'",
    "negative layer digits": PLAIN % ("'a:-" + "9" * 5000 + "'"),
    "range end huge": PLAIN % "'a:0-99999999999999'",
    "range digits": PLAIN % ("'a:0-" + "9" * 5000 + "'"),
    "expert mapping huge layer": PLAIN % ("{experts: [{model: a, layer: " + "9" * 90 + "}]}"),
    "deep flow list": "[" * 5000 + "]" * 5000,
    "deep flow mapping": "{a: " * 3000 + "1" + "}" * 3000,
    "deep block mapping": "".join("  " * i + "a:\n" for i in range(400)),
    "deep block list": "".join("  " * i + "-\n" for i in range(400)),
    "deep inside slots": PLAIN % ("[" * 2000 + "a:0" + "]" * 2000),
    "deep unclosed": "[" * 100_000,
    "int keys": "1: 2\n3: 4",
    "unhashable key": "? [a, b]\n: 1\nname: x",
    "null key": "? null\n: 1\nname: x\nmodels: {a: p}\nslots: [a:0]",
    "int alias": "name: x\nmodels: {1: p}\nslots: ['1:0']",
    "binary name": "name: !!binary aGVsbG8=\nmodels: {a: p}\nslots: [a:0]",
    "binary key": "!!binary aGVsbG8=: 1\nname: x\nmodels: {a: p}\nslots: [a:0]",
    "binary model": "name: x\nmodels: {a: !!binary aGVsbG8=}\nslots: [a:0]",
    "binary slot": PLAIN % "!!binary aGVsbG8=",
    "bad binary": "name: !!binary '%%%'\n",
    "python apply": "name: !!python/object/apply:os.system ['ls']\nmodels: {a: p}\nslots: [a:0]",
    "python name": "!!python/name:os.system\n",
    "python new": "!!python/object/new:subprocess.Popen [['ls']]\n",
    "long tag": "name: !<" + "x" * 10_000 + "> a\n",
    "set": "name: !!set {a, b}\nmodels: {a: p}\nslots: [a:0]",
    "bad timestamp": "name: 2024-13-45\nmodels: {a: p}\nslots: [a:0]",
    "two documents": "name: x\n---\nname: y\n",
    "NUL": "name: x\x00\nmodels: {a: p}\nslots: [a:0]",
    "only NUL": "\x00",
    "lone surrogate": "name: \ud800\n",
    "BEL": "name: \x07",
    "recursive alias": "&a [*a]",
    "long line value": "name: x\nmodels: {a: p}\nslots: ['" + "a" * 900_000 + "']",
    "long line key": "x" * 900_000 + ": 1",
    "long line junk": "[" + ", ".join(["x"] * 200_000) + "]",
    "over the size limit": "#" * 1_000_001,
    "long alias": "name: x\nmodels: {" + "a" * 10_000 + ": p}\nslots: [a:0]",
    "unknown long key": "name: x\nmodels: {a: p}\nslots: [a:0]\n" + "k" * 5000 + ": 1",
    "bare path": "/etc/passwd",
    "relative yaml path": "../../x.yaml",
    "windows path": "C:\\x.yml",
    "home path": "~/.ssh/id_rsa",
    "file url": "file:///etc/passwd",
    "path with newline": "/etc/passwd\n",
}


def assert_one_short_line(exc: BaseException) -> None:
    message = str(exc)
    assert message.strip() and "\n" not in message and "\r" not in message, message[:200]
    assert len(message) <= 300, message[:200]
    for run in ("9" * 80, "x" * 80, "a" * 80, "k" * 80, "f" * 80):
        assert run not in message, message[:200]


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_recipe_text_gives_one_short_typed_line(name):
    with pytest.raises(RecipeError) as info:
        mol.Recipe.from_yaml(HOSTILE[name])
    assert_one_short_line(info.value)


@pytest.mark.parametrize(
    "text, message",
    [
        (HOSTILE["finite huge top_k"], "between 1 and 2"),
        (HOSTILE["layer 10**21"], "below 100,000"),
        (HOSTILE["range end huge"], "below 100,000"),
        (HOSTILE["deep flow list"], "nested more than"),
        (HOSTILE["bare huge number"], "a number of 5,000 characters"),
        (HOSTILE["bare path"], "A recipe is a mapping"),
        (HOSTILE["relative yaml path"], "A recipe is a mapping"),
        (HOSTILE["over the size limit"], "the limit is"),
    ],
)
def test_hostile_recipe_text_says_what_is_wrong(text, message):
    with pytest.raises(RecipeError, match=message):
        mol.Recipe.from_yaml(text)


@pytest.mark.parametrize(
    "data",
    [
        {
            "name": "x",
            "models": {"a": "p", "b": "q"},
            "slots": [{"experts": ["a:0", "b:0"], "router": {"top_k": 10**5000}}],
        },
        {"name": "x", "models": {"a": "p"}, "slots": [{"experts": [{"model": "a", "layer": 10**5000}]}]},
        {"name": "x", "models": {"a": "p"}, "slots": [{"experts": [{"model": "a", "layer": -(10**5000)}]}]},
        {
            "name": "x",
            "models": {"a": "p"},
            "adapter": {"type": "bottleneck", "rank": 10**5000},
            "slots": ["a:0"],
        },
        {"name": 10**5000, "models": {"a": "p"}, "slots": ["a:0"]},
        {"name": "x", "models": {"a": "p"}, "slots": ["a:0"], 10**5000: 1},
    ],
)
def test_python_ints_too_long_to_print_are_refused_in_one_line(data):
    with pytest.raises(RecipeError) as info:
        mol.Recipe.from_dict(data)
    assert_one_short_line(info.value)


def test_deeply_nested_python_data_is_refused_without_recursion():
    deep: list = ["a:0"]
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(RecipeError) as info:
        mol.Recipe.from_dict({"name": "x", "models": {"a": "p"}, "slots": deep})
    assert_one_short_line(info.value)


# ---- text is text: a string is parsed, never opened ---------------------------------------------------------
_WATCHING: list[list[str]] = []  # audit hooks cannot be removed: the hook records only while a test watches


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _WATCHING:
        _WATCHING[-1].append(str(args[0]))


@pytest.fixture(scope="module")
def _audit_hook():
    import sys

    sys.addaudithook(_audit)


@pytest.fixture
def no_file_access(_audit_hook, monkeypatch, tmp_path):
    """Calls `fn(arg)` and returns what it raised, asserting that meanwhile no file was opened (the audit 'open'
    event) and no path under tmp_path, nor a relative one, was stat-ed (is_file, exists)."""
    import os

    real_stat = os.stat
    mol.Recipe.from_yaml(
        "name: warm\nmodels: {a: p}\nslots: [a:0]"
    )  # any lazy import happens before watching

    def call(fn, arg):
        touched: list[str] = []

        def stat(path, *args, **kwargs):
            if str(tmp_path) in str(path) or not os.path.isabs(str(path)):
                touched.append(f"stat {path}")
            return real_stat(path, *args, **kwargs)

        monkeypatch.setattr(os, "stat", stat)
        _WATCHING.append(touched)
        try:
            fn(arg)
            raised = None
        except Exception as exc:  # examined after watching stops (pytest's own reporting opens files)
            raised = exc
        finally:
            _WATCHING.remove(touched)
            monkeypatch.setattr(os, "stat", real_stat)
        assert touched == []
        return raised

    return call


def valid_recipe_file(folder, name="x.yaml"):
    path = folder / name
    path.write_text("name: from-the-file\nmodels: {a: p}\nslots: [a:0]\n")
    return path


@pytest.mark.parametrize("form", ["absolute", "relative", "dot", "spaces", "windows"])
def test_a_string_naming_a_real_recipe_file_is_text_not_a_path(tmp_path, monkeypatch, no_file_access, form):
    path = valid_recipe_file(tmp_path)
    monkeypatch.chdir(tmp_path)
    text = {
        "absolute": str(path),
        "relative": "x.yaml",
        "dot": "./x.yaml",
        "spaces": f"  {path}  ",
        "windows": ".\\x.yaml",
    }[form]
    raised = no_file_access(mol.Recipe.from_yaml, text)
    assert isinstance(raised, RecipeError) and "A recipe is a mapping" in str(raised), raised
    assert "from-the-file" not in str(raised)


def test_no_parser_of_text_opens_a_file(tmp_path, no_file_access):
    from mol.export.mergekit import import_mergekit
    from mol.recipe import to_recipe
    from studio.draft_recipe import parse_recipe_text
    from studio.errors import recipe_text

    path = str(valid_recipe_file(tmp_path))
    mk = tmp_path / "mk.yml"
    mk.write_text("merge_method: passthrough\nslices: [{sources: [{model: a/b, layer_range: [0, 2]}]}]\n")
    for parse, arg in ((to_recipe, path), (parse_recipe_text, path), (import_mergekit, str(mk))):
        raised = no_file_access(parse, arg)
        assert isinstance(raised, RecipeError) and "mapping" in str(raised), (parse, raised)
    assert (
        no_file_access(lambda p: recipe_text(p, 10_000), path) is None
    )  # checked as text, handed on as text


def test_a_path_object_is_refused_by_from_yaml(tmp_path):
    with pytest.raises(TypeError, match="from_file"):
        mol.Recipe.from_yaml(valid_recipe_file(tmp_path))


def test_from_file_round_trip_and_source_dir(tmp_path):
    r = mol.Recipe.from_yaml(CANONICAL)
    path = tmp_path / "sub" / "r.yml"
    path.parent.mkdir()
    path.write_text(r.to_yaml(), encoding="utf-8")
    for arg in (path, str(path)):  # from_file is the call that takes a path, so a str there is one
        back = mol.Recipe.from_file(arg)
        assert back == r and back.source_dir == path.parent.resolve()
    assert mol.Recipe.from_yaml(path.read_text()).source_dir is None


@pytest.mark.parametrize(
    "case, message",
    [
        ("folder", "is a folder, not a recipe file"),
        ("missing", "does not exist"),
        ("latin-1", "not UTF-8"),
        ("too large", "larger than"),
        ("huge number", "a number of"),
    ],
)
def test_from_file_errors_are_one_line(tmp_path, case, message):
    path = tmp_path / "r.yaml"
    if case == "folder":
        path.mkdir()
    elif case == "latin-1":
        path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    elif case == "too large":
        path.write_bytes(b"#" * (4_000_001))
    elif case == "huge number":
        path.write_text("9" * 5000)
    with pytest.raises(RecipeError, match=message) as info:
        mol.Recipe.from_file(path)
    assert_one_short_line(info.value)
