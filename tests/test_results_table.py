"""Paper-layout results tables from nnU-Net summaries: values, column order, paper rows, errors, and the paper JSON.

The nnU-Net result folders are written here with nnU-Net's own ``save_summary_json``, so the keys (``"2"``,
``"(1, 2, 3)"``) and layout are exactly what nnUNetv2_find_best_configuration and nnUNetv2_train write.
"""

import argparse
import csv
import io
import json
import math
from pathlib import Path

import pytest
from nnunetv2.evaluation.evaluate_predictions import save_summary_json

from rep3d_nnunet.paper_results import load_paper_results, load_paper_tables, paper_table
from rep3d_nnunet.results_table import add_arguments, results_table, run_from_args

KITS_LABELS = {"background": 0, "kidney": [1, 2, 3], "tumor": 2, "cyst": 3}  # region-based, like nnU-Net's KiTS
KIDNEY, TUMOR, CYST = (1, 2, 3), 2, 3
# nnU-Net's AMOS label names (its typo 'arota' included), in a shuffled order, plus one class the paper lacks
AMOS_LABELS = {"background": 0, "liver": 1, "postcava": 2, "spleen": 3, "gall bladder": 4, "lesion": 5,
               "arota": 6, "prostate/uterus": 7}
AMOS_HEADERS = ["Spleen", "R.Kid", "L.Kid", "Gall.", "Eso.", "Liver", "Stom.", "Aorta", "IVC", "Panc.", "RAG",
                "LAG", "Duo.", "Blad.", "Pros."]
AMOS_CLASSES = ["spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
                "inferior vena cava", "pancreas", "right adrenal gland", "left adrenal gland", "duodenum", "bladder",
                "prostate/uterus"]
NAN = math.nan


def _write_summary(path: Path, cases: list[dict]) -> Path:
    """An nnU-Net summary.json for per-case Dice values ({label or region: Dice}), means as nnU-Net takes them."""
    per_case = [{"reference_file": f"gt/case_{i:03d}.nii.gz", "prediction_file": f"pred/case_{i:03d}.nii.gz",
                 "metrics": {k: {"Dice": d, "IoU": d / (2 - d) if not math.isnan(d) else NAN, "FP": 1, "TP": 9,
                                 "FN": 1, "TN": 100, "n_pred": 10, "n_ref": 10} for k, d in case.items()}}
                for i, case in enumerate(cases)]
    keys = list(cases[0])
    means = {}
    for k in keys:
        means[k] = {}
        for metric in per_case[0]["metrics"][k]:
            values = [c["metrics"][k][metric] for c in per_case if not math.isnan(c["metrics"][k][metric])]
            means[k][metric] = sum(values) / len(values) if values else NAN
    foreground = {m: sum(means[k][m] for k in keys) / len(keys) for m in means[keys[0]]}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_summary_json({"metric_per_case": per_case, "mean": means, "foreground_mean": foreground}, str(path))
    return path


def _model_folder(root: Path, dataset: str, trainer: str, labels: dict, plans: str = "nnUNetPlans",
                  configuration: str = "3d_fullres") -> Path:
    folder = root / dataset / f"{trainer}__{plans}__{configuration}"
    folder.mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps({"labels": labels, "file_ending": ".nii.gz"}))
    return folder


@pytest.fixture
def kits(tmp_path, monkeypatch):
    """Dataset501_KiTS21: Rep3D with a cross-validation summary, nnUNetTrainer with folds 0, 1, 3 only."""
    root = tmp_path / "nnUNet_results"
    monkeypatch.setenv("nnUNet_results", str(root))
    monkeypatch.delenv("nnUNet_raw", raising=False)
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    rep3d = _model_folder(root, "Dataset501_KiTS21", "nnUNetTrainerRep3D", KITS_LABELS)
    _write_summary(rep3d / "crossval_results_folds_0_1_2_3_4" / "summary.json",
                   [{KIDNEY: 0.96, TUMOR: 0.80, CYST: 0.50}, {KIDNEY: 0.94, TUMOR: 0.70, CYST: NAN}])
    # a fold summary too: the cross-validation summary must win over it
    _write_summary(rep3d / "fold_0" / "validation" / "summary.json", [{KIDNEY: 0.1, TUMOR: 0.1, CYST: 0.1}])
    default = _model_folder(root, "Dataset501_KiTS21", "nnUNetTrainer", KITS_LABELS)
    _write_summary(default / "fold_0" / "validation" / "summary.json",
                   [{KIDNEY: 0.90, TUMOR: 0.60, CYST: 0.40}, {KIDNEY: 0.80, TUMOR: 0.50, CYST: 0.30}])
    _write_summary(default / "fold_1" / "validation" / "summary.json", [{KIDNEY: 0.96, TUMOR: 0.70, CYST: NAN}])
    _write_summary(default / "fold_3" / "validation" / "summary.json", [{KIDNEY: 0.94, TUMOR: 0.80, CYST: 0.20}])
    (default / "fold_2").mkdir()  # a fold still training: no validation yet
    # fold 'all' validates on its own training cases: never part of a cross-validation number
    _write_summary(default / "fold_all" / "validation" / "summary.json", [{KIDNEY: 0.0, TUMOR: 0.0, CYST: 0.0}])
    return root


