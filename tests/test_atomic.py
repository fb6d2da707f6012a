"""Files written whole or not at all (capsx/atomic.py): an error or a SIGKILL mid-write leaves the
old file, never half of the new one, and no temporary file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from capsx.atomic import replacing, write_text


def test_a_write_that_fails_keeps_the_old_file_and_leaves_nothing_beside_it(tmp_path):
    target = write_text(tmp_path / "a.json", "old")
    with pytest.raises(RuntimeError), replacing(target, "w") as f:
        f.write("half of the new")
        raise RuntimeError("the disk filled up")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.json"]
    write_text(target, "new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["a.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # not the temporary file's private 0600


WRITER = """
import sys
from pathlib import Path
from capsx.atomic import replacing
target, i = Path(sys.argv[1]), 0
while True:  # 8 MB files, each all one byte value: a torn file would mix two values or be short
    i += 1
    with replacing(target) as f:
        for _ in range(8):
            f.write(bytes([i % 251]) * (1 << 20))
"""


def test_a_sigkill_at_random_moments_never_leaves_half_a_file(tmp_path):
    target = tmp_path / "big.bin"
    delays = [0.35, 0.6, 0.9, 1.3]  # seconds after start, spread over many rewrites (each ~10-50 ms)
    for delay in delays:
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)])
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        if target.exists():  # absent only if the first file was not yet complete
            data = target.read_bytes()
            assert len(data) == 8 << 20 and data.count(data[:1]) == len(data)
        leftovers = [p.name for p in tmp_path.iterdir() if p.name != "big.bin"]
        # a kill between creating and renaming leaves the writer's temporary file, never a torn target
        assert all(n.startswith(f".big.bin.{proc.pid}.") and n.endswith(".tmp") for n in leftovers), leftovers
    assert target.exists()
    write_text(target, "after")  # the next write removes what a killed writer left
    assert [p.name for p in tmp_path.iterdir()] == ["big.bin"]
