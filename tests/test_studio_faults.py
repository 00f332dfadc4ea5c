"""Faults, against a served studio (tiny models, a real SQLite file): models that fail to load, a stopped
generation, out of memory while building or generating, the generation gate's limit and queue, uploads that are
too large or not text, and the error id that ties a generic message to the logged traceback."""

from __future__ import annotations

import inspect
import logging
import re
import shutil
import threading
import time

import pytest
import torch
import yaml

import mol.fused
import mol.loading
from mol.errors import DataError, ResourceError
from studio.engine import GenerationGate, StudioConfig, StudioEngine
from tests.studio_server import local_client, make_models_dir, serving_studio

WORKER = "mango-generate"


@pytest.fixture(scope="module")
def studio(tmp_path_factory, tiny):
    with serving_studio(tmp_path_factory, tiny, "fault", max_new_tokens=200) as running:
        yield running


@pytest.fixture(scope="module")
def client(studio):
    return local_client(studio.url)


def save(
    client, studio, name: str, models: dict | None = None, slots=("bard:0", ["bard:1", "coder:1"])
) -> dict:
    refs = models or {a: studio.engine.embedded_models()[a] for a in ("bard", "coder")}
    text = yaml.safe_dump({"name": name, "base": "bard", "models": refs, "slots": list(slots)})
    return client.predict(text, "", api_name="/save_recipe")


def wait_until(condition, what: str, seconds: float = 30.0) -> None:
    """Poll for something that happens in another thread (a bound on waiting, not a timing assertion)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting for: {what}")
        time.sleep(0.02)


def workers() -> int:
    return sum(1 for t in threading.enumerate() if t.name == WORKER)


def idle(engine) -> bool:
    g = engine.gate.snapshot()
    return g["running"] == 0 and g["waiting"] == 0 and workers() == 0


@pytest.fixture
def slow_steps(monkeypatch):
    """Each forward step of every fused model sleeps a little, so a generation lasts long enough to stop it."""
    steps = []
    forward = mol.fused.FusedModel.forward

    def slow(self, *args, **kwargs):
        steps.append(1)
        time.sleep(0.03)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(mol.fused.FusedModel, "forward", slow)
    return steps


def in_output_order(block, result):
    """A callback's {component: value} result as the tuple of its outputs, in order (None: left as it was)."""
    return tuple(result.get(c) for c in block.outputs) if isinstance(result, dict) else result


def ordered(block):
    """A UI callback whose results read in output order (a generator's too; closing it closes the callback's)."""
    if inspect.isgeneratorfunction(block.fn):

        def gen(*args):
            inner = block.fn(*args)
            try:
                for result in inner:
                    yield in_output_order(block, result)
            finally:
                inner.close()

        return gen
    return lambda *args: in_output_order(block, block.fn(*args))


def ui_fn(studio, api_name: str):
    """A UI callback itself (what the browser's click runs), to read what it shows inline."""
    return ordered(next(f for f in studio.demo.fns.values() if f.api_name == api_name))


def ui_run(studio, version_id: int, prompt: str = "To be", max_new: int = 4) -> list:
    """Run the Playground's Run callback to its end; its yields are (output, heatmap, load, status, runs, pick)."""
    return list(ui_fn(studio, "ui_run_prompt")(version_id, 0, prompt, max_new, False, 1.0, 0, 1.0, 0, []))