def _parse(args: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(args)


def _csv_rows(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text)))


def _paper_cells(table_id: str, method: str) -> list[str]:
    """A paper row as the CSV should show it: 3-decimal Dice, settings as printed, empty for '-'."""
    table = paper_table(table_id)
    row = next(r for r in table.rows if r.method == method)
    return ["" if v is None else (f"{v:.3f}" if c.kind in ("class", "mean", "dice") else str(v))
            for v, c in zip(row.values, table.columns)]


# ------------------------------------------------------------------------------------------------ measured values


def test_kits_crossval_and_pooled_folds_in_markdown_and_csv(kits, tmp_path):
    out_csv = tmp_path / "out" / "table.csv"
    markdown = run_from_args(_parse(["-d", "501", "-tr", "nnUNetTrainerRep3D", "nnUNetTrainer", "--csv",
                                     str(out_csv)]))
    rows = _csv_rows(out_csv.read_text())
    assert rows[0] == ["Source", "Method", "#Params", "FLOPs", "Kidney", "Tumor", "Cyst", "Mean"]
    # cross-validation summary: nanmean per class (cyst is NaN in case 2), then the mean over the 3 classes
    assert rows[1] == ["measured", "nnUNetTrainerRep3D", "", "", "0.950", "0.750", "0.500", "0.733"]
    # folds 0, 1, 3 pooled per case (4 cases), not averaged per fold (kidney would be 0.917)
    assert rows[2] == ["measured", "nnUNetTrainer", "", "", "0.900", "0.650", "0.300", "0.617"]
    paper_rows = [r for r in rows if r[0] == "paper"]
    assert [r[1] for r in paper_rows] == [r.method for r in paper_table("table1_kits").rows]
    for row in paper_rows:
        assert row[2:] == _paper_cells("table1_kits", row[1])
    assert ["paper", "Rep3D", "66.0M", "757.6G", "0.955", "0.763", "0.490", "0.736"] in rows

    assert "| measured | nnUNetTrainerRep3D | - | - | 0.950 | 0.750 | 0.500 | 0.733 |" in markdown
    assert "| paper | Rep3D | 66.0M | 757.6G | 0.955 | 0.763 | 0.490 | 0.736* |" in markdown  # the paper's p < 0.01
    assert "table1_kits picked because 3 of the dataset's 3 classes match" in markdown
    assert "crossval_results_folds_0_1_2_3_4/summary.json" in markdown
    assert "folds 0, 1, 3 (fold_K/validation/summary.json, pooled per case); folds 2, 4 have no validation" in markdown
    assert "paper protocol: KiTS21, 5-fold cross-validation, held-out test split" in markdown
    assert "nnUNetTrainerRep3D: 5-fold cross-validation" in markdown
    assert "reproduces the paper's row 'Rep3D'" in markdown
    assert "reproduces the paper's row 'nn-UNet (Isensee et al., 2021)'" in markdown
    assert f"CSV written to {out_csv}" in markdown


