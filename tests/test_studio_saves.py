"""Saving through the served studio: clients saving a new recipe at once all get a version of one recipe, and a
studio process killed mid-burst keeps every save it acknowledged."""

from __future__ import annotations

import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from tests.studio_server import local_client, make_models_dir, serving_studio

ROOT = Path(__file__).resolve().parents[1]
CLIENTS, ROUNDS = 8, 12


def recipe_yaml(models: dict, name: str, i: int) -> str:
    return yaml.safe_dump(
        {"name": name, "base": "bard", "models": {"bard": models["bard"]}, "slots": [f"bard:{i % 4}"]}
    )


def test_parallel_first_saves_of_a_new_name_all_land(tmp_path_factory, tiny):
    """Round after round, every client saves a recipe name nobody has used yet, all at once: each save is
    acknowledged with a version, and each name ends up one recipe numbered 1..CLIENTS."""
    with serving_studio(tmp_path_factory, tiny, "saves") as studio:
        models = studio.engine.embedded_models()
        # a fresh studio holds the shipped examples (seeded at start, version 1 each): none named burst-*
        seeded = sorted(r.name for r in studio.engine.repo.list_recipes(deleted=None))
        assert not any(name.startswith("burst-") for name in seeded)
        clients = [local_client(studio.url) for _ in range(CLIENTS)]
        returned: list[dict] = []
        errors: list[str] = []
        barrier = threading.Barrier(CLIENTS)

        def client_saves(c: int) -> None:
            try:
                for r in range(ROUNDS):
                    barrier.wait(60)  # the first saves of name r at once: none of them finds the recipe yet
                    job = clients[c].submit(
                        recipe_yaml(models, f"burst-{r}", c), f"c{c}", api_name="/save_recipe"
                    )
                    returned.append(job.result(timeout=60))
            except BaseException as e:
                errors.append(f"client {c}: {type(e).__name__}: {e}")
                barrier.abort()

        threads = [threading.Thread(target=client_saves, args=(c,), daemon=True) for c in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not errors, errors[:3]
        assert len(returned) == CLIENTS * ROUNDS and all(r["warning"] is None for r in returned)
        recipes = studio.engine.repo.list_recipes(deleted=None)
        bursts = sorted(f"burst-{r}" for r in range(ROUNDS))
        assert sorted(r.name for r in recipes) == sorted(seeded + bursts)  # no duplicates, nothing else
        for recipe in (r for r in recipes if r.name not in seeded):
            stored = studio.engine.repo.list_versions(recipe.id)
            assert [v.number for v in stored] == list(range(1, CLIENTS + 1))
            assert sorted(v.note for v in stored) == sorted(f"c{c}" for c in range(CLIENTS))
            assert sorted(r["number"] for r in returned if r["recipe_id"] == recipe.id) == list(
                range(1, CLIENTS + 1)
            )


# ---- a studio process killed mid-burst --------------------------------------------------------------------

SERVER = """
import sys, threading
from pathlib import Path
from tests.studio_server import start_studio
running = start_studio(Path(sys.argv[1]), Path(sys.argv[2]))
print("URL", running.url, flush=True)
threading.Event().wait(float(sys.argv[3]))  # ends by itself should the test fail to kill it
"""
SERVER_LIFETIME_S = 300


class StudioProcess:
    """The studio served by a child process on 127.0.0.1 (a free port), over the database file `db`."""

    def __init__(self, models_dir: Path, db: Path, log: Path) -> None:
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(ROOT),
            "GRADIO_ANALYTICS_ENABLED": "False",
        }
        env.pop("MANGO_HOSTED", None)
        self.log = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(models_dir), str(db), str(SERVER_LIFETIME_S)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in self.proc.stdout], daemon=True).start()
        deadline = time.monotonic() + 180
        while True:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise AssertionError(f"the studio did not start; its log: {log}") from None
            if line.startswith("URL "):
                self.url = line.split()[1]
                assert self.url.startswith("http://127.0.0.1:"), self.url
                return

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
        self.log.close()


def test_sigkill_mid_burst_keeps_every_acknowledged_save(tmp_path, tiny):
    models_dir = make_models_dir(tmp_path / "models", tiny)
    db, log = tmp_path / "studio.db", tmp_path / "server.log"
    models = {"bard": str(models_dir / "mango-bard")}
    acknowledged: list[dict] = []  # what a client was told was saved: it must survive the kill
    tried = 0
    lock = threading.Lock()
    for round_, kill_after in enumerate((25, 40)):  # killed at a different point each round
        server = StudioProcess(models_dir, db, log)
        stop, target = threading.Event(), len(acknowledged) + kill_after

        def client_saves(c: int, url: str, round_: int, stop: threading.Event) -> None:
            nonlocal tried
            client = local_client(url)
            i = 0
            while not stop.is_set():
                note = f"r{round_} c{c} s{i}"
                with lock:
                    tried += 1
                try:
                    saved = client.submit(
                        recipe_yaml(models, "killed", c + i), note, api_name="/save_recipe"
                    ).result(timeout=30)
                except Exception:  # the server died under this request: it was never acknowledged
                    return
                with lock:
                    acknowledged.append({**saved, "note": note})
                i += 1

        threads = [
            threading.Thread(target=client_saves, args=(c, server.url, round_, stop), daemon=True)
            for c in range(4)
        ]
        try:
            for t in threads:
                t.start()
            deadline = time.monotonic() + 120
            while len(acknowledged) < target and time.monotonic() < deadline:
                time.sleep(0.005)
        finally:
            server.kill()  # mid-burst: the other clients' saves are in flight
            stop.set()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
        assert len(acknowledged) >= target, f"too few saves answered; see {log}"

    with sqlite3.connect(db) as conn:  # sound straight after the kills, before anything reopens it
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    server = StudioProcess(models_dir, db, log)  # restarted on the same database
    try:
        client = local_client(server.url)
        [recipe] = [r for r in client.predict(True, api_name="/list_recipes") if r["name"] == "killed"]
        stored = {v["id"]: v for v in client.predict(recipe["id"], api_name="/list_versions")}
        missing = [a for a in acknowledged if a["id"] not in stored]
        assert not missing, missing[:3]
        assert all(
            (stored[a["id"]]["number"], stored[a["id"]]["note"]) == (a["number"], a["note"])
            for a in acknowledged
        )
        assert sorted(v["number"] for v in stored.values()) == list(range(1, len(stored) + 1))
        after = client.predict(recipe_yaml(models, "killed", 0), "after restart", api_name="/save_recipe")
        assert after["number"] == len(stored) + 1
        print(
            f"saves tried {tried}, acknowledged {len(acknowledged)}, found after the kills "
            f"{sum(a['id'] in stored for a in acknowledged)} (stored {len(stored)})"
        )
    finally:
        server.kill()
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_a_save_from_a_stale_board_is_kept_and_warned_about(engine):
    from studio.tabs.recipe import save_recipe

    text = recipe_yaml(engine.embedded_models(), "stale", 0)
    v1, warning = save_recipe(engine, text)
    assert (v1.number, warning) == (1, None)
    tab = {"recipe_id": v1.recipe_id, "version": 1, "version_id": v1.id}  # two tabs opened version 1
    v2, warning = save_recipe(engine, text, "tab A", tab)
    assert (v2.number, v2.parent_id, warning) == (2, v1.id, None)
    v3, warning = save_recipe(engine, text, "tab B", tab)
    assert (v3.number, v3.parent_id, v3.note) == (3, v1.id, "tab B")
    assert "based on version 1" in warning and "version 2" in warning
