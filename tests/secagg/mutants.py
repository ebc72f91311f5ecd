"""Mutation check of the secure-aggregation tests (issue 9, point 7): each listed mutant must make a test fail.

Not a test module. Run from the repository root::

    .venv/bin/python tests/secagg/mutants.py            # every mutant
    .venv/bin/python tests/secagg/mutants.py self_mask  # one

Each mutant is applied to a copy of the package in a temporary folder (the working tree is never
touched), the secure-aggregation and membership tests run against that copy (``PYTHONPATH``
puts it first), and the script prints KILLED with the first failing test, or SURVIVED.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TESTS = ["tests/secagg", "tests/kit/test_kit_membership.py", "tests/kit/test_kit_membership_sybil.py"]

# name -> [(file, original text, mutated text)]; each original must occur exactly once.
MUTANTS: dict[str, list[tuple[str, str, str]]] = {
    "self_mask": [
        ("ultrafedfm/secagg/client.py", "streams = [MaskStream(self._self_mask_key(), sign=1, prg=cfg.prg)]",
         "streams = []"),
        ("ultrafedfm/secagg/server.py", "            streams.append(MaskStream(key, sign=-1, prg=self.config.prg))\n",
         "            pass\n"),
    ],
    "hkdf_info_without_job_and_round": [
        ("ultrafedfm/secagg/masks.py", '_PROTOCOL_LABEL, purpose.encode(), job_id.encode(), round_number.to_bytes(8, "big"),',
         "_PROTOCOL_LABEL, purpose.encode(),"),
    ],
    "constant_share_associated_data": [
        ("ultrafedfm/secagg/client.py", 'fields = [b"ultrafedfm-secagg/v2/shares", sender.encode(), receiver.encode(), '
         'job_id.encode(),\n              round_number.to_bytes(8, "big")]', 'fields = [b"ultrafedfm-secagg/v2/shares"]'),
    ],
    "duplicate_public_keys_allowed": [
        ("ultrafedfm/secagg/client.py", "if len(key) != 32 or key in keys_seen:", "if len(key) != 32:"),
    ],
    "no_survivor_list_coverage_check": [
        ("ultrafedfm/secagg/client.py",
         "if survivors | dropped != set(self._held) or len(survivors) != len(survivors_listed):", "if False:"),
    ],
    "no_site_max_sites_check": [
        ("ultrafedfm/secagg/client.py", "        if n > self.config.max_sites:\n", "        if False:\n"),
    ],
    "no_site_min_roster_check": [
        ("ultrafedfm/secagg/client.py", "        if n < self._needed:\n", "        if False:\n"),
    ],
    "no_site_min_key_sharing_check": [
        ("ultrafedfm/secagg/client.py", "if len(peers) + 1 < self._needed:", "if False:"),
    ],
    "no_site_min_survivors_check": [
        ("ultrafedfm/secagg/client.py", "if len(survivors) < self._needed:", "if False:"),
    ],
    # beyond the list: the new defences
    "no_member_key_check": [
        ("ultrafedfm/secagg/membership.py", "        if not verify_signature(self.key_of(site), data, signature):",
         "        if not self.key_of(site):"),
    ],
    "threshold_from_roster_not_consortium": [
        ("ultrafedfm/secagg/membership.py", "return max(self.threshold(config), config.min_sites, site_floor)",
         "return max(config.min_sites, site_floor)"),
    ],
    "no_round_context_check": [
        ("ultrafedfm/secagg/client.py", "    if advert.context != context:", "    if False:"),
    ],
    "no_training_task_model_check": [
        ("ultrafedfm/secagg/client.py", "        if received != self.context:", "        if False:"),
    ],
    "ledger_allows_a_second_survivor_set": [
        ("ultrafedfm/secagg/contribution.py", "        if bound is not None and tuple(sorted(survivors)) != bound:",
         "        if False:"),
    ],
    "pins_accept_changed_keys": [
        ("ultrafedfm/kit/pins.py", "        if found.changed:\n", "        if False:\n"),
    ],
}


def run(name: str) -> tuple[bool, str]:
    with tempfile.TemporaryDirectory(prefix=f"mutant-{name}-") as tmp:
        tmp = Path(tmp)
        shutil.copytree(ROOT / "ultrafedfm", tmp / "ultrafedfm", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(ROOT / "tests", tmp / "tests", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(ROOT / "docs", tmp / "docs")
        shutil.copy(ROOT / "pyproject.toml", tmp / "pyproject.toml")
        for rel, old, new in MUTANTS.get(name, []):
            path = tmp / rel
            text = path.read_text()
            if text.count(old) != 1:
                raise SystemExit(f"mutant {name}: {rel} holds the original text {text.count(old)} times, expected once")
            path.write_text(text.replace(old, new))
        env = {**os.environ, "PYTHONPATH": str(tmp), "PYTHONDONTWRITEBYTECODE": "1"}
        where = subprocess.run([sys.executable, "-c", "import ultrafedfm; print(ultrafedfm.__file__)"], env=env,
                               cwd=tmp, capture_output=True, text=True).stdout.strip()
        assert where.startswith(str(tmp)), f"the mutated copy is not the one imported ({where})"
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *TESTS],
                              env=env, cwd=tmp, capture_output=True, text=True)
        lines = proc.stdout.splitlines()
        if proc.returncode not in (0, 1) or any(line.startswith("ERROR") for line in lines):
            # not a test going red: the run itself broke (collection error, missing file) -- proves nothing
            raise SystemExit(f"mutant {name}: pytest exited {proc.returncode} without a plain test failure:\n"
                             + "\n".join(lines[-15:]))
        failed = [line for line in lines if line.startswith("FAILED")]
        return proc.returncode == 1, (failed[0] if failed else lines[-1])


def main(names: list[str]) -> int:
    passed, detail = run("unmutated")  # the baseline must be green, or every "kill" is meaningless
    if passed:
        raise SystemExit(f"the unmutated tests fail: {detail}")
    print(f"baseline (no mutant): {detail}", flush=True)
    survived = 0
    for name in names or list(MUTANTS):
        killed, detail = run(name)
        survived += not killed
        print(f"{'KILLED  ' if killed else 'SURVIVED'} {name}: {detail}", flush=True)
    print(f"{len(names or MUTANTS) - survived} killed, {survived} survived")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
