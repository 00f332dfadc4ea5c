"""Long jobs (studio.jobs, and Train / Evaluate through the engine and controller): a cooperative Stop that keeps a
training's partial run as a trained result, a queue that says how many jobs are ahead, a Train beside an
Evaluate, and the running job found again by a page that has lost its id (a reload). Real threads, bounded waits."""

from __future__ import annotations

import threading

import pytest

from studio.controller import StudioController, readme_summary
from studio.draft_recipe import draft_yaml
from studio.jobs import JobBoard, JobStopped
from tests.test_studio_engine import routed_draft

WAIT = 60  # seconds: an upper bound, never a sleep


def blocking_work(release: threading.Event, started: threading.Event | None = None):
    def work(job, update):
        if started is not None:
            started.set()
        step = 0
        while not release.wait(0.01):
            if job.stop_requested():
                update(step=step)
                return "partial"
            step += 1
        return "done"

    return work


def test_the_queue_says_how_many_jobs_are_ahead_and_admits_in_order():
    board = JobBoard(capacity=1)
    release = threading.Event()
    started = threading.Event()
    first = board.submit("train", "a", blocking_work(release, started))
    second = board.submit("evaluate", "b", blocking_work(release))
    third = board.submit("train", "c", blocking_work(release))
    assert started.wait(WAIT)
    assert board.get(first.id).state == "running"
    assert (board.get(second.id).state, board.get(second.id).ahead) == ("queued", 1)
    assert (board.get(third.id).state, board.get(third.id).ahead) == ("queued", 2)
    board.stop(second.id)  # a waiting job never starts, and the one behind it moves up
    assert board.get(second.id).state == "stopped"
    assert board.get(third.id).ahead == 1
    release.set()
    assert board.wait(first.id, WAIT).state == "done"
    assert board.wait(third.id, WAIT).result == "done"


def test_two_jobs_run_side_by_side_and_stop_is_cooperative():
    board = JobBoard(capacity=2)
    release = threading.Event()
    a_started, b_started = threading.Event(), threading.Event()
    a = board.submit("train", "a", blocking_work(release, a_started))
    b = board.submit("evaluate", "b", blocking_work(release, b_started))
    assert a_started.wait(WAIT) and b_started.wait(WAIT)  # both run at once: neither waits for the other
    assert board.snapshot() == {"capacity": 2, "running": 2, "waiting": 0}
    board.stop(a.id)
    stopped = board.wait(a.id, WAIT)
    assert (stopped.state, stopped.result) == ("stopped", "partial")
    assert board.get(b.id).state == "running"
    release.set()
    assert board.wait(b.id, WAIT).state == "done"


def test_a_failed_job_says_why_and_a_stopped_one_keeps_nothing_when_its_work_gives_up():
    board = JobBoard(capacity=1)

    def fails(job, update):
        raise JobStopped("never")

    assert board.wait(board.submit("evaluate", "x", fails).id, WAIT).state == "stopped"

    def broken(job, update):
        from mol.errors import DataError

        raise DataError("no data here")

    failed = board.wait(board.submit("train", "y", broken).id, WAIT)
    assert (failed.state, failed.error) == ("failed", "no data here")


def test_a_page_without_the_job_id_finds_the_running_job(engine):
    ctl = StudioController(engine)
    release = threading.Event()
    started = threading.Event()
    job = engine.jobs.submit("train", "r v1", blocking_work(release, started))
    assert started.wait(WAIT)
    assert ctl.shown_job("train", None).id == job.id  # a reload: no id in the page, the running job is found
    assert ctl.shown_job("evaluate", None) is None
    assert "step" in ctl.job_line(ctl.shown_job("train", job.id)) or "preparing" in ctl.job_line(job)
    release.set()
    engine.jobs.wait(job.id, WAIT)
    assert ctl.shown_job("train", None) is None


def test_train_and_evaluate_stop_through_one_callback(engine):
    from studio.app import build_app

    demo = build_app(engine)
    by_id = {getattr(b, "elem_id", None): b for b in demo.blocks.values()}

    def on_click(elem_id):
        return next(f for f in demo.fns.values() if (by_id[elem_id]._id, "click") in f.targets)

    train_stop, eval_stop = on_click("train-stop"), on_click("eval-stop")
    for stop in (train_stop, eval_stop):  # one function, written once (studio.tabs.common)
        assert (stop.fn.__module__, stop.fn.__qualname__) == (
            "studio.tabs.common",
            "stop_job_callback.<locals>.on_stop",
        )
    train_status, eval_status = by_id["train-status"], by_id["eval-status"]
    assert "No training is running." in train_stop.fn(None)[train_status]
    assert "No evaluation is running." in eval_stop.fn(None)[eval_status]

    release, started = threading.Event(), threading.Event()
    job = engine.jobs.submit("evaluate", "e v1", blocking_work(release, started))
    assert started.wait(WAIT)
    assert "No training is running." in train_stop.fn(None)[train_status]  # each tab stops its own kind
    assert not engine.jobs.get(job.id).stop_requested()
    shown = eval_stop.fn(None)  # a page without the id (a reload) stops the running job all the same
    assert engine.jobs.get(job.id).stop_requested() and "stopping" in shown[eval_status]
    assert set(shown) == set(eval_stop.outputs)  # its status, and its timer back to reading it often
    assert engine.jobs.wait(job.id, WAIT).state == "stopped"


