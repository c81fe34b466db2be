"""``make demo`` as a reader runs it: it opens with no warning, and each command it suggests at
the end works pasted into a shell."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.conftest import BIN, ROOT


def reader_env(**extra: str) -> dict[str, str]:
    """The environment of someone who just cloned the repo: none of our or OTel's variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OCP_", "OTEL_"))}
    return {**env, **extra}


def test_demo_opens_without_a_warning_and_its_next_steps_work(tmp_path: Path) -> None:
    """The demo exits 0 with nothing on stderr (no warning about the official instrumentation
    its own dev extras install), ends with a "Next steps" block, and each command in it exits 0
    in a plain shell on the demo's database, doing what the block says."""
    done = subprocess.run(
        [str(BIN / "python"), "-m", "otel_celery_publish.demo"],
        check=False,
        cwd=ROOT,
        env=reader_env(OCP_DEMO_DIR=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == "", done.stderr
    assert done.stdout.startswith("1. publishing"), done.stdout[:300]
    steps = done.stdout.split("\nNext steps:", 1)[1].splitlines()
    commands = [line.strip() for line in steps if line.startswith("    ")]
    assert [c.split(" audit ", 1)[1].split()[0] for c in commands] == [
        "lost", "show", "stats", "replay",
    ]  # fmt: skip
    database = tmp_path / "otel-celery-demo" / "audit.db"
    assert all(f"--audit-url sqlite:///{database}" in c for c in commands), commands
    outputs = []
    for command in commands:
        ran = subprocess.run(
            ["bash", "-c", command],
            check=False,
            cwd=ROOT,
            env=reader_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert ran.returncode == 0, (command, ran.stdout, ran.stderr)
        assert ran.stderr == "", (command, ran.stderr)
        outputs.append(ran.stdout)
    lost, show, stats, replay = outputs
    assert lost.strip() == "no lost tasks"
    stranded = commands[1].split(" show ", 1)[1].split()[0]
    assert stranded in done.stdout.split("\nNext steps:", 1)[0]  # a task of this run
    assert f"demo.add[{stranded}] attempt 0: replayed" in show and "replay of" in show
    assert "replayed 1" in stats and "scheduled delay" in stats
    assert "demo.charge" in replay and "dry run: would send 1, refused 0" in replay
