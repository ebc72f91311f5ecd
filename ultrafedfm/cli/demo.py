"""``ultrafedfm demo``: federated MAE pretraining end to end, on this machine, with no setup.

    ultrafedfm demo                      # about 1.5 min on a 2-core CPU (docs/federation.md)
    ultrafedfm demo --out runs/mine --rounds 5
    ultrafedfm demo --dp --epsilon 8     # DP-SGD at every site, with secure aggregation

Generates three non-IID synthetic ultrasound sites (DICOM), adds pydicom's real ultrasound
test files to site-1, ingests every site into its local cache, and runs the tiny pretraining
job in the NVIDIA FLARE simulator: one FLARE client per site, each training in its own
process and sending back only its masked update, with its loss and image count inside the mask
(secure aggregation: the server unmasks only the sums; the simulated sites sign with their own
keys, enrolled in a member list signed by a throwaway admin key). Prints the server's line per
round (aggregates only), then a table of each site's own loss per round -- read from the figures
each simulated site kept on its own disk, which the demo can do because it runs every site on
this machine -- and the paths of the global model, the encoder and the logs. With ``--dp`` every
site trains with DP-SGD and the demo prints each site's epsilon as that site's own ledger reports
it. It ends with what the model is worth: a linear probe of the federated encoder on held-out
generated lesions, beside the same probe on a randomly initialised encoder.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from ultrafedfm.fileio import atomic_write_json

if TYPE_CHECKING:
    from ultrafedfm.federation.run_state import RunState
    from ultrafedfm.flare.deploy.simulation import SimulationResult

_logger = logging.getLogger(__name__)

__all__ = ["register", "run", "run_demo"]

DEFAULT_IMAGES_PER_SITE = 64
DEFAULT_ROUNDS = 5
# The tiny MAE learns visibly within a few rounds at this rate (peak 1e-2 * 16 / 256).
DEMO_BASE_LR = 1e-2
DEFAULT_IMAGE_SIZE = 32
DEMO_RUN_NAME = "demo"
DEFAULT_DP_EPSILON = 8.0
PROBE_FILE = "linear_probe.json"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="federated MAE pretraining of 3 synthetic sites in the FLARE simulator (no setup needed)",
        description="Generate 3 non-IID synthetic ultrasound sites, ingest them, and pretrain a tiny MAE "
        "federated over them in the NVIDIA FLARE simulator. Everything is written under --out.",
    )
    parser.add_argument("--out", type=Path, help="output folder (default: ./runs/demo-<timestamp>)")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help=f"federated rounds (default {DEFAULT_ROUNDS})")
    parser.add_argument("--images-per-site", type=int, default=DEFAULT_IMAGES_PER_SITE)
    parser.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE, help="pixels per side")
    parser.add_argument("--preset", choices=["tiny", "small", "base"], default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900.0, help="stop the simulation after this many s")
    parser.add_argument("--dp", action="store_true", help="DP-SGD at every site (with secure aggregation)")
    parser.add_argument("--epsilon", type=float, default=DEFAULT_DP_EPSILON,
                        help=f"with --dp: each site's target epsilon for the whole job (default {DEFAULT_DP_EPSILON:g})")
    parser.add_argument("--no-probe", dest="probe", action="store_false",
                        help="skip the closing linear probe of the encoder")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = args.out or Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    return run_demo(
        out=out,
        rounds=args.rounds,
        images_per_site=args.images_per_site,
        image_size=args.image_size,
        preset=args.preset,
        seed=args.seed,
        timeout_s=args.timeout,
        dp_epsilon=args.epsilon if args.dp else None,
        probe=args.probe,
    )


def run_demo(
    *,
    out: Path,
    rounds: int = DEFAULT_ROUNDS,
    images_per_site: int = DEFAULT_IMAGES_PER_SITE,
    image_size: int = DEFAULT_IMAGE_SIZE,
    preset: str = "tiny",
    seed: int = 0,
    timeout_s: float = 900.0,
    n_sites: int = 3,
    dp_epsilon: float | None = None,
    probe: bool = True,
) -> int:
    """The demo; ``dp_epsilon``: DP-SGD at every site with that target epsilon (``None``: off)."""
    out = Path(out).resolve()
    if out.exists() and any(out.iterdir()):
        _logger.error("%s exists and is not empty; pass another --out", out)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    site_dirs = _make_sites(out / "sites", n_sites=n_sites, images_per_site=images_per_site, image_size=image_size, seed=seed)
    caches = _ingest_sites(site_dirs, image_size=image_size)
    names = [f"site-{i}" for i in range(1, n_sites + 1)]
    spec = demo_spec(out=out, rounds=rounds, image_size=image_size, preset=preset, seed=seed, n_sites=n_sites,
                     dp_epsilon=dp_epsilon)
    run = _run_federation(out, spec, dict(zip(names, caches)), timeout_s=timeout_s)
    problems = _problems(run.state, rounds)
    if problems:
        _logger.error("the federated run FAILED (%s; simulator exit code %s). Server log: %s",
                      "; ".join(problems), run.result.returncode, run.result.server_log)
        _print_log_tail(run.result.server_log)
        return 1
    _print_table(run.state.read_rounds(), dict(zip(names, caches)), job=spec.name)
    if spec.dp.enabled:
        _print_site_epsilons(dict(zip(names, caches)), job=spec.name)
    if probe:
        _print_probe(run.state.dir)
    print(f"\nfinished in {time.monotonic() - started:.0f} s")
    _print_paths(run)
    _print_reports(run, dict(zip(names, caches)))
    return 0


def demo_spec(*, out: Path, rounds: int, image_size: int, preset: str, seed: int, n_sites: int,
              dp_epsilon: float | None = None):
    """The tiny pretraining job, sized for the demo, with its run state under ``out/run``."""
    from ultrafedfm.federation.job_spec import JOB_SPECS
    from ultrafedfm.privacy.dp import DPConfig

    base = JOB_SPECS["mae_pretrain_tiny_dp" if dp_epsilon is not None else "mae_pretrain_tiny"]
    dp = dataclasses.replace(base.dp, target_epsilon=dp_epsilon) if dp_epsilon is not None else DPConfig()
    return dataclasses.replace(
        base, name="ultrafedfm_demo", preset=preset, img_size=image_size, num_rounds=rounds,
        warmup_rounds=min(1, rounds), base_lr=DEMO_BASE_LR, seed=seed, min_sites=n_sites, run_name=DEMO_RUN_NAME,
        run_state_dir=str(out / "run"), dp=dp,
    )


@dataclasses.dataclass
class _DemoRun:
    state: "RunState"
    result: "SimulationResult"
    workspace: Path


def _run_federation(out: Path, spec, caches: dict[str, Path], *, timeout_s: float) -> _DemoRun:
    """Export the job, prepare the simulator's workspace and run it, printing a line per round."""
    from ultrafedfm.federation.run_state import RunState
    from ultrafedfm.federation.stats import RoundStats, format_round_line
    from ultrafedfm.flare.deploy.job_builder import export_job_folder
    from ultrafedfm.flare.deploy.simulation import prepare_workspace, run_simulation

    job_dir = export_job_folder(spec, out / "job", python=sys.executable)
    workspace = out / "flare"
    prepare_workspace(workspace, site_configs={name: {"cache": str(cache)} for name, cache in caches.items()})
    state = RunState(spec.run_state_dir, spec.effective_run_name)
    printed = 0

    def progress() -> None:
        nonlocal printed
        rows = state.read_rounds()
        for row in rows[printed:]:
            print("server: " + format_round_line(RoundStats.from_dict(row)), flush=True)
        printed = len(rows)

    print(f"running {spec.num_rounds} federated rounds over {len(caches)} sites in the FLARE simulator ...",
          flush=True)
    result = run_simulation(job_dir=job_dir, workspace=workspace, clients=sorted(caches), timeout_s=timeout_s,
                            poll=progress)
    return _DemoRun(state=state, result=result, workspace=workspace)