@pytest.fixture
def corpus(tmp_path):
    from tests.tiny_models import CORPUS

    prose, code = tmp_path / "prose.txt", tmp_path / "code.txt"
    prose.write_text(CORPUS.split("def main")[0] * 3)
    code.write_text(("def main" + CORPUS.split("def main")[1]) * 3)
    return {"prose": [prose], "code": [code]}


def test_stop_keeps_the_partial_training_run_as_a_trained_result(engine, tmp_path, corpus):
    engine.config.data_dir = tmp_path / "data"
    ctl = StudioController(engine)
    version = engine.repo.create_recipe("to-stop", draft_yaml(routed_draft(engine, "to-stop")))
    job = engine.start_training(version.id, corpus, {"steps": 2000, "batch_size": 2, "seq_len": 32})
    done = threading.Event()

    def watch():  # stop after a couple of steps have been reported
        while (j := engine.jobs.get(job.id)).active and j.step < 2:
            engine.jobs.wait(job.id, 0.05)
        engine.jobs.stop(job.id)
        done.set()

    threading.Thread(target=watch, daemon=True).start()
    assert done.wait(WAIT)
    ended = engine.jobs.wait(job.id, WAIT)
    assert ended.state == "stopped" and ended.result.status == "stopped"
    steps = ended.result.step
    assert 2 <= steps < 2000
    run = engine.repo.get_training_run(ended.result.training_run_id)
    assert run.status == "completed" and run.metrics["stopped_at"] == steps == len(run.loss_curve)
    assert run.metrics["planned_steps"] == 2000 and run.metrics["final_loss_smoothed"] is not None
    assert ctl.training_rows()[0][2] == f"stopped at step {steps} of 2000"
    label = dict((v, k) for k, v in ctl.weight_choices(version.id))[run.id]
    assert f"stopped at step {steps} of 2000" in label
    # the partial weights are a trained result: they build and generate
    out = list(engine.run_prompt(version.id, "To be", {"max_new_tokens": 2}, None, run.id))[-1]
    assert out.run_id is not None
    assert "stopped at step" in ctl.training_summary(ended.result)
    assert "smoothed" in ctl.training_summary(ended.result)


def test_evaluation_stops_between_scores_and_stores_nothing(engine, corpus):
    version = engine.repo.create_recipe("to-eval", draft_yaml(routed_draft(engine, "to-eval")))
    board = engine.jobs
    release = threading.Event()
    started = threading.Event()
    blocker = board.submit("train", "hold", blocking_work(release, started))
    board.capacity = 1  # this evaluation waits behind the blocker
    assert started.wait(WAIT)
    job = engine.start_evaluation(version.id, corpus, None, True, 32, 200)
    assert board.get(job.id).state == "queued" and board.get(job.id).ahead == 1
    assert "waiting: 1 job ahead" in StudioController(engine).job_line(board.get(job.id))
    board.stop(job.id)
    release.set()
    assert board.wait(blocker.id, WAIT).state == "done"
    assert board.wait(job.id, WAIT).state == "stopped"
    assert engine.repo.list_evaluations() == []
    ended = board.wait(engine.start_evaluation(version.id, corpus, None, True, 32, 200).id, WAIT)
    assert ended.state == "done" and ended.result.id == engine.repo.list_evaluations()[0].id


def test_the_demo_models_say_what_they_are_good_at_and_were_trained_on(engine):
    from studio.engine import REPO_ROOT

    ctl = StudioController(engine)
    card = ctl.named_tokenizer(engine.model_card("bard", "assets/models/mango-bard"))
    assert card["tokenizer_name"].startswith("byte-level BPE, 4,096 tokens · ")
    details = ctl.model_details(card)
    assert details["good_at"] == "Llama-family prose specialist (Shakespeare only)"
    assert details["trained_on"].startswith("prose (") and "code" not in details["trained_on"]
    assert details["perplexity"]["prose"] == pytest.approx(45.98, abs=0.01)
    text = (REPO_ROOT / "assets/models/mango-coder/README.md").read_text()
    assert readme_summary(text) == "GPT-NeoX code specialist (CPython standard library only)"