def test_amos_columns_follow_the_paper_with_aliases(tmp_path, monkeypatch):
    root = tmp_path / "results"
    folder = _model_folder(root, "Dataset502_AMOS", "nnUNetTrainerRep3D", AMOS_LABELS, plans="Rep3DPlans")
    dice = {1: 0.981, 2: 0.912, 3: 0.970, 4: 0.801, 5: 0.455, 6: 0.944, 7: 0.866}
    _write_summary(folder / "crossval_results_folds_0_1_2_3_4" / "summary.json", [dice])
    monkeypatch.delenv("nnUNet_results", raising=False)
    table = results_table("Dataset502_AMOS", ["nnUNetTrainerRep3D"], plans="Rep3DPlans",
                          paper_table_id="TABLE2_AMOS_CT", results_dir=root)
    rows = _csv_rows(table.to_csv())
    # paper order first (every paper organ: the paper rows need them), the class the paper lacks before the mean
    assert rows[0] == ["Source", "Method", *AMOS_HEADERS, "lesion", "Avg"]
    measured = dict(zip(rows[0], rows[1]))
    assert (measured["Spleen"], measured["Gall."], measured["Liver"], measured["Aorta"], measured["IVC"],
            measured["Pros."], measured["lesion"]) == ("0.970", "0.801", "0.981", "0.944", "0.912", "0.866", "0.455")
    assert measured["R.Kid"] == measured["Eso."] == ""  # not in this dataset
    assert measured["Avg"] == f"{sum(dice.values()) / len(dice):.3f}"
    lrbm = next(r for r in rows if r[:2] == ["paper", "Rep3D (LRBM)"])
    published = _paper_cells("table2_amos_ct", "Rep3D (LRBM)")
    assert lrbm[2:] == published[:15] + [""] + published[15:]  # no paper value for our extra class
    assert dict(zip(rows[0], lrbm))["Avg"] == "0.910"
    markdown = table.to_markdown()
    assert "0.910*" in markdown
    assert "postcava -> IVC" in markdown and "gall bladder -> Gall." in markdown and "arota -> Aorta" in markdown
    assert "not in paper table2_amos_ct: lesion" in markdown
    assert "reproduces the paper's row 'Rep3D (LRBM)'" in markdown


def test_amos_mri_drops_organs_the_paper_never_reports(kits):
    table = results_table("501", ["nnUNetTrainerRep3D"], paper_table_id="table2_amos_mri")
    assert "Blad." not in table.header and "Pros." not in table.header  # '-' in every paper row, not ours either
    assert table.header[-4:] == ["kidney", "tumor", "cyst", "Avg"]
    mri = next(r for r in table.rows if r[1] == "Rep3D (LRBM)")
    assert mri[table.header.index("Avg")] == 0.864


@pytest.mark.parametrize("labels, expected", [
    ({"background": 0, "pancreas": 1, "tumor": 2}, "table1_pancreas"),
    ({"background": 0, "vessel": 1, "tumor": 2}, "table1_hepatic"),
    ({"background": 0, **{name: i + 1 for i, name in enumerate(AMOS_CLASSES)}}, "table2_amos_ct"),
    ({"background": 0, **{name: i + 1 for i, name in enumerate(AMOS_CLASSES[:13])}}, "table2_amos_mri"),
    ({"background": 0, "bright_blob": 1, "dark_blob": 2}, None),
])
def test_paper_table_picked_from_the_classes(tmp_path, labels, expected):
    folder = _model_folder(tmp_path, "Dataset503_X", "nnUNetTrainer", labels)
    _write_summary(folder / "crossval_results_folds_0_1_2_3_4" / "summary.json",
                   [{v: 0.5 for k, v in labels.items() if v}])
    table = results_table("503", ["nnUNetTrainer"], results_dir=tmp_path)
    assert table.title.endswith(f"({expected})") if expected else "vs." not in table.title
    assert ("paper" in [r[0] for r in table.rows]) == (expected is not None)


def test_tables_without_class_columns(kits):
    ablation = results_table("501", ["nnUNetTrainerRep3D"], paper_table_id="table4")
    assert ablation.header == ["Source", "Method", "kidney", "tumor", "cyst", "Avg. Dice Score"]
    assert _csv_rows(ablation.to_csv())[-4] == ["paper", "15×15×15", "", "", "", "0.895"]
    benchmarks = results_table("501", ["nnUNetTrainerRep3D"], paper_table_id="table10")
    assert benchmarks.header == ["Source", "Method", "kidney", "tumor", "cyst", "Mean", "AMOS CT", "AMOS MRI",
                                 "KiTS", "Pancreas", "Hepatic"]
    assert _csv_rows(benchmarks.to_csv())[-1] == ["paper", "Rep3D (Ours)", "", "", "", "", "0.910", "0.864",
                                                  "0.736", "0.723", "0.674"]
    settings = results_table("501", ["nnUNetTrainerRep3D"], paper_table_id="table8")
    csla = dict(zip(settings.header, _csv_rows(settings.to_csv())[-2]))
    assert csla == {"Source": "paper", "Method": "AdamW 21×21×21 + 3×3×3 (lr 0.0002 / 0.0003)",
                    "Optimizer": "AdamW", "Main Branch": "21×21×21", "Para. Branch": "3×3×3", "Train Steps": "60000",
                    "Main LR": "0.0002", "Para. LR": "0.0003", "kidney": "", "tumor": "", "cyst": "",
                    "Mean Dice": "0.889"}