def _problems(state, rounds: int) -> list[str]:
    """Why the run failed, judged by what the server saved (the simulator can exit 0 after an abort)."""
    from ultrafedfm.federation.model_io import ENCODER_FILE, FINAL_MODEL_FILE

    rows = state.read_rounds()
    problems = []
    if len(rows) != rounds:
        problems.append(f"{len(rows)} of {rounds} rounds completed")
    if not any(r["applied"] for r in rows):
        problems.append("no round updated the global model")
    if not (state.dir / FINAL_MODEL_FILE).is_file() or not (state.dir / ENCODER_FILE).is_file():
        problems.append("the final model / encoder was not written")
    return problems


def _print_paths(run: _DemoRun) -> None:
    from ultrafedfm.federation.model_io import ENCODER_FILE, FINAL_MODEL_FILE

    state = run.state
    print(f"global model : {state.dir / FINAL_MODEL_FILE}")
    print(f"best model   : {state.best_model_path}")
    print(f"encoder      : {state.dir / ENCODER_FILE}  (timm-loadable ViT encoder)")
    print(f"round stats  : {state.rounds_path}  (TensorBoard: {state.tensorboard_dir})")
    print(f"server log   : {run.result.server_log}")
    print(f"site logs    : {run.workspace}/site-*/log.txt")


