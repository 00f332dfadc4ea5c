"""Hosted mode under audit. `app.py` runs with MANGO_HOSTED=1 in a child process whose audit hook logs every
file it opens and every folder it lists; every endpoint that takes recipe text or a model path is sent hostile
input: paths where text belongs, `..`, symlinks and shard indexes leading out of the allowed folder, absurd sizes,
numbers and nesting. Then: no file outside the allowed folders (and the app's own code, assets, database and
temp folders) was opened; no answer carries the secret's marker or /etc/passwd's bytes; and every hostile
request was refused with the studio's user-error message, never the generic line with an error id."""

from __future__ import annotations

import ast
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.studio_server import free_port, local_client, make_models_dir

REPO = Path(__file__).resolve().parents[1]
LIFETIME_S = 600  # the child ends itself after this, should the test not stop it

# Runs in the child: the hook first (so it sees every open from here on), then the real entry point, app.py.
SERVER = r"""
import os, sys, sysconfig, threading
log_path, lifetime = sys.argv[1], float(sys.argv[2])
fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)  # before the hook: writing opens nothing
paths = sysconfig.get_paths()
skip = tuple(p.rstrip("/") + "/" for p in {sys.prefix, sys.exec_prefix, paths["stdlib"], paths["platstdlib"],
                                            paths["purelib"], paths["platlib"]})
skip += (os.path.dirname(os.environ["MANGO_DB_URL"].removeprefix("sqlite:///")) + "/", log_path)
local = threading.local()

def hook(event, args):
    if event not in ("open", "os.listdir", "os.scandir") or getattr(local, "busy", False):
        return
    local.busy = True
    try:
        path = args[0] if args else None
        if path is None or isinstance(path, int):
            return
        path = os.fsdecode(path)
        if not os.path.isabs(path):
            path = os.path.join(os.getcwd(), path)
        if not path.startswith(skip):
            os.write(fd, (repr((event, path)) + "\n").encode("utf-8", "backslashreplace"))
    finally:
        local.busy = False

sys.addaudithook(hook)
threading.Timer(lifetime, os._exit, (3,)).start()

# tokenizers reads tokenizer.json in Rust, past Python's audit hooks: announce that open as an audit event too
import tokenizers, transformers.tokenization_utils_tokenizers as tut

class AuditedTokenizer:
    def __call__(self, *a, **k):
        return tokenizers.Tokenizer(*a, **k)
    def __getattr__(self, name):
        return getattr(tokenizers.Tokenizer, name)
    def from_file(self, path, *a, **k):
        sys.audit("open", path, "r", 0)
        return tokenizers.Tokenizer.from_file(path, *a, **k)

tut.TokenizerFast = AuditedTokenizer()
import runpy
runpy.run_path(sys.argv[3], run_name="__main__")
"""

GENERIC = ("error id", "Something went wrong inside the studio", "has not enabled verbose error reporting")


@dataclass
class Outcome:
    endpoint: str
    case: str
    refused: bool  # an error came back (an AppError, a validation report with ok false, an error status line)
    message: str  # the error message, or the whole answer when it succeeded

    @property
    def generic(self) -> bool:
        return any(g in self.message for g in GENERIC)