# ---- (a) a model that fails to load ------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["folder deleted", "weights truncated"])
def test_a_model_that_fails_to_load_leaves_nothing_behind_and_says_why(
    client, studio, tiny, tmp_path, damage
):
    from gradio_client.exceptions import AppError

    folder = tmp_path / "victim"
    shutil.copytree(tiny("llama", width=64, layers=4, seed=7), folder)
    version = save(client, studio, f"victim-{damage}", {"bard": str(folder)}, ["bard:0", "bard:1"])
    backup = tmp_path / "backup"
    shutil.copytree(folder, backup)
    if damage == "folder deleted":
        shutil.rmtree(folder)
        expected = "does not exist"
    else:
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        expected = "truncated|not a valid|cannot be read|shorter|Re-download"

    with pytest.raises(AppError) as info:
        client.predict(version["id"], "To be", 4, api_name="/generate")
    assert re.search(expected, str(info.value)), str(info.value)
    key = ("version", version["id"], None)
    assert key not in studio.engine.cache.keys() and studio.engine.cache.building() == []
    assert idle(studio.engine)

    status = ui_run(studio, version["id"])[-1][3]  # the Playground shows it inline, as an alert
    assert 'role="alert"' in status and re.search(expected, status) and "Traceback" not in status

    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(backup, folder)  # repaired: the next request builds it from scratch, nothing poisoned
    out = client.predict(version["id"], "To be", 4, api_name="/generate")
    assert out["run_id"] and key in studio.engine.cache.keys()


# ---- (b) a stopped generation frees what it held -----------------------------------------------------------


def test_cancelling_a_streamed_generation_stops_its_worker_and_frees_its_slot(
    client, studio, slow_steps, monkeypatch
):
    version = save(client, studio, "to-stop")
    job = client.submit(version["id"], "To be, or not to be", 200, api_name="/generate_stream")
    wait_until(lambda: len(job.outputs()) >= 3, "the first streamed tokens")
    assert studio.engine.gate.snapshot()["running"] == 1
    job.cancel()
    wait_until(lambda: idle(studio.engine), "the worker to end and the slot to be released")
    assert len(slow_steps) < 150  # it stopped well before its 200 tokens
    monkeypatch.undo()
    # the next generation runs; and this prompt, not stopped, does run its 200 tokens (no early end of text)
    out = client.predict(version["id"], "To be, or not to be", 200, api_name="/generate")
    assert out["run_id"] and len(out["trace"]["token_ids"]) >= 190 and idle(studio.engine)


def test_the_stop_button_ends_the_ui_generation(studio, client, slow_steps, monkeypatch):
    """Stop sets the flag of its own browser session's generation (another session's runs on); the callback
    ends with its text and figures, saves nothing, and its worker frees its slot. A closed callback (the
    browser gone) stops the same way."""
    from types import SimpleNamespace

    version = save(client, studio, "ui-stop")
    run = ui_fn(studio, "ui_run_prompt")
    mine, other = SimpleNamespace(session_hash="mine"), SimpleNamespace(session_hash="other")
    gen = run(version["id"], 0, "To be", 200, False, 1.0, 0, 1.0, 0, [], mine)
    for n, _ in enumerate(gen):
        if n == 4:
            break
    assert workers() == 1
    ui_fn(studio, "ui_stop_run")(other)  # not this generation's session: it runs on
    more = [next(gen)[3] for _ in range(10)]
    assert all("Generating" in status for status in more), more
    ui_fn(studio, "ui_stop_run")(mine)
    rest = list(gen)
    assert re.search(r"Stopped after \d+ tokens; not saved", rest[-1][3])
    wait_until(lambda: idle(studio.engine), "the worker to end and the slot to be released")
    assert len(slow_steps) < 150
    assert studio.engine.repo.list_runs(version_id=version["id"]) == []
    closed = run(version["id"], 0, "To be", 200, False, 1.0, 0, 1.0, 0, [], mine)
    for n, _ in enumerate(closed):
        if n == 4:
            break
    closed.close()
    wait_until(lambda: idle(studio.engine), "the closed generation's worker to end")
    assert len(slow_steps) < 300
    monkeypatch.undo()
    last = ui_run(studio, version["id"], "To be", 200)[-1]  # not stopped, the same prompt runs 200 tokens
    run_id = int(re.search(r"Saved as run #(\d+)", last[3]).group(1))
    assert len(studio.engine.repo.get_run(run_id).trace["tokens"]) >= 190


# ---- (c) out of memory -------------------------------------------------------------------------------------


