"""A real provisioned FLARE deployment on loopback for end-to-end tests.

Provisions with our own ``kit init`` code (mutual TLS, free ports chosen here, HOME pointed at
a temporary folder), starts the server and the sites as real processes in their own sessions,
drives the admin side through the ``nvflare`` CLI with the admin's startup kit, injects faults
into a participant's processes (SIGSTOP/SIGCONT, SIGKILL: the FLARE parent, its job process and
the job's training script, found by their kit folder), and tears everything down, reporting every
process the product's own shutdown left behind before ending it.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ultrafedfm.kit.provisioning import ProvisionResult, provision_consortium
from ultrafedfm.kit.consortium import AdminSpec, ConsortiumConfig, ServerSpec, SiteSpec

ADMIN = "admin@ufm-e2e.org"
SERVER = "localhost"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def consortium(name: str, sites: list[str], fed_port: int, admin_port: int, store: Path) -> ConsortiumConfig:
    return ConsortiumConfig(
        name=name,
        server=ServerSpec(host=SERVER, fed_learn_port=fed_port, admin_port=admin_port, store_dir=str(store)),
        sites=[SiteSpec(name=s, org=s.replace("-", "_")) for s in sites],
        admins=[AdminSpec(email=ADMIN, org="ufm", role="project_admin")],
    )


@dataclass
class Deployment:
    root: Path
    config: ConsortiumConfig
    provisioned: ProvisionResult
    env: dict[str, str]
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    started_kits: dict[str, Path] = field(default_factory=dict)  # every kit started, outsiders' included

    @classmethod
    def provision(cls, root: Path, sites: list[str], *, name: str = "ufm-e2e") -> "Deployment":
        home = root / "home"
        home.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(
            HOME=str(home),
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            GRPC_POLL_STRATEGY="poll",
            GRPC_ENABLE_FORK_SUPPORT="False",
            PYTHONUNBUFFERED="1",
        )
        config = consortium(name, sites, free_port(), free_port(), root / "server-store")
        result = provision_consortium(config, workspace=root / "prov")
        return cls(root=root, config=config, provisioned=result, env=env)

    def kit(self, name: str) -> Path:
        """A provisioned participant's kit, or the kit a participant issued later was started from."""
        return self.provisioned.kits[name] if name in self.provisioned.kits else self.started_kits[name]

    @property
    def admin_kit(self) -> Path:
        return self.kit(ADMIN)

    def log(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def start(self, name: str, kit: Path | None = None) -> subprocess.Popen:
        """Start ``name`` from its kit (``sub_start.sh --once``: the Popen is the FLARE process itself)."""
        kit = kit or self.kit(name)
        self.started_kits[name] = kit
        with open(self.log(name), "ab") as log:
            self.processes[name] = subprocess.Popen(
                ["bash", str(kit / "startup" / "sub_start.sh"), "--once"],
                cwd=kit, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return self.processes[name]

    def pids_of(self, name: str) -> list[int]:
        """Every live process of a started participant: the FLARE parent, its job processes (their own
        sessions) and a job's training script (working in ``<kit>/<job_id>/``), parent last."""
        parent = self.processes[name].pid
        pids = [pid for pid, _ in _processes_under(self.started_kits[name])]
        return sorted(pids, key=lambda pid: pid == parent)

    def signal(self, name: str, sig: int) -> list[int]:
        """Send ``sig`` to every process of ``name`` (a hung or crashed machine, not a polite stop)."""
        pids = self.pids_of(name)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return pids

    def log_size(self, name: str) -> int:
        return self.log(name).stat().st_size if self.log(name).is_file() else 0

    def wait_for_log(self, name: str, text: str, *, timeout: float = 60.0, after: int = 0) -> None:
        """Wait until ``name``'s log holds ``text`` past byte ``after`` (e.g. the size before a restart)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log(name).is_file() and text in self.log(name).read_bytes()[after:].decode(errors="replace"):
                return
            proc = self.processes.get(name)
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({proc.returncode}) before logging {text!r}:\n{self.tail(name)}")
            time.sleep(0.5)
        raise TimeoutError(f"{name} did not log {text!r} within {timeout:.0f} s:\n{self.tail(name)}")

    def tail(self, name: str, lines: int = 40) -> str:
        path = self.log(name)
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else "(no log)"

    def nvflare(self, *args: str, timeout: float = 120.0, check: bool = True) -> dict | str:
        """Run ``nvflare --format json ARGS`` as the admin; returns the parsed JSON envelope."""
        env = dict(self.env, NVFLARE_STARTUP_KIT_DIR=str(self.admin_kit))
        proc = subprocess.run(
            [str(Path(sys.executable).parent / "nvflare"), "--format", "json", *args],
            env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"nvflare {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        try:
            return json.loads(proc.stdout)
        except ValueError:
            return proc.stdout + proc.stderr

    def admin_console(self, commands: list[str], *, timeout: float = 60.0) -> str:
        """Drive the interactive admin console (fl_admin.sh) on stdin; the first line is the user name."""
        script = "\n".join([ADMIN, *commands, "bye"]) + "\n"
        proc = subprocess.run(
            ["bash", str(self.admin_kit / "startup" / "fl_admin.sh")], input=script, env=self.env,
            capture_output=True, text=True, timeout=timeout, cwd=self.admin_kit,
        )
        return proc.stdout + proc.stderr

    def running(self) -> list[tuple[int, str]]:
        """Live processes under the deployment's folder or any kit started from elsewhere (outsiders)."""
        found: dict[int, str] = {}
        for root in (self.root, *self.started_kits.values()):
            found.update(_processes_under(root))
        return sorted(found.items())

    def stop(self) -> list[str]:
        """Shut everything down the product's way (``nvflare system shutdown all``), wait, and return the
        command lines of every process still running then -- recorded before this helper kills them.
        A second call (the fixture's teardown after the last test stopped it) finds nothing to do."""
        if not self.running() and all(p.poll() is not None for p in self.processes.values()):
            return []
        try:
            self.nvflare("system", "shutdown", "all", "--force", timeout=60, check=False)
        except (subprocess.TimeoutExpired, OSError):
            pass
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (any(p.poll() is None for p in self.processes.values())
                                               or self.running()):
            time.sleep(0.5)
        leftovers = [cmdline for _, cmdline in self.running()]  # the FLARE parents are among them (kit paths)
        for pid, _ in self.running():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in self.processes.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10)
        return leftovers


def _processes_under(root: Path) -> list[tuple[int, str]]:
    """Live processes whose command line or working directory lies under ``root``."""
    found = []
    root_s = str(root)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if root_s in cmdline or cwd.startswith(root_s):
            found.append((int(entry.name), cmdline.strip()))
    return found


def copy_kit_as(kit: Path, dest: Path) -> Path:
    shutil.copytree(kit, dest)
    return dest
