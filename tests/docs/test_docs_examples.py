"""Every code example in the docs runs, every command line in them parses, every path they name exists.

* ``python`` blocks of ``docs/*.md`` are executed as written, in a scratch folder that holds what
  they read, made with the product's own code: a job's exported encoder (``runs/x/``, ``./`` and a
  ``nvflare job download`` folder), a labelled folder at ``../shared/data/busi`` and a site's DP
  ledger holding the docs' own example entry. The one rewrite is of absolute site paths
  (``SITE_PATHS``: ``/srv/...`` to that folder); every mapping must be used.
* ``bash`` blocks of the docs, ``README.md``, ``provisioning/README.md`` and
  ``site_templates/README_KIT.md``: every ``ultrafedfm ...`` line parses with the CLI's own argparse
  parser, every ``nvflare ...`` line with FLARE's, every ``make X`` names a Makefile target.
* Every repository path those files name (in a command, in backticks, or as a relative link) exists,
  and every ``ultrafedfm.<module>[.<name>]`` they name in backticks imports.
"""
from __future__ import annotations

import importlib
import json
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = sorted((REPO / "docs").glob("*.md"))
COMMAND_FILES = [*DOCS, REPO / "README.md", REPO / "provisioning" / "README.md", REPO / "site_templates" / "README_KIT.md"]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", flags=re.S | re.M)
# Top-level entries of the repository: a token starting with one of them names a repository path.
REPO_ROOTS = ("bench/", "docs/", "jobs/", "tests/", "ultrafedfm/", "site_templates/", "provisioning/")
REPO_FILES = ("Makefile", "pyproject.toml", "README.md", "ARCHITECTURE.md")
# Absolute paths of a site's machine in the docs -> the scratch folder's stand-ins (see the fixture).
SITE_PATHS = {"/srv/ultrafedfm/cache": "srv-cache"}
# Linked before they are written: the study's results page appears when its run finishes (issue 11).


def _placeholders(text: str) -> str:
    """``<job_id>``, ``<the consortium's release>``: placeholders become one plain word."""
    return re.sub(r"<[^<>]*>", "PLACEHOLDER", text)


def blocks(path: Path, *languages: str) -> list[tuple[int, str]]:
    """(line number, body) of the fenced blocks of ``path`` in ``languages``."""
    text = path.read_text(encoding="utf-8")
    return [(text[:m.start()].count("\n") + 1, m.group(2)) for m in FENCE.finditer(text) if m.group(1) in languages]


PYTHON_BLOCKS = [(doc, line, body) for doc in DOCS for line, body in blocks(doc, "python")]
# Fine-tuning for 30 epochs, as the example says, takes ~20 s on 2 cores.
PYTHON_PARAMS = [pytest.param(doc, line, body, id=f"{doc.relative_to(REPO)}:{line}",
                              marks=[pytest.mark.slow] if "run_finetune(" in body else [])
                 for doc, line, body in PYTHON_BLOCKS]


def command_lines(path: Path) -> list[tuple[int, str]]:
    """Every command of the bash blocks of ``path``: continuation lines joined, comments kept for shlex."""
    found = []
    for start, body in blocks(path, "bash"):
        pending, first = "", None
        for offset, line in enumerate(body.splitlines(), start=1):
            first = first or start + offset
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            command = _placeholders(pending + line).strip()
            pending = ""
            if command:
                found.append((first, command))
            first = None
    return found


COMMANDS = [(path, line, cmd) for path in COMMAND_FILES for line, cmd in command_lines(path)]


def _id(path: Path, line: int) -> str:
    return f"{path.relative_to(REPO)}:{line}"


def test_the_docs_hold_code_to_check():
    assert len(PYTHON_BLOCKS) >= 6
    assert sum(cmd.startswith("ultrafedfm ") for _, _, cmd in COMMANDS) >= 20
    assert sum(cmd.startswith("nvflare ") for _, _, cmd in COMMANDS) >= 10


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """The working folder the Python examples run in, holding what they read (see the module docstring)."""
    from ultrafedfm.downstream.synthetic import write_labelled_folder
    from ultrafedfm.federation.job_spec import JOB_SPECS
    from ultrafedfm.federation.model_io import export_final_model
    from ultrafedfm.federation.server import initial_params
    from ultrafedfm.privacy.dp.ledger import site_ledger_path

    root = tmp_path_factory.mktemp("docs")
    work = root / "work"
    job = JOB_SPECS["mae_pretrain_tiny"]
    # What a finished job writes (runs/x/ is the docs' example run folder) ...
    exported = export_final_model(initial_params(job), contract=job.training_contract(), out_dir=work / "runs" / "x")
    # ... what `nvflare job download <job_id> -o results/` gives a researcher, and a copy in the working folder.
    for folder in (work / "results" / "5f0c2d1e-job" / "workspace" / "models", work):
        folder.mkdir(parents=True, exist_ok=True)
        for path in exported:
            shutil.copy2(path, folder / path.name)
        for sidecar in ("encoder.json", "encoder.md"):
            if (work / "runs" / "x" / sidecar).is_file():
                shutil.copy2(work / "runs" / "x" / sidecar, folder / sidecar)
    # ../shared/data/busi, in the shared-data format (BUSI's classes, no group column).
    write_labelled_folder(root / "shared" / "data" / "busi", n=48, seed=1, group_column=False)
    # A site's DP ledger holding the example entry docs/differential-privacy.md shows.
    example = json.loads(blocks(REPO / "docs" / "differential-privacy.md", "json")[0][1])
    from ultrafedfm.privacy.dp import ledger as ledger_module

    ledger = site_ledger_path(work / SITE_PATHS["/srv/ultrafedfm/cache"])
    ledger.parent.mkdir(parents=True, exist_ok=True)
    ledger.write_text(json.dumps({"format": ledger_module._FORMAT, "site": "hospital-a", "entries": [example]}))
    return work


