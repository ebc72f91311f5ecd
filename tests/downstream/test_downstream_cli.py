"""``ultrafedfm finetune`` / ``evaluate`` on labelled folders: outputs, partial classes, clear errors."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from ultrafedfm.cli import main
from ultrafedfm.downstream.synthetic import write_labelled_folder


FAST = ["--scratch", "--preset", "tiny", "--img-size", "32", "--epochs", "2", "--min-steps", "0", "--batch-size", "8",
        "--no-progress"]


@pytest.fixture(scope="module")
def trained_cls(lesion_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ft_cls")
    assert main(["finetune", "--data", str(lesion_folder), "--task", "cls", "--out", str(out), *FAST]) == 0
    return out


def test_finetune_writes_safetensors_card_metrics_and_split(trained_cls, lesion_folder):
    for name in ("model.safetensors", "model.json", "MODEL_CARD.md", "metrics.json", "split.json"):
        assert (trained_cls / name).is_file(), name
    metrics = json.loads((trained_cls / "metrics.json").read_text())
    assert 0.0 <= metrics["test"]["metrics"]["auroc_macro"] <= 1.0
    low, high = metrics["test"]["ci95"]["auroc_macro"]
    assert low <= metrics["test"]["metrics"]["auroc_macro"] <= high
    card = (trained_cls / "MODEL_CARD.md").read_text()
    assert "benign, malignant, normal" in card and "95% CI" in card


def test_evaluate_on_a_folder_with_only_benign_and_malignant(trained_cls, tmp_path):
    other = write_labelled_folder(tmp_path / "other", n=24, seed=99, classes=("benign", "malignant"))
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(trained_cls), "--data", str(other), "--out", str(out),
                 "--shifts", "blur,resolution", "--n-boot", "100", "--no-progress"]) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert result["classes_present"] == ["benign", "malignant"]
    assert "auroc/benign_vs_malignant" in result["metrics"] and "auroc/normal" not in result["metrics"]
    assert set(result["shifted"]) == {"blur", "resolution"}


def test_finetune_and_evaluate_segmentation_writes_example_png(lesion_folder, tmp_path):
    model = tmp_path / "seg"
    assert main(["finetune", "--data", str(lesion_folder), "--task", "seg", "--out", str(model), *FAST]) == 0
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(model), "--data", str(lesion_folder), "--split", "test",
                 "--n-boot", "50", "--out", str(out), "--no-progress"]) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert {"dice", "iou", "hd95"} <= set(result["metrics"])
    from PIL import Image

    with Image.open(out / "examples.png") as png:
        assert png.mode == "RGB" and png.width > png.height


def test_evaluate_segmentation_on_a_folder_without_masks_fails_clearly(lesion_folder, tmp_path, caplog):
    model = tmp_path / "seg"
    assert main(["finetune", "--data", str(lesion_folder), "--task", "seg", "--out", str(model), *FAST]) == 0
    no_masks = write_labelled_folder(tmp_path / "nomask", n=12, seed=3, masks=False)
    code = main(["evaluate", "--model", str(model), "--data", str(no_masks), "--out", str(tmp_path / "e"),
                 "--no-progress"])
    assert code == 2
    message = caplog.text
    assert "no image has a mask" in message and "'mask'" in message and "labels.csv" in message


def test_classification_on_a_folder_without_label_column_names_the_column(tmp_path, caplog):
    folder = write_labelled_folder(tmp_path / "unlabelled", n=12, seed=4)
    rows = list(csv.DictReader(open(folder / "labels.csv", newline="")))
    with open(folder / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "mask", "width", "height"])
        writer.writeheader()
        writer.writerows({k: r[k] for k in ("file", "mask", "width", "height")} for r in rows)
    code = main(["finetune", "--data", str(folder), "--task", "cls", "--out", str(tmp_path / "o"), *FAST])
    assert code == 2
    assert "no 'label' column" in caplog.text and "--task seg" in caplog.text


def test_finetune_reads_a_site_cache_with_labels_and_masks(lesion_folder, tmp_path):
    from ultrafedfm.data.ingest import ingest_image_folder
    from ultrafedfm.data.ingest_config import IngestConfig
    from ultrafedfm.data.labelled import load_labelled_cache

    cache = tmp_path / "cache"
    ingest_image_folder(source=lesion_folder, cache=cache, config=IngestConfig(image_size=32, workers=1),
                        progress=False)
    data = load_labelled_cache(cache, require="mask", progress=False)
    assert data.classes == ("benign", "malignant", "normal") and len(data) == 72
    assert int(data.has_mask.sum()) == 48  # normal frames have no mask
    assert data.groups_derived and len(set(data.groups)) < len(data)  # re-exported frames are grouped
    out = tmp_path / "ft"
    assert main(["finetune", "--cache", str(cache), "--task", "seg", "--out", str(out), *FAST]) == 0
    assert (out / "model.safetensors").is_file()