def test_no_paper_table(kits):
    table = results_table("501", ["nnUNetTrainerRep3D"], paper_table_id="none")
    assert [r[0] for r in table.rows] == ["measured"]
    assert table.header == ["Source", "Method", "kidney", "tumor", "cyst", "Mean"]


def test_explicit_summaries_without_nnunet_results(tmp_path, monkeypatch):
    monkeypatch.delenv("nnUNet_results", raising=False)
    monkeypatch.delenv("nnUNet_raw", raising=False)
    predictions = tmp_path / "predictions_test"
    summary = _write_summary(predictions / "summary.json", [{KIDNEY: 0.97, TUMOR: 0.81, CYST: 0.55}])
    (predictions / "dataset.json").write_text(json.dumps({"labels": KITS_LABELS}))  # nnUNetv2_predict writes it
    other = _write_summary(tmp_path / "other" / "summary.json", [{KIDNEY: 0.91, TUMOR: 0.61, CYST: 0.31}])
    text = run_from_args(_parse(["-d", "501", "-tr", "nnUNetTrainerRep3D", "nnUNetTrainer", "--summary",
                                 str(predictions), str(other), "--paper-table", "table1_kits"]))
    assert "| measured | nnUNetTrainerRep3D | - | - | 0.970 | 0.810 | 0.550 | 0.777 |" in text
    assert "| measured | nnUNetTrainer | - | - | 0.910 | 0.610 | 0.310 | 0.610 |" in text
    assert f"summary {summary}" in text and "explicit summaries" in text


def test_without_dataset_json_classes_are_label_ids(tmp_path, monkeypatch):
    monkeypatch.delenv("nnUNet_results", raising=False)
    monkeypatch.delenv("nnUNet_raw", raising=False)
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    summary = _write_summary(tmp_path / "summary.json", [{1: 0.5, 2: 0.7}])
    table = results_table("7", ["nnUNetTrainer"], summaries=[summary])
    assert table.header == ["Source", "Method", "label 1", "label 2", "Mean"]
    assert table.formatted_rows()[0] == ["measured", "nnUNetTrainer", "0.500", "0.700", "0.600"]
    assert any("no dataset.json" in n for n in table.notes)


# ------------------------------------------------------------------------------------------------------- errors


def test_error_nnunet_results_unset(monkeypatch):
    monkeypatch.delenv("nnUNet_results", raising=False)
    with pytest.raises(ValueError, match=r"nnUNet_results is not set: export nnUNet_results=.*--summary"):
        results_table("501", ["nnUNetTrainerRep3D"])


def test_error_nnunet_results_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        results_table("501", ["nnUNetTrainerRep3D"], results_dir=tmp_path / "nowhere")


def test_error_unknown_paper_table_lists_valid_ids(kits):
    with pytest.raises(ValueError, match=r"unknown paper table 'table5'; valid ids: table1_kits, .*table10"):
        results_table("501", ["nnUNetTrainerRep3D"], paper_table_id="table5")


def test_error_trainer_without_summary_names_the_fix(kits):
    _model_folder(kits, "Dataset501_KiTS21", "nnUNetTrainerRep3DVanilla", KITS_LABELS)
    (kits / "Dataset501_KiTS21" / "nnUNetTrainerRep3DVanilla__nnUNetPlans__3d_fullres" / "fold_0").mkdir()
    with pytest.raises(FileNotFoundError) as error:
        results_table("501", ["nnUNetTrainerRep3D", "nnUNetTrainerRep3DVanilla"])
    message = str(error.value)
    assert "no evaluation summary for nnUNetTrainerRep3DVanilla" in message
    assert ("nnUNetv2_find_best_configuration Dataset501_KiTS21 -c 3d_fullres -tr nnUNetTrainerRep3DVanilla "
            "-p nnUNetPlans") in message
    assert "nnUNetv2_train Dataset501_KiTS21 3d_fullres FOLD -tr nnUNetTrainerRep3DVanilla -p nnUNetPlans" in message


