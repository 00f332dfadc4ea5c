"""Nothing lost: concurrent writers (threads and processes), stale edits, and a writer killed mid-save."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mol.errors import ConflictError, StorageError
from studio.db import DuplicateNameError, Repository

ROOT = Path(__file__).resolve().parent.parent
WRITERS, SAVES = 8, 50


def _process_writer(url: str, writer: int, saves: int, queue, start) -> None:
    """One writer process. All of them open the same fresh file at once (so they race to migrate it and to
    create the recipes), then each saves `saves` versions; two writers share each recipe and race for the
    same version numbers. Reports the numbers it was given, or its error."""
    try:
        start.wait(120)  # imports take a while: start together, or the writers hardly overlap
        repo = Repository(url)
        name = f"r{writer % 4}"
        try:
            recipe_id = repo.create_recipe(name, "slots: []\n").recipe_id
        except DuplicateNameError:  # the other writer of this recipe was first
            found = repo.find_recipe(name)
            assert found is not None
            recipe_id = found.id
        start.wait(120)
        nums = [
            repo.save_version(
                recipe_id, f"slots: [bard:{writer}]\n# save {i}\n", note=f"w{writer} s{i}"
            ).number
            for i in range(saves)
        ]
        repo.close()
        queue.put((writer, nums, None))
    except BaseException as e:  # reported to the parent, which fails the test
        queue.put((writer, [], f"{type(e).__name__}: {e}"))


def _check_everything_kept(url: str, recipe_ids: list[int] | None, returned: dict[int, list[int]]) -> None:
    repo = Repository(url)
    try:
        if recipe_ids is None:
            recipe_ids = [r.id for r in repo.list_recipes()]
            assert len(recipe_ids) == 4
        notes = set()
        for rid in recipe_ids:
            numbers = [v.number for v in repo.list_versions(rid)]
            assert numbers == list(range(1, len(numbers) + 1)), "version numbers must be contiguous"
            notes.update(v.note for v in repo.list_versions(rid))
        assert {f"w{w} s{i}" for w in range(WRITERS) for i in range(SAVES)} <= notes
        assert sum(len(repo.list_versions(r)) for r in recipe_ids) == WRITERS * SAVES + len(recipe_ids)
        for nums in returned.values():
            assert nums == sorted(nums) and len(set(nums)) == SAVES
        assert repo.integrity_check() == "ok"
    finally:
        repo.close()


def _setup(tmp_path, n_recipes: int) -> tuple[str, list[int]]:
    url = f"sqlite:///{tmp_path / 'mango.db'}"
    repo = Repository(url)
    ids = [repo.create_recipe(f"r{i}", "slots: []\n").recipe_id for i in range(n_recipes)]
    repo.close()
    return url, ids


def test_concurrent_saves_from_threads(tmp_path):
    url, ids = _setup(tmp_path, 4)
    repo = Repository(url)  # one repository shared by every thread, as in the studio's thread pool
    returned: dict[int, list[int]] = {}
    errors: list[str] = []
    barrier = threading.Barrier(WRITERS)

    def writer(w: int) -> None:
        try:
            barrier.wait()
            returned[w] = [
                repo.save_version(ids[w % len(ids)], f"slots: [bard:{w}]\n# {i}\n", note=f"w{w} s{i}").number
                for i in range(SAVES)
            ]
        except BaseException as e:
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(WRITERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    repo.close()
    assert not errors, errors
    _check_everything_kept(url, ids, returned)


def test_concurrent_first_saves_of_one_name(tmp_path):
    """Every thread saves by name a recipe nobody has created yet: the find-or-create and the append are one
    transaction, so no save is refused as a duplicate and all of them land, numbered 1..N, in one recipe."""
    repo = Repository(f"sqlite:///{tmp_path / 'mango.db'}")
    returned: dict[int, list[int]] = {}
    errors: list[str] = []
    barrier = threading.Barrier(WRITERS)

    def writer(w: int) -> None:
        try:
            barrier.wait(30)
            returned[w] = [
                repo.save_by_name("fresh", f"slots: [bard:{w}]\n# {i}\n", note=f"w{w} s{i}").number
                for i in range(SAVES)
            ]
        except BaseException as e:
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(WRITERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]
    [recipe] = repo.list_recipes(deleted=None)
    versions = repo.list_versions(recipe.id)
    assert [v.number for v in versions] == list(range(1, WRITERS * SAVES + 1))
    assert sorted(n for nums in returned.values() for n in nums) == list(range(1, WRITERS * SAVES + 1))
    assert {v.note for v in versions} == {f"w{w} s{i}" for w in range(WRITERS) for i in range(SAVES)}
    repo.close()


def test_save_by_name_keeps_the_stale_edit_semantics(tmp_path):
    repo = Repository(f"sqlite:///{tmp_path / 'mango.db'}")
    v1 = repo.save_by_name("r", "slots: []\n", note="first")
    assert (v1.number, v1.parent_id) == (1, None)
    v2 = repo.save_by_name("r", "slots: [bard:0]\n", based_on=(v1.recipe_id, 1))
    assert (v2.recipe_id, v2.number, v2.parent_id) == (v1.recipe_id, 2, v1.id)
    with pytest.raises(ConflictError) as info:  # a second tab, still on version 1: saved, then told
        repo.save_by_name("r", "slots: [coder:0]\n", based_on=(v1.recipe_id, 1))
    assert (info.value.version, info.value.based_on, info.value.latest) == (3, 1, 2)
    assert repo.get_version(v1.recipe_id, 3).parent_id == v1.id
    # a base in another recipe (one since deleted) does not count: the edit goes on top of the live one
    repo.delete_recipe(v1.recipe_id)
    fresh = repo.save_by_name("r", "slots: []\n", based_on=(v1.recipe_id, 3))
    assert fresh.recipe_id != v1.recipe_id and fresh.number == 1
    assert repo.save_by_name("r", "slots: []\n", based_on=(v1.recipe_id, 3)).number == 2
    repo.close()


def test_live_names_are_unique_in_the_schema(tmp_path):
    """The last line of defence behind the transaction: the database itself refuses a second live recipe of
    one name (a partial unique index, so deleted recipes may share it)."""
    repo = Repository(f"sqlite:///{tmp_path / 'mango.db'}")
    repo.close()
    with sqlite3.connect(tmp_path / "mango.db") as conn:
        conn.execute(
            "INSERT INTO recipes (name, created_at, deleted_at) VALUES ('n', '2024-01-01', '2024-01-02')"
        )
        conn.execute("INSERT INTO recipes (name, created_at) VALUES ('n', '2024-01-01')")
        with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
            conn.execute("INSERT INTO recipes (name, created_at) VALUES ('n', '2024-01-03')")


def test_concurrent_saves_from_processes(tmp_path):
    url = f"sqlite:///{tmp_path / 'mango.db'}"  # not created yet: the writers' first start races too
    ctx = mp.get_context("spawn")
    queue, start = ctx.Queue(), ctx.Barrier(WRITERS)
    procs = [ctx.Process(target=_process_writer, args=(url, w, SAVES, queue, start)) for w in range(WRITERS)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(60)
    assert not [r[2] for r in results if r[2]], results  # no "database is locked" surfaced
    assert all(p.exitcode == 0 for p in procs)
    _check_everything_kept(url, None, {w: nums for w, nums, _ in results})


def test_stale_edits_keep_both_versions(tmp_path):
    url, [rid] = _setup(tmp_path, 1)
    tab_a, tab_b = Repository(url), Repository(url)  # two browser tabs, both showing version 1
    a = tab_a.save_version(rid, "slots: [bard:0]\n", note="tab A", parent_version=1)
    with pytest.raises(ConflictError) as info:
        tab_b.save_version(rid, "slots: [coder:0]\n", note="tab B", parent_version=1)
    assert (a.number, info.value.version, info.value.latest) == (2, 3, 2)
    versions = tab_a.list_versions(rid)
    assert [(v.number, v.note, v.yaml_text) for v in versions[1:]] == [
        (2, "tab A", "slots: [bard:0]\n"),
        (3, "tab B", "slots: [coder:0]\n"),
    ]
    assert versions[1].parent_id == versions[2].parent_id == versions[0].id
    tab_a.close()
    tab_b.close()


def test_locked_database_is_retried_not_reported(tmp_path):
    url, [rid] = _setup(tmp_path, 1)
    # SQLite's own wait is made tiny, so only the repository's retry with backoff can ride out the lock
    repo = Repository(url, busy_timeout_s=0.001)
    blocker = sqlite3.connect(tmp_path / "mango.db", isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock

    def release() -> None:
        time.sleep(0.4)
        blocker.execute("COMMIT")

    t = threading.Thread(target=release)
    t.start()
    started = time.monotonic()
    assert repo.save_version(rid, "slots: [bard:0]\n").number == 2
    assert time.monotonic() - started >= 0.3  # it really waited for the lock
    t.join()
    # a lock that outlasts the retry window is a clear StorageError, and nothing half-saved is left behind
    impatient = Repository(url, busy_timeout_s=0.001, retry_for_s=0.2)
    blocker.execute("BEGIN IMMEDIATE")
    with pytest.raises(StorageError, match="locked"):
        impatient.save_version(rid, "slots: [bard:9]\n")
    blocker.execute("COMMIT")
    assert [v.number for v in repo.list_versions(rid)] == [1, 2]
    impatient.close()
    blocker.close()
    repo.close()


CRASH_CHILD = """
import sys
from studio.db import DuplicateNameError, Repository
repo = Repository(sys.argv[1])
rid = int(sys.argv[2])
i = 0
while True:
    v = repo.save_version(rid, "slots: [bard:1]\\n# " + "x" * (i % 997) + "\\n", note=f"crash {i}")
    print(v.number, flush=True)  # printed only after the save returned
    i += 1
"""


def test_killed_writer_loses_nothing_that_returned(tmp_path):
    url, [rid] = _setup(tmp_path, 1)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    acknowledged: list[int] = []
    for round_ in range(3):
        child = subprocess.Popen(
            [sys.executable, "-c", CRASH_CHILD, url, str(rid)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=tmp_path,
        )
        assert child.stdout is not None
        target = 20 + 7 * round_  # kill at a different point each round
        got = []
        deadline = time.monotonic() + 120
        while len(got) < target and time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            got.append(int(line))
        child.send_signal(signal.SIGKILL)
        rest, err = child.communicate(timeout=30)
        got += [int(x) for x in rest.split()]  # lines already printed before the kill
        assert len(got) >= target, err
        acknowledged += got

    with sqlite3.connect(tmp_path / "mango.db") as conn:  # opens and is sound, straight after the kills
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    repo = Repository(url)
    numbers = [v.number for v in repo.list_versions(rid)]
    assert set(acknowledged) <= set(numbers)
    assert numbers == list(range(1, len(numbers) + 1))
    assert repo.save_version(rid, "slots: []\n").number == len(numbers) + 1
    repo.close()
