"""Long operator commands show a bar on a terminal and periodic counts in the log otherwise."""

import os
import pty
import select
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from worker.catalog import adopt as adopt_module

SCRIPT = Path(sys.executable).with_name("media-retention")


def old_files(media: Path, count: int) -> None:
    stamp = (datetime.now(timezone.utc) - timedelta(days=100)).timestamp()
    for number in range(count):
        path = media / "v" / f"{number}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        os.utime(path, (stamp, stamp))


def test_adopt_on_a_terminal_asks_then_shows_a_progress_bar_to_the_total(data_dir):
    """On a TTY: the amounts and a question, then click's bar counting up to every listed blob, then the summary."""
    env = {**os.environ, "MEDIA_RETENTION_DATA_DIR": str(data_dir)}
    subprocess.run([str(SCRIPT), "org", "set", "acme"], env=env, capture_output=True, check=True)
    old_files(data_dir / "media", 1200)
    pid, fd = pty.fork()
    if pid == 0:  # the child: adopt on the terminal
        os.execve(str(SCRIPT), [str(SCRIPT), "adopt", "--org", "acme"], env)
    output, answered, deadline = b"", False, time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
        if b"Continue?" in output and not answered:
            os.write(fd, b"y\n")
            answered = True
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    text = output.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text[-2000:]
    assert "1200 of them (1200 bytes) are already past their retention" in text
    assert "adopting" in text and "1200/1200" in text
    assert "adopted: 1200" in text


def test_without_a_terminal_progress_is_periodic_log_events_and_a_summary(cli, data_dir, monkeypatch):
    """Off a TTY the counts come as `cli.progress` log events, never carriage returns, and the summary follows."""
    monkeypatch.setattr(adopt_module, "ADOPT_BATCH", 100)
    monkeypatch.setattr(adopt_module, "PROGRESS_EVERY_S", 0.0)
    cli("org", "set", "acme")
    old_files(data_dir / "media", 250)
    result = cli("adopt", "--org", "acme", "--yes")
    assert result.code == 0
    assert result.stderr.count("cli.progress") == 3 and "\r" not in result.stderr
    assert "adopt: listed 250 blobs" in result.stderr and "adopted: 250" in result.stdout