def _print_reports(run: _DemoRun, caches: dict[str, Path]) -> None:
    """Where the privacy audit reports of the run are: the server's, and each site's on its own disk."""
    servers = sorted((run.state.dir / "audit").glob("*/report.html"))
    print(f"audit report : {servers[-1] if servers else 'not written (see the server log)'}  (the server's)")
    for name, cache in caches.items():
        reports = sorted((cache / "privacy" / "audit").glob("*/report.html"))
        print(f"  {name:<10} : {reports[-1] if reports else 'not written (see the site log)'}  (the site's own)")


def _make_sites(root: Path, *, n_sites: int, images_per_site: int, image_size: int, seed: int) -> list[Path]:
    from ultrafedfm.data.synth import generate_sites

    print(f"generating {n_sites} non-IID synthetic ultrasound sites ({images_per_site} images each) ...", flush=True)
    # Each site keeps its own scanner's frame size (part of what makes the sites non-IID).
    sites = generate_sites(out_dir=root, n_sites=n_sites, images_per_site=images_per_site, seed=seed, progress=False)
    copied = _copy_pydicom_ultrasound(Path(sites[0]) / "dicom" / "pydicom")
    print(f"added {copied} real ultrasound DICOM files from pydicom's test data to site-1", flush=True)
    return [Path(s) for s in sites]


def _ingest_sites(site_dirs: list[Path], *, image_size: int) -> list[Path]:
    from ultrafedfm.data.ingest import ingest_dicom_folder
    from ultrafedfm.data.ingest_config import IngestConfig

    config = IngestConfig(image_size=image_size)
    caches = []
    for site in site_dirs:
        cache = site / "cache"
        summary = ingest_dicom_folder(source=site / "dicom", cache=cache, config=config, workers=2, progress=False)
        print(f"ingested {site.name}: {summary.images_written} images from {summary.added} DICOM files", flush=True)
        caches.append(cache)
    return caches


def _copy_pydicom_ultrasound(dest: Path) -> int:
    """Copy the ultrasound files shipped with pydicom / pydicom-data (no download)."""
    import pydicom
    import pydicom.data

    folders = [Path(pydicom.data.__file__).parent / "test_files"]
    try:
        import data_store  # the pydicom-data package

        folders.append(Path(data_store.__file__).parent / "data")
    except ImportError:
        pass
    dest.mkdir(parents=True, exist_ok=True)
    count = 0
    pydicom_logger = logging.getLogger("pydicom")
    level = pydicom_logger.level
    pydicom_logger.setLevel(logging.ERROR)  # the test files are full of deliberate oddities
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for folder in folders:
                for path in sorted(folder.glob("*.dcm")):
                    try:
                        header = pydicom.dcmread(path, stop_before_pixels=True)
                    except Exception:  # pydicom's test data include deliberately broken files
                        continue
                    if getattr(header, "Modality", None) == "US":
                        shutil.copy2(path, dest / path.name)
                        count += 1
    finally:
        pydicom_logger.setLevel(level)
    return count