@pytest.mark.parametrize("doc, line, body", PYTHON_PARAMS)
def test_python_example_runs_as_written(doc, line, body, scratch, monkeypatch, capsys):
    monkeypatch.chdir(scratch)
    for site_path, stand_in in SITE_PATHS.items():
        body = body.replace(site_path, str(scratch / stand_in))
    namespace: dict = {"__name__": "__docs__"}
    exec(compile(body, f"{_id(doc, line)}", "exec"), namespace)


def test_every_site_path_mapping_is_used():
    texts = "".join(body for _, _, body in PYTHON_BLOCKS)
    assert all(site_path in texts for site_path in SITE_PATHS)


def test_the_dp_ledger_example_reads_back_with_the_epsilon_it_shows(scratch):
    from ultrafedfm.privacy import read_ledger
    from ultrafedfm.privacy.dp.ledger import site_ledger_path

    example = json.loads(blocks(REPO / "docs" / "differential-privacy.md", "json")[0][1])
    ledger = read_ledger(site_ledger_path(scratch / "srv-cache"), site_name="hospital-a")
    spent = ledger.spent(example["job_id"])
    assert spent.charges == 1 and spent.epsilon == pytest.approx(example["epsilon_job"], abs=0.01)




@pytest.mark.parametrize("path, line, command", [c for c in COMMANDS if c[2].startswith("ultrafedfm ")],
                         ids=[_id(p, n) for p, n, c in COMMANDS if c.startswith("ultrafedfm ")])
def test_ultrafedfm_command_parses(path, line, command):
    from ultrafedfm.cli import build_parser

    argv = shlex.split(command, comments=True)[1:]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{_id(path, line)}: `{command}` does not parse (exit {exc.code})")
    assert callable(args.func)


NVFLARE_COMMANDS = [c for c in COMMANDS if c[2].startswith("nvflare ")]


@pytest.mark.parametrize("path, line, command", NVFLARE_COMMANDS, ids=[_id(p, n) for p, n, _ in NVFLARE_COMMANDS])
def test_nvflare_command_parses(path, line, command, monkeypatch):
    from nvflare import cli

    argv = shlex.split(command, comments=True)
    monkeypatch.setattr(sys, "argv", argv)
    try:
        _, args, _ = cli.parse_args("nvflare")
    except SystemExit as exc:
        pytest.fail(f"{_id(path, line)}: `{command}` does not parse with FLARE's CLI (exit {exc.code})")
    assert args.sub_command == argv[1]
    sub = {k: v for k, v in vars(args).items() if k.endswith("_sub_cmd")}
    assert len(argv) < 3 or argv[2] in sub.values(), (argv, sub)


def test_make_commands_name_makefile_targets():
    targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), flags=re.M))
    named = [(p, n, shlex.split(c, comments=True)) for p, n, c in COMMANDS if c.startswith("make ")]
    assert named
    for path, line, argv in named:
        assert set(argv[1:]) <= targets, f"{_id(path, line)}: {argv} (Makefile targets: {sorted(targets)})"


def _repo_path(token: str) -> str | None:
    """The repository path ``token`` names, or ``None`` (placeholders, other machines' paths)."""
    token = token.strip("'\",;:()")
    token = token.split("::")[0].split("=", 1)[-1]
    token = re.sub(r":\d+$", "", token)
    if token.startswith("./"):
        token = token[2:]
    if not (token.startswith(REPO_ROOTS) or token in REPO_FILES) or re.search(r"[<>*{}]|\.\.\.|NN", token):
        return None
    return token.rstrip("/.")


def _named_paths(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    tokens = [t for _, cmd in command_lines(path) for t in shlex.split(cmd, comments=True)]
    tokens += re.findall(r"`([^`\s]+)`", FENCE.sub("", text))
    return sorted({p for p in map(_repo_path, tokens) if p})


@pytest.mark.parametrize("path", COMMAND_FILES, ids=[str(p.relative_to(REPO)) for p in COMMAND_FILES])
def test_every_repository_path_named_exists(path):
    missing = [p for p in _named_paths(path) if not (REPO / p).exists()]
    assert not missing, f"{path.relative_to(REPO)} names paths that do not exist: {missing}"
    text = path.read_text(encoding="utf-8")
    links = [m for m in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text) if not re.match(r"\w+://|mailto:", m)]
    broken = [m for m in links if not (path.parent / m).exists()]
    assert not broken, f"{path.relative_to(REPO)} links to files that do not exist: {broken}"


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


@pytest.mark.parametrize("path", COMMAND_FILES, ids=[str(p.relative_to(REPO)) for p in COMMAND_FILES])
def test_every_ultrafedfm_name_in_backticks_imports(path):
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    names = {m.rstrip(".") for m in re.findall(r"`(ultrafedfm(?:\.[A-Za-z_]\w*)+)(?:\(\))?`", text)}
    unresolved = sorted(n for n in names if not _resolves(n))
    assert not unresolved, f"{path.relative_to(REPO)} names what does not import: {unresolved}"