class World:
    """The folders of the attack, the served studio and a client; `outcomes` collects every hostile call."""

    def __init__(self, base: Path, tiny) -> None:
        self.base = base
        self.marker = f"MANGO-SECRET-{uuid.uuid4().hex}"
        self.allowed = base / "allowed"  # the one folder models may come from; the demo models in demo/
        self.demo = make_models_dir(self.allowed / "demo", tiny)
        self.outside = base / "outside"
        self.outside.mkdir()
        model = self.outside / "model"
        shutil.copytree(tiny("llama", width=64, layers=4, seed=77), model)
        shutil.copy(model / "model.safetensors", self.outside / "model.safetensors")
        self.secret = self.outside / "secret.yaml"  # a valid recipe: read as a file, it would be accepted
        self.secret.write_text(
            yaml.safe_dump(
                {
                    "name": self.marker,
                    "base": "bard",
                    "models": {"bard": str(self.demo / "mango-bard")},
                    "slots": ["bard:0"],
                }
            )
        )
        (self.outside / "notes.txt").write_text(self.marker + "\n")
        # inside the allowed folder, ways out of it
        (self.allowed / "link-folder").symlink_to(model, target_is_directory=True)
        (self.allowed / "link-files").mkdir()
        for f in model.iterdir():
            (self.allowed / "link-files" / f.name).symlink_to(f)
        from safetensors import safe_open

        with safe_open(str(model / "model.safetensors"), "pt") as f:
            names = list(f.keys())
        for folder, target in (
            ("index-escape", "../../outside/model.safetensors"),
            ("index-passwd", "/etc/passwd"),
        ):
            shutil.copytree(model, self.allowed / folder, ignore=shutil.ignore_patterns("*.safetensors"))
            (self.allowed / folder / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {}, "weight_map": {n: target for n in names}})
            )
        self.home = base / "app-home"  # the child's working folder: "../outside" from there is real
        self.tmp = base / "app-tmp"
        self.data = base / "app-data"
        self.db_dir = base / "app-db"
        for d in (self.home, self.tmp, self.data, self.db_dir):
            d.mkdir()
        self.log = base / "opened.log"
        self.outcomes: list[Outcome] = []
        self.proc: subprocess.Popen | None = None

    # ---- the server ----
    def start(self) -> None:
        port = free_port()
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "MANGO_HOSTED": "1",
            "MANGO_MODEL_DIRS": str(self.allowed),
            "MANGO_MODELS_DIR": str(self.demo),
            "MANGO_DB_URL": f"sqlite:///{self.db_dir / 'studio.db'}",
            "MANGO_DATA_DIR": str(self.data),
            "TMPDIR": str(self.tmp),
            "GRADIO_TEMP_DIR": str(self.tmp / "gradio"),
            "GRADIO_SERVER_PORT": str(port),
            "GRADIO_SERVER_NAME": "127.0.0.1",
            "PYTHONPATH": str(REPO),
            "GRADIO_ANALYTICS_ENABLED": "False",
        }
        env.pop("SPACE_ID", None)
        self.server_log = (self.base / "server.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(self.log), str(LIFETIME_S), str(REPO / "app.py")],
            cwd=self.home,
            env=env,
            stdout=self.server_log,
            stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(self.url + "config", timeout=5):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError(
                        f"the hosted studio did not start:\n{self.server_output()}"
                    ) from None
                time.sleep(0.5)
        self.client = local_client(self.url)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
        self.server_log.close()

    def server_output(self) -> str:
        return (self.base / "server.log").read_text(errors="replace")[-4000:]

    # ---- calls ----
    def call(self, endpoint: str, case: str, *args) -> Outcome:
        """One hostile call; records and returns how it came back."""
        from gradio_client.exceptions import AppError

        try:
            result = self.client.submit(*args, api_name=endpoint).result(timeout=120)
        except AppError as exc:
            out = Outcome(endpoint, case, True, str(exc))
        except Exception as exc:  # not an answer of the studio: a timeout, a dropped connection
            out = Outcome(endpoint, case, False, f"no answer: {type(exc).__name__}: {exc}")
        else:
            out = Outcome(endpoint, case, False, json.dumps(result, default=str))
            if isinstance(result, dict) and result.get("ok") is False:  # validate_recipe's report
                out = Outcome(endpoint, case, True, str(result.get("error")))
            elif isinstance(result, list | tuple) and any("mango-status error" in str(r) for r in result):
                out = Outcome(
                    endpoint, case, True, " ".join(str(r) for r in result if "mango-status" in str(r))
                )
        self.outcomes.append(out)
        return out

    def recipe(self, ref: str, name: str = "attack") -> str:
        return yaml.safe_dump({"name": name, "base": "x", "models": {"x": ref}, "slots": ["x:0"]})

    def benign(self, name: str = "benign") -> str:
        return yaml.safe_dump(
            {
                "name": name,
                "base": "bard",
                "models": {"bard": str(self.demo / "mango-bard")},
                "slots": ["bard:0", "bard:1"],
            }
        )

    # ---- what the hook saw ----
    def opened(self) -> list[tuple[str, str]]:
        return [ast.literal_eval(line) for line in self.log.read_text(encoding="utf-8").splitlines() if line]

    def allowed_roots(self) -> list[Path]:
        """Where the child may open files: the allowed model folder, the app's own code and assets, its
        database, temp, data and working folders, Python itself, and the few system files libraries read."""
        paths = sysconfig.get_paths()
        python = {
            sys.prefix,
            sys.exec_prefix,
            paths["stdlib"],
            paths["platstdlib"],
            paths["purelib"],
            paths["platlib"],
            os.path.join(sys.base_prefix, "lib", "python{}{}.zip".format(*sys.version_info[:2])),
        }
        roots = [
            self.allowed,
            REPO / "mol",
            REPO / "studio",
            REPO / "assets",
            REPO / "app.py",
            *REPO.glob("*.egg-info"),  # the project's own package metadata (importlib.metadata)
            self.db_dir,
            self.tmp,
            self.data,
            self.home,
            self.log,
            *map(Path, python),
        ]
        system = [
            "/dev/null",
            "/dev/urandom",
            "/etc/localtime",
            "/usr/share/zoneinfo",
            "/etc/mime.types",
            "/etc/ssl/certs",
            "/usr/lib/ssl",
            "/proc/self",
            "/proc/stat",
            "/proc/sys/kernel/random/boot_id",
            "/sys/devices/system/cpu",
            "/sys/fs/cgroup",
            f"/proc/{self.proc.pid}" if self.proc else "/proc/self",
        ]
        return [Path(os.path.realpath(p)) for p in [*roots, *system]]

    def outside_opens(self) -> list[tuple[str, str, str]]:
        roots = self.allowed_roots()
        listed_only = {
            REPO
        }  # on sys.path: the import system lists it, and opens nothing under it but the above
        out = []
        for event, path in self.opened():
            real = Path(os.path.realpath(path))
            if any(real == r or r in real.parents for r in roots) or (
                event != "open" and real in listed_only
            ):
                continue
            out.append((event, path, str(real)))
        return out


def text_attacks(w: World) -> dict[str, str]:
    """Hostile recipe texts: paths where YAML belongs, documents that are not a mapping, absurd numbers,
    nesting and sizes. Each must be refused with a user error."""
    limit = 100_000  # the hosted limit on recipe text (studio.limits.Limits.recipe_chars)
    return {
        "secret, absolute path": str(w.secret),
        "secret, relative to the working folder": os.path.relpath(w.secret, w.home),
        "secret, relative to the repository": os.path.relpath(w.secret, REPO),
        "secret, file URL": w.secret.as_uri(),
        "/etc/passwd": "/etc/passwd",
        "../ to /etc/passwd": "../" * 12 + "etc/passwd",
        "~ to /etc/passwd": "~/../../../../etc/passwd",
        "folder path": str(w.demo / "mango-bard"),
        "a text file's path": str(w.outside / "notes.txt"),
        "JSON list": "[1, 2, 3]",
        "JSON number": "42",
        "JSON string": '"just a string"',
        "JSON null": "null",
        "JSON true": "true",
        "empty list": "[]",
        "huge int, 5000 digits": "name: x\nbase: bard\nmodels: {bard: mango-bard}\nslots: [1"
        + "0" * 5000
        + "]\n",
        "huge int as a layer": "name: x\nbase: bard\nmodels: {bard: mango-bard}\nslots: ['bard:"
        + "9" * 40
        + "']\n",
        "huge int as a rank": (
            "name: x\nbase: bard\nmodels: {bard: mango-bard}\nslots: ['bard:0']\n"
            "adapter: {type: bottleneck, rank: " + "9" * 400 + "}\n"
        ),
        "huge float": (
            "name: x\nbase: bard\nmodels: {bard: mango-bard}\nslots: ['bard:0']\n"
            "adapter: {type: bottleneck, rank: 1.0e+99999}\n"
        ),
        "huge top_k": (
            "name: x\nbase: bard\nmodels: {bard: mango-bard}\n"
            "slots: [{experts: ['bard:0', 'bard:1'], router: {type: token, top_k: " + "9" * 30 + "}}]\n"
        ),
        "deep flow nesting": "[" * 20_000 + "]" * 20_000,
        "deep block nesting": "".join(" " * i + "a:\n" for i in range(300)) + " " * 300 + "b\n",
        "deep JSON nesting": '{"a":' * 10_000 + "1" + "}" * 10_000,
        "deep nesting in slots": "name: x\nbase: bard\nmodels: {bard: mango-bard}\nslots: "
        + "[" * 900
        + "]" * 900,
        "longer than allowed": "name: x\n#" + "a" * limit,
    }


def model_attacks(w: World) -> dict[str, str]:
    """Hostile model references; each must be refused (and nothing outside read to refuse it)."""
    return {
        "outside folder, absolute": str(w.outside / "model"),
        "outside folder, relative to the working folder": os.path.relpath(w.outside / "model", w.home),
        "outside folder, relative to the repository": os.path.relpath(w.outside / "model", REPO),
        "allowed/../outside": str(w.allowed) + "/../outside/model",
        "symlinked folder to outside": str(w.allowed / "link-folder"),
        "folder of symlinks to outside files": str(w.allowed / "link-files"),
        "shard index to ../../outside": str(w.allowed / "index-escape"),
        "shard index to /etc/passwd": str(w.allowed / "index-passwd"),
        "/etc/passwd": "/etc/passwd",
        "/etc": "/etc",
        "../ to /etc": "../" * 12 + "etc",
        "300-byte name in the allowed folder": str(w.allowed / ("m" * 300)),
        "300-byte relative name": "m" * 300,
        "300-byte path of short names": str(w.allowed / "/".join(["abcdefghi"] * 30))[:300],
        "secret recipe file as a model": str(w.secret),
    }


def board_attacks(w: World) -> dict[str, object]:
    """Hostile values of the recipe board widget (the browser sends it as JSON, so a client may send anything)."""
    nested: object = "bard:0"
    for _ in range(400):
        nested = [nested]
    return {
        "a list": [1, 2],
        "a path": str(w.secret),
        "slots a path": {"slots": "/etc/passwd"},
        "slots of numbers": {"slots": [1, 2]},
        "expert a path": {"slots": [{"experts": ["/etc/passwd"]}]},
        "expert the secret": {"slots": [{"experts": [f"{w.secret}:0"]}]},
        "huge layer": {"slots": [{"experts": ["bard:" + "9" * 5000]}]},
        "huge top_k": {
            "slots": [{"experts": ["bard:0", "bard:1"], "router": {"type": "token", "top_k": 10**30}}]
        },
        "router a path": {"slots": [{"experts": ["bard:0", "bard:1"], "router": "/etc/passwd"}]},
        "deep nesting": {"slots": [{"experts": nested}]},
        "too many slots": {"slots": [{"experts": ["bard:0"]}] * 10_001},
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny):
    w = World(tmp_path_factory.mktemp("audit"), tiny)
    w.start()
    try:
        attack(w)
        yield w
    finally:
        w.stop()
        (w.base / "outcomes.json").write_text(json.dumps([o.__dict__ for o in w.outcomes], indent=1))


def attack(w: World) -> None:
    texts, models = text_attacks(w), model_attacks(w)
    benign_version = w.client.predict(w.benign(), "", api_name="/save_recipe")["id"]  # a valid base for edits
    for case, text in texts.items():
        w.call("/validate_recipe", case, text)
        w.call("/save_recipe", case, text, "note")
        w.call("/export_mergekit", case, text)
        w.call("/import_recipe", case, text)
        w.call("/add_slot", case, text, "bard:0", -1)
        w.call("/add_expert", case, text, 0, "bard:1")
        w.call("/remove_slot", case, text, 0)
        w.call("/remove_expert", case, text, 0, "bard:0")
        w.call("/move_slot", case, text, 0, 0)
        w.call("/set_router", case, text, 0, "token", 1)
        w.call("/ui_import_yaml", case, text)
    for case, ref in models.items():
        w.call("/inspect_model", case, ref, "")
        w.call("/ui_add_model", case, ref, "")
        w.call("/validate_recipe", case, w.recipe(ref))
        # a recipe naming the model is only text until something plans or builds it: converting and saving it
        # may succeed, the rest must not
        w.call(
            "/import_recipe",
            f"{case} (text only)",
            f"slices:\n  - sources: [{{model: {json.dumps(ref)}, layer_range: [0, 1]}}]\nmerge_method: passthrough\n",
        )
        w.call("/export_mergekit", f"{case} (text only)", w.recipe(ref))
        w.call("/add_slot", f"{case} (text only)", w.recipe(ref), "x:1", -1)
        saved = w.call("/save_recipe", f"{case} (text only)", w.recipe(ref, f"attack {len(w.outcomes)}"), "")
        if saved.refused:
            continue
        version = json.loads(saved.message)["id"]
        w.call("/generate", case, version, "Hello", 2)
        w.call("/generate_stream", case, version, "Hello", 2)
        w.call("/generate_source", case, version, "x", "Hello", 2)
        w.call("/train", case, version, ["prose"], 1, 1, 16, 0)
        w.call("/evaluate", case, version, ["prose"], 0, 32, 64, False)
    # the board's endpoints: the models come from the session's workspace, the slots and names from the client
    good_board = {"models": [], "slots": [{"experts": ["bard:0"], "router": None}]}
    for case, board in board_attacks(w).items():
        w.call("/ui_save_recipe", f"board {case}", "board", "bard", "linear", 64, "", board, False)
        w.call("/ui_export_yaml", f"board {case}", "board", "bard", "linear", 64, board)
        w.call("/ui_export_mergekit", f"board {case}", "board", "bard", "linear", 64, board)
    for case, text in texts.items():  # a recipe name is text, never a path: it may be saved as what it is
        w.call(
            "/ui_save_recipe", f"name: {case} (text only)", text, "bard", "linear", 64, "", good_board, False
        )
    for case, path in {
        "secret": str(w.secret),
        "/etc/passwd": "/etc/passwd",
        "relative secret": os.path.relpath(w.secret, w.home),
        "corpus folder by ..": "../" * 3 + "outside",
    }.items():
        w.call("/train", f"corpus {case}", benign_version, [path], 1, 1, 16, 0)
        w.call("/evaluate", f"corpus {case}", benign_version, [path], 0, 32, 64, False)


# Calls that may succeed: text operations on a recipe naming a hostile model (they read no model file).
MAY_SUCCEED = ("(text only)",)


def summary(w: World) -> dict[str, tuple[int, int, int]]:
    """Per endpoint: hostile calls, how many of them must be refused, how many got a typed user error."""
    tried, must, typed = Counter(), Counter(), Counter()
    for o in w.outcomes:
        tried[o.endpoint] += 1
        must[o.endpoint] += not o.case.endswith(MAY_SUCCEED)
        typed[o.endpoint] += o.refused and not o.generic
    return {e: (tried[e], must[e], typed[e]) for e in sorted(tried)}


def test_no_file_opened_outside_the_allowed_folders(world, record_property):
    opened = {Path(p) for _, p in world.opened()}
    assert world.demo / "mango-bard" / "config.json" in opened, "the hook did not see the studio read models"
    outside = world.outside_opens()
    record_property("files_opened_outside", len(outside))
    print(f"\nfiles opened: {len(world.opened())} logged, {len(outside)} outside the allow-list")
    by_path = defaultdict(list)
    for event, _path, real in outside:
        by_path[real].append(event)
    assert not outside, "opened outside the allowed folders:\n" + "\n".join(
        f"{real} ({', '.join(sorted(set(ev)))})" for real, ev in sorted(by_path.items())
    )


def test_no_answer_carries_a_secret(world):
    leaks = [o for o in world.outcomes if world.marker in o.message or "root:" in o.message]
    assert not leaks, [(o.endpoint, o.case, o.message[:200]) for o in leaks]


def test_every_hostile_request_gets_a_user_error(world, record_property):
    counts = summary(world)
    print("\nendpoint             hostile calls, must refuse, typed user errors")
    print("\n".join(f"{e:20s} {t:5d} {m:5d} {u:5d}" for e, (t, m, u) in counts.items()))
    record_property("per_endpoint", counts)
    record_property("hostile_calls", len(world.outcomes))
    record_property("typed_user_errors", sum(o.refused and not o.generic for o in world.outcomes))
    generic = [o for o in world.outcomes if o.generic]
    accepted = [o for o in world.outcomes if not o.refused and not o.case.endswith(MAY_SUCCEED)]
    assert not generic and not accepted, "\n".join(
        [f"generic error: {o.endpoint} [{o.case}]: {o.message[:160]}" for o in generic]
        + [f"not refused: {o.endpoint} [{o.case}]: {o.message[:160]}" for o in accepted]
    )