def test_error_untrained_trainer_lists_model_folders(kits):
    with pytest.raises(FileNotFoundError, match=r"no model folder .*nnUNetTrainerUXNet__nnUNetPlans__3d_fullres.*"
                                                r"nnUNetTrainerRep3D__nnUNetPlans__3d_fullres.*nnUNetv2_train"):
        results_table("501", ["nnUNetTrainerUXNet"])
    with pytest.raises(FileNotFoundError, match=r"not been trained with plans Rep3DPlans and configuration 2d"):
        results_table("501", ["nnUNetTrainerRep3D"], plans="Rep3DPlans", configuration="2d")


def test_error_unknown_dataset_lists_datasets(kits):
    with pytest.raises(FileNotFoundError, match=r"no trained models for dataset 999 .*Dataset501_KiTS21"):
        results_table("999", ["nnUNetTrainerRep3D"])


def test_error_summary_count_and_missing_file(tmp_path, kits):
    with pytest.raises(ValueError, match=r"--summary got 1 path\(s\) for 2 trainer\(s\)"):
        results_table("501", ["nnUNetTrainerRep3D", "nnUNetTrainer"], summaries=[tmp_path / "a.json"])
    with pytest.raises(FileNotFoundError, match=r"no summary file .*nnUNetv2_evaluate_folder"):
        results_table("501", ["nnUNetTrainerRep3D"], summaries=[tmp_path / "missing" / "summary.json"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"foreground_mean": {}}))
    with pytest.raises(ValueError, match="not an nnU-Net summary.json"):
        results_table("501", ["nnUNetTrainerRep3D"], summaries=[bad])


# ------------------------------------------------------------------------------------------- the paper's numbers

# Each table's average column as printed in the paper, row by row (transcribed again here, independently of the JSON).
PRINTED_MEANS = {
    "table1_kits": [0.645, 0.683, 0.689, 0.706, 0.669, 0.648, 0.664, 0.680, 0.697, 0.710, 0.727, 0.736],
    "table1_pancreas": [0.648, 0.677, 0.682, 0.703, 0.679, 0.667, 0.686, 0.708, 0.676, 0.690, 0.715, 0.723],
    "table1_hepatic": [0.589, 0.638, 0.627, 0.660, 0.613, 0.590, 0.613, 0.635, 0.652, 0.640, 0.658, 0.674],
    "table2_amos_ct": [0.850, 0.887, 0.783, 0.740, 0.785, 0.871, 0.890, 0.891, 0.891, 0.892, 0.902, 0.910],
    "table2_amos_mri": [0.805, 0.847, 0.816, 0.794, 0.808, 0.836, 0.841, 0.840, 0.843, 0.847, 0.855, 0.864],
    "table3": [0.905, 0.906, 0.903, 0.910, 0.890, 0.897],
    "table4": [0.881, 0.885, 0.890, 0.891, 0.893, 0.894, 0.895, 0.893, 0.893, 0.891],
    "table8": [0.849, 0.852, 0.856, 0.859, 0.854, 0.855, 0.859, 0.861, 0.862, 0.860,
               0.872, 0.869, 0.867, 0.870, 0.865, 0.887, 0.886, 0.887, 0.889, 0.886],
    "table9": [0.904, 0.910, 0.899],
}


def test_paper_json_structure():
    doc = load_paper_results()
    tables = load_paper_tables()
    assert list(tables) == ["table1_kits", "table1_pancreas", "table1_hepatic", "table2_amos_ct", "table2_amos_mri",
                            "table3", "table4", "table7", "table8", "table9", "table10"]
    for table in tables.values():
        names = [c.name for c in table.columns]
        assert len(set(names)) == len(names), table.id
        assert table.caption.startswith(table.paper_table + "."), table.id
        assert table.dataset is None or table.dataset in doc["benchmarks"], table.id
        assert table.mean_column is None or table.mean_column in names, table.id
        assert len({r.method for r in table.rows}) == len(table.rows), table.id
        for column in table.columns:
            assert column.kind in ("class", "mean", "dice", "hours", "info"), (table.id, column)
            assert (column.class_name is not None) == (column.kind == "class"), (table.id, column)
            assert column.dataset is None or column.dataset in doc["benchmarks"]
        for row in table.rows:
            assert len(row.values) == len(table.columns), (table.id, row.method)
            assert set(row.significant) <= set(names)
            assert all(t.startswith("nnUNetTrainer") for t in row.trainers)
            for value, column in zip(row.values, table.columns):
                if column.kind in ("class", "mean", "dice") and value is not None:
                    assert 0 < value < 1 and round(value, 3) == value, (table.id, row.method, column.name)


