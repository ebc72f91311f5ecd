"""A server job process notices when the server process that started it dies (flare/server/parent_watch.py).

Real processes: a stand-in "server" starts a stand-in "job process" in its own session (as FLARE
does) and exits; the job process must be told once. The end-to-end test shows the same with FLARE.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

JOB_PROCESS = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from ultrafedfm.flare.server.parent_watch import watch_parent

    marker, stop_at_once = Path(sys.argv[1]), sys.argv[2] == "stop"
    stop = watch_parent(lambda: marker.write_text(marker.read_text() + "orphaned\\n" if marker.exists() else "orphaned\\n"),
                        interval_s=0.05)
    if stop_at_once:
        stop()
    Path(str(marker) + ".ready").write_text("")
    time.sleep(3)
""")
SERVER = textwrap.dedent("""
    import subprocess, sys, time
    from pathlib import Path
    job = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2], sys.argv[3]], start_new_session=True)
    ready = Path(sys.argv[2] + ".ready")
    while not ready.exists():
        time.sleep(0.02)
""")  # then the "server" exits (dies), leaving its job process behind


def _run(tmp_path: Path, mode: str) -> str:
    marker = tmp_path / f"{mode}.txt"
    subprocess.run([sys.executable, "-c", SERVER, JOB_PROCESS, str(marker), mode], check=True, timeout=60)
    time.sleep(1.0)  # 20 watch intervals after the server is gone
    return marker.read_text() if marker.exists() else ""


def test_a_job_process_is_told_once_when_its_server_process_dies(tmp_path):
    assert _run(tmp_path, "watch") == "orphaned\n"


def test_a_stopped_watch_says_nothing(tmp_path):
    assert _run(tmp_path, "stop") == ""