def oom(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def test_out_of_memory_while_building_is_a_message_and_the_app_keeps_serving(client, studio, monkeypatch):
    from gradio_client.exceptions import AppError

    version = save(client, studio, "oom-build")
    monkeypatch.setattr(mol.loading, "_build", oom)
    with pytest.raises(AppError, match="Out of memory .* while building 'oom-build'"):
        client.predict(version["id"], "To be", 4, api_name="/generate")
    status = ui_run(studio, version["id"])[-1][3]
    assert 'role="alert"' in status and "Out of memory" in status
    assert ("version", version["id"], None) not in studio.engine.cache.keys() and idle(studio.engine)
    monkeypatch.undo()
    assert client.predict(version["id"], "To be", 4, api_name="/generate")["run_id"]


def test_out_of_memory_while_generating_is_a_message_and_the_app_keeps_serving(client, studio, monkeypatch):
    from gradio_client.exceptions import AppError

    version = save(client, studio, "oom-generate")
    monkeypatch.setattr(mol.fused.FusedModel, "_decode", oom)
    with pytest.raises(AppError, match="Out of memory .* while generating 4 tokens"):
        client.predict(version["id"], "To be", 4, api_name="/generate")
    assert idle(studio.engine)
    monkeypatch.undo()
    assert client.predict(version["id"], "To be", 4, api_name="/generate")["run_id"]


# ---- (d) the generation limit, uploads ---------------------------------------------------------------------


def test_over_the_generation_limit_a_request_is_told_busy_not_queued_forever(
    client, studio, slow_steps, monkeypatch
):
    from gradio_client.exceptions import AppError

    version = save(client, studio, "busy")
    monkeypatch.setattr(studio.engine, "gate", GenerationGate(capacity=1, max_waiting=1))
    first = client.submit(version["id"], "To be", 200, api_name="/generate_stream")
    wait_until(lambda: studio.engine.gate.running == 1 and len(first.outputs()) >= 1, "the first generation")
    second = client.submit(version["id"], "To be", 2, api_name="/generate")
    wait_until(lambda: studio.engine.gate.waiting == 1, "the second to wait for a turn")
    with pytest.raises(AppError, match=r"busy: 1 generation running and 1 waiting.*Try again"):
        client.predict(version["id"], "To be", 2, api_name="/generate")
    first.cancel()
    assert second.result(timeout=60)["run_id"]  # the waiting one got its turn
    stats = studio.engine.gate.snapshot()
    assert (stats["admitted"], stats["queued"], stats["refused"], stats["peak_waiting"]) == (2, 1, 1, 1)
    wait_until(lambda: idle(studio.engine), "the slot to be released")


def test_gate_admits_in_order_and_waiters_time_out():
    gate = GenerationGate(capacity=1, max_waiting=2, wait_s=30)
    slot = gate.acquire()
    order = []

    def wait_for_turn(name):
        s = gate.acquire()
        order.append(name)
        s.release()

    threads = []
    for name in ("a", "b"):
        threads.append(threading.Thread(target=wait_for_turn, args=(name,)))
        threads[-1].start()
        wait_until(lambda n=len(threads): gate.waiting == n, "a waiter")
    with pytest.raises(ResourceError, match="busy"):
        gate.acquire()
    slot.release()
    slot.release()  # idempotent: the slot is given back once
    for t in threads:
        t.join()
    assert order == ["a", "b"] and gate.running == 0
    quick = GenerationGate(capacity=1, max_waiting=None, wait_s=0.05)
    held = quick.acquire()
    with pytest.raises(ResourceError, match="busy"):
        quick.acquire()
    held.release()
    assert quick.snapshot()["refused"] == 1 and quick.acquire()


def test_hosted_mode_takes_its_generation_and_upload_limits_from_the_policy(monkeypatch):
    from studio.app import launch_settings
    from studio.limits import Limits

    monkeypatch.setenv("MANGO_HOSTED", "1")
    monkeypatch.setenv("MANGO_GENERATION_CONCURRENCY", "8")
    monkeypatch.setenv("MANGO_LIMIT_CONCURRENT_GENERATIONS", "2")
    monkeypatch.setenv("MANGO_LIMIT_UPLOAD_BYTES", "1000")
    cfg = StudioConfig.from_env()
    assert (cfg.generation_concurrency, cfg.generation_queue, cfg.upload_bytes) == (2, 2, 1000)
    assert launch_settings()["max_file_size"] == 1000
    monkeypatch.setenv("MANGO_HOSTED", "0")
    local = StudioConfig.from_env()
    assert local.upload_bytes is None and "max_file_size" not in launch_settings()
    assert Limits().upload_bytes > 1000


def test_uploads_are_size_limited_and_read_as_text_only(studio, tmp_path, monkeypatch):
    engine = studio.engine
    text = tmp_path / "notes.txt"
    text.write_text("To be, or not to be. " * 100, encoding="utf-8")
    binary = tmp_path / "image.txt"
    binary.write_bytes(bytes(range(256)) * 4)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café".encode("latin-1"))
    assert engine.datasets([], [str(text)], "train") == {"notes": [text]}
    with pytest.raises(DataError, match="not a text file"):
        engine.datasets([], [str(binary)], "train")
    with pytest.raises(DataError, match="not UTF-8 text"):
        engine.datasets([], [str(latin)], "train")
    with monkeypatch.context() as m:
        m.setattr(engine.config, "upload_bytes", 1000)
        with pytest.raises(DataError, match="uploads are at most 1,000 bytes"):
            engine.datasets([], [str(text)], "train")

    # the Recipe tab's "Import file…": the same checks, shown inline
    on_upload = ordered(
        next(f for f in studio.demo.fns.values() if f.fn is not None and f.fn.__name__ == "on_upload")
    )
    status = on_upload(str(binary), [])[-1]
    assert 'role="alert"' in status and "not a text file" in status
    good = tmp_path / "recipe.yaml"
    good.write_text(
        yaml.safe_dump(
            {
                "name": "uploaded",
                "base": "bard",
                "slots": ["bard:0"],
                "models": {"bard": engine.embedded_models()["bard"]},
            }
        )
    )
    assert "Imported &#x27;uploaded&#x27;" in on_upload(str(good), [])[-1]


# ---- error logging -------------------------------------------------------------------------------------------


def test_an_unexpected_error_shows_an_error_id_and_logs_the_traceback(client, studio, monkeypatch, caplog):
    from gradio_client.exceptions import AppError

    def broken(*args, **kwargs):
        raise RuntimeError("secret detail of the database layer")

    monkeypatch.setattr(type(studio.engine.repo), "list_runs", broken)
    with caplog.at_level(logging.ERROR, logger="studio"), pytest.raises(AppError) as info:
        client.predict(5, api_name="/list_runs")
    message = str(info.value)
    match = re.search(r"error id ([0-9a-f]{8})", message)
    assert match and "secret" not in message and "RuntimeError" not in message and "Traceback" not in message
    record = next(r for r in caplog.records if match.group(1) in r.getMessage())
    assert record.exc_info and "secret detail of the database layer" in str(record.exc_info[1])
    assert "list_runs" in record.getMessage()
    monkeypatch.undo()
    assert isinstance(client.predict(5, api_name="/list_runs"), list)  # and the app keeps serving


def test_an_engine_without_a_database_folder_still_reports_plan_bugs_with_an_id(tmp_path, tiny, monkeypatch):
    engine = StudioEngine(
        StudioConfig(
            models_dir=make_models_dir(tmp_path / "m", tiny), db_url=f"sqlite:///{tmp_path / 'e.db'}"
        )
    )

    def crash(*args, **kwargs):
        raise KeyError("internal")

    monkeypatch.setattr("mol.plan", crash)
    report = engine.check(
        {"name": "x", "base": "bard", "models": engine.embedded_models(), "slots": ["bard:0"]}
    )
    assert (
        not report.ok and re.search(r"error id [0-9a-f]{8}", report.error) and "KeyError" not in report.error
    )