@pytest.mark.parametrize("table_id", sorted(PRINTED_MEANS))
def test_paper_means_are_the_printed_ones(table_id):
    table = paper_table(table_id)
    assert [table.value(r, table.mean_column) for r in table.rows] == PRINTED_MEANS[table_id]


def test_paper_rows_spot_checks():
    tables = load_paper_tables()
    for table_id in ("table2_amos_ct", "table2_amos_mri", "table3", "table9"):
        assert [c.class_name for c in tables[table_id].class_columns] == AMOS_CLASSES
    assert [c.name for c in tables["table2_amos_ct"].columns] == AMOS_HEADERS + ["Avg"]
    assert [c.name for c in tables["table1_kits"].columns] == ["#Params", "FLOPs", "Kidney", "Tumor", "Cyst", "Mean"]
    kits = tables["table1_kits"]
    rep3d = next(r for r in kits.rows if r.method == "Rep3D")
    assert rep3d.values == ("66.0M", "757.6G", 0.955, 0.763, 0.490, 0.736) and rep3d.significant == ("Mean",)
    assert next(r for r in tables["table1_hepatic"].rows if r.method == "Rep3D").values[2:] == (0.650, 0.697, 0.674)
    lrbm = next(r for r in tables["table2_amos_ct"].rows if r.method == "Rep3D (LRBM)")
    assert lrbm.values == (0.978, 0.970, 0.964, 0.928, 0.871, 0.984, 0.927, 0.960, 0.930, 0.851, 0.828, 0.784,
                           0.850, 0.920, 0.881, 0.910)
    for row in tables["table2_amos_mri"].rows:  # the paper prints '-': AMOS MRI has no bladder or prostate
        assert row.values[13:15] == (None, None)
    full = next(r for r in tables["table7"].rows if r.method == "Full LRBM")
    assert full.values == (17.5, 0.871, 0.885, 0.897, 0.910)
    assert [r.method for r in tables["table4"].rows][0] == "3×3×3"
    assert next(r for r in tables["table10"].rows if r.method == "Rep3D (Ours)").values == (
        0.910, 0.864, 0.736, 0.723, 0.674)


def test_trainer_mapping_is_data():
    tables = load_paper_tables()
    assert tables["table1_kits"].row_reproduced_by("nnUNetTrainerRep3DPaper", "nnUNetPlans").method == "Rep3D"
    assert tables["table3"].row_reproduced_by("nnUNetTrainerRep3DPaper_gk3", None).method == "Kernel=3 × 3 × 3"
    assert tables["table4"].row_reproduced_by("nnUNetTrainerRep3DPaper_UXNet_k15", None).method == "15×15×15"
    assert tables["table9"].row_reproduced_by("nnUNetTrainerRep3DPaper_depth1", None).method == "1 Layer"
    assert tables["table7"].row_reproduced_by("nnUNetTrainerRep3DVanilla", None).method == "Vanilla Rep"
    assert tables["table8"].row_reproduced_by("nnUNetTrainerRep3DCSLA", None).values[-1] == 0.889
    # plans decide between nnU-Net rows that share nnUNetTrainer
    assert tables["table10"].row_reproduced_by("nnUNetTrainer", "nnUNetResEncUNetLPlans").method == "ResEnc nnU-Net"
    assert tables["table10"].row_reproduced_by("nnUNetTrainer", "nnUNetPlans").method == "nnU-Net (1000 epochs)"
    assert tables["table2_amos_ct"].row_reproduced_by("nnUNetTrainerSomethingElse", None) is None


def test_every_trainer_named_in_the_paper_data_exists():
    from rep3d_nnunet.variants import trainer_names

    known = set(trainer_names()) | {"nnUNetTrainer"}  # nnU-Net's own default
    named = {t for table in load_paper_tables().values() for row in table.rows for t in row.trainers}
    assert named and named <= known, sorted(named - known)
