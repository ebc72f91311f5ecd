"""The committed provisioning template and site template work with the commands the docs give."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from pydicom.data import get_testdata_file

from ultrafedfm.cli import main
from ultrafedfm.data.cache import open_cache
from ultrafedfm.kit.provisioning import project_yaml
from ultrafedfm.kit.consortium import load_consortium

REPO = Path(__file__).resolve().parents[2]
PROJECT_YML = REPO / "provisioning" / "project.example.yml"


def test_committed_project_yml_matches_the_consortium_example():
    config = load_consortium(REPO / "provisioning" / "consortium.example.yaml")
    committed = "\n".join(l for l in PROJECT_YML.read_text().splitlines() if not l.startswith("#")) + "\n"
    assert committed == project_yaml(config, template_dir="site_templates"), (
        "regenerate provisioning/project.example.yml (see its header)"
    )


def test_flare_provision_with_the_committed_project_yml(tmp_path):
    """`nvflare provision -p provisioning/project.example.yml` from the repository root, as documented."""
    nvflare = Path(sys.executable).parent / "nvflare"
    proc = subprocess.run([str(nvflare), "provision", "-p", str(PROJECT_YML), "-w", str(tmp_path / "ws"), "--force"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    kits = tmp_path / "ws" / "ultrafedfm-consortium" / "prod_00"
    for site in ("hospital-a", "hospital-b", "hospital-c"):
        site_yaml = (kits / site / "local" / "site.yaml").read_text()
        assert f"site configuration for {site}" in site_yaml
    assert (kits / "fl.consortium.example.org" / "local" / "consortium.json").is_file()


def test_site_template_ingest_section_drives_ingest(tmp_path):
    """`ultrafedfm ingest --source ... --cache ... --config <kit>/local/site.yaml` (docs/hospital-it.md)."""
    source = tmp_path / "dicom"
    source.mkdir()
    for name in ("examples_palette.dcm", "examples_rgb_color.dcm"):
        shutil.copy(get_testdata_file(name), source / name)
    template = yaml.safe_load((REPO / "site_templates" / "site.yaml").read_text())
    template["ingest"]["image_size"] = 48
    site_yaml = tmp_path / "site.yaml"
    site_yaml.write_text(yaml.safe_dump(template))
    cache = tmp_path / "cache"
    assert main(["ingest", "--source", str(source), "--cache", str(cache), "--config", str(site_yaml),
                 "--no-progress"]) == 0
    opened = open_cache(cache)
    assert opened.image_size == 48 and len(opened.entries) >= 2


def test_jobs_export_then_check(tmp_path):
    """`ultrafedfm jobs export` writes folders that `ultrafedfm jobs check` accepts (docs/researcher.md)."""
    assert main(["jobs", "export", "--dir", str(tmp_path)]) == 0
    assert main(["jobs", "check", "--dir", str(tmp_path)]) == 0
