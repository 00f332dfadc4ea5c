"""Hosted mode's "server busy" answers: counts that read right, and when to try again."""

import re
import threading
import time

import pytest

from mol.errors import ResourceError
from studio.engine import GenerationGate, load_text


def refusal(gate: GenerationGate) -> str:
    with pytest.raises(ResourceError) as info:
        gate.acquire()
    return str(info.value)


def test_counts_read_right():
    assert load_text(1) == "1 generation running"
    assert load_text(2) == "2 generations running"
    assert load_text(1, 1) == "1 generation running and 1 waiting"
    assert load_text(0, 3) == "0 generations running and 3 waiting"


def test_busy_says_how_busy_and_when_to_retry():
    gate = GenerationGate(capacity=1, max_waiting=0)
    held = gate.acquire()
    msg = refusal(gate)
    # No generation has finished yet: a default guess of one round.
    assert msg == (
        "The server is busy: 1 generation running, as many as it can take. Try again in about 30 seconds."
    )
    held.release()
    time.sleep(0.01)
    gate.acquire()  # quick generations: the estimate follows them (rounded up to 5 s)
    assert refusal(gate).endswith("Try again in about 5 seconds.")

    pair = GenerationGate(capacity=2, max_waiting=0)
    pair.acquire(), pair.acquire()
    assert "busy: 2 generations running, as many" in refusal(pair)


def test_the_estimate_grows_with_the_queue_ahead():
    gate = GenerationGate(capacity=1, max_waiting=1, wait_s=30)
    held = gate.acquire()
    waiter = threading.Thread(target=lambda: gate.acquire().release())
    waiter.start()
    deadline = time.monotonic() + 10
    while gate.waiting != 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    msg = refusal(gate)
    assert "1 generation running and 1 waiting" in msg
    assert int(re.search(r"in about (\d+) seconds", msg).group(1)) == 60  # two rounds of the 30 s guess
    held.release()
    waiter.join()