def _print_table(rows: list[dict], caches: dict[str, Path], *, job: str) -> None:
    """Per round: each site's own training loss, from the figures it kept on its own disk, and the server's
    global loss (the only loss the server learns: a weighted mean decoded from the masked sum)."""
    from ultrafedfm.federation.site_figures import read_site_figures, site_figures_path

    own: dict[tuple[str, int], float] = {}
    for name, cache in caches.items():
        for figures in read_site_figures(site_figures_path(cache)):
            if figures.job == job:
                own[(name, figures.round)] = figures.loss  # a re-run round: its last record
    names = list(caches)
    print("\nloss per round: each site's own figure, read from the site's disk (<cache>/privacy/round_figures.jsonl;")
    print("never sent: the demo runs every site on this machine); 'global' is all the server learned")
    header = ["round", *names, "global"]
    print("  ".join(f"{h:>9}" for h in header))
    for row in rows:
        cells = [f"{row['round'] + 1:>9}"]
        for name in names:
            loss = own.get((name, row["round"])) if name in row["participants"] else None
            cells.append(f"{loss:>9.4f}" if loss is not None else f"{'failed':>9}")
        g = row["global_loss"]
        cells.append(f"{g:>9.4f}" if g is not None else f"{'skipped':>9}")
        print("  ".join(cells))


def _print_site_epsilons(caches: dict[str, Path], *, job: str) -> None:
    """Each site's DP spend, read from that site's own ledger on its own disk (never sent to the server)."""
    from ultrafedfm.privacy.dp import read_ledger, site_ledger_path

    print("\nDP-SGD: each site's epsilon as the site itself reports it, from its own ledger "
          "(<cache>/privacy/; the server never learns it):")
    print(f"{'site':>9}  {'rounds':>6}  {'epsilon':>8}  {'delta':>9}  {'noise':>6}  {'accountant':>10}  "
          f"{'lifetime eps':>12}")
    for name, cache in caches.items():
        charges = [c for c in read_ledger(site_ledger_path(cache), site_name=name).charges() if c.job == job]
        if not charges:
            print(f"{name:>9}  {'no DP round charged':>40}")
            continue
        last = charges[-1]
        print(f"{name:>9}  {len(charges):>6}  {last.epsilon_job:>8.3f}  {last.delta:>9.2e}  "
              f"{last.noise_multiplier:>6.3f}  {last.accountant:>10}  {last.epsilon_lifetime:>12.3f}")


def _print_probe(run_dir: Path) -> None:
    """What the model is worth: the federated encoder's linear probe beside a random encoder's."""
    from ultrafedfm.downstream.probe import format_probe_comparison, linear_probe_comparison
    from ultrafedfm.federation.model_io import ENCODER_FILE

    print("\nwhat the encoder is worth (generated lesions from scanner profiles no site used):", flush=True)
    result = linear_probe_comparison(run_dir / ENCODER_FILE)
    print(format_probe_comparison(result))
    atomic_write_json(run_dir / PROBE_FILE, result)
    _add_probe_to_card(run_dir / ENCODER_FILE, result)


def _add_probe_to_card(encoder: Path, result: dict) -> None:
    """The encoder's model card gains the probe's AUROC with its interval (JSON sidecar and Markdown)."""
    from ultrafedfm.models.card import Metric, card_from_mapping, write_card_markdown

    sidecar = encoder.with_suffix(".json")
    meta = json.loads(sidecar.read_text(encoding="utf-8"))
    if "card" not in meta:
        return
    card = card_from_mapping(meta["card"])
    probe = result["pretrained"]
    metric = Metric(value=probe["auroc"], ci_low=probe["ci95"][0], ci_high=probe["ci95"][1], n=result["n_test"],
                    dataset="generated lesions from held-out scanner profiles (linear probe, benign vs malignant; "
                    f"random-init encoder: {result['random_init']['auroc']:.3f})")
    card = dataclasses.replace(card, metrics={**card.metrics, "linear probe AUROC": metric})
    meta["card"] = card.to_mapping()
    atomic_write_json(sidecar, meta)
    write_card_markdown(card, encoder.with_suffix(".md"), weights_file=encoder.name)


def _print_log_tail(path: Path, lines: int = 30) -> None:
    if path.is_file():
        tail = path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
        print("\n".join(tail), file=sys.stderr)
