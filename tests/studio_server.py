"""A running studio for tests: tiny demo-like models (same aliases as the shipped ones), a temporary SQLite
database, the app served in this process on a free port."""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from studio.engine import StudioConfig, StudioEngine

# The shipped demo family's names and families, at test size; one tokenizer for all three.
DEMO_LIKE = {
    "mango-bard": ("llama", 64, 4),
    "mango-coder": ("gpt_neox", 48, 3),
    "mango-base": ("gpt2", 64, 2),
}


def make_models_dir(folder: Path, tiny) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, (family, width, layers) in DEMO_LIKE.items():
        if not (folder / name).exists():
            shutil.copytree(tiny(family, width=width, layers=layers, seed=len(name)), folder / name)
    return folder


def local_client(url: str):
    """A gradio_client for the studio served at `url`, over plain HTTP on 127.0.0.1. Without certificate
    verification because gradio_client opens a new httpx client for every request, and a verifying one loads the
    CA bundle each time: half of a call's CPU time, for a connection that has no TLS to verify."""
    from gradio_client import Client

    return Client(url, verbose=False, ssl_verify=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningStudio:
    url: str
    engine: StudioEngine
    demo: object

    def close(self) -> None:
        self.demo.close()


def start_studio(models_dir: Path, db_path: Path, **config) -> RunningStudio:
    from studio.app import build_app, launch_settings

    engine = StudioEngine(StudioConfig(models_dir=models_dir, db_url=f"sqlite:///{db_path}", **config))
    demo = build_app(engine)
    port = free_port()
    demo.launch(**launch_settings(server_port=port, prevent_thread_lock=True, quiet=True))
    return RunningStudio(f"http://127.0.0.1:{port}/", engine, demo)


@contextmanager
def serving_studio(tmp_path_factory, tiny, name: str, **config) -> Iterator[RunningStudio]:
    """A studio on fresh test-size demo models and its own database (folders named after `name`), closed on exit."""
    running = start_studio(
        make_models_dir(tmp_path_factory.mktemp(f"{name}-models"), tiny),
        tmp_path_factory.mktemp(f"{name}-db") / "studio.db",
        **config,
    )
    try:
        yield running
    finally:
        running.close()
