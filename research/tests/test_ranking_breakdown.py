"""research.ranking_breakdown: the overall SRCC of a built-in evaluation split by photo and distortion family."""

import csv

import numpy as np
import pytest
from scipy.stats import spearmanr

from research.ranking_breakdown import main, parse_builtin_id, ranking_breakdown

REFS = ["chelsea", "hubble_deep_field", "page"]
FAMILIES = {"blur": 0.1, "noise": -0.1}  # the family's MOS offset
LEVELS = 5


def benchmark_rows():
    ids, mos, refs, families, levels = [], [], [], [], []
    for ref in REFS:
        for family, offset in FAMILIES.items():
            for level in range(1, LEVELS + 1):
                ids.append(f"images/{ref}_{family}_{level}.png")
                mos.append(5.4 - 0.8 * level + offset)
                refs.append(ref), families.append(family), levels.append(level)
    return ids, np.array(mos), np.array(refs), np.array(families), np.array(levels)


def test_ids_with_underscores_in_the_photo_name_parse():
    assert parse_builtin_id("images/hubble_deep_field_noise_3.png") == ("hubble_deep_field", "noise", 3)
    with pytest.raises(ValueError, match="not a built-in benchmark id"):
        parse_builtin_id("images/koniq_123.jpg")


def test_severity_ranked_right_but_families_and_photos_offset():
    """Every family's levels ordered right (within (reference, family) = 1), but noise placed 2 points
    below blur and each photo shifted: the within-reference and overall readings fall, in that order."""
    ids, mos, refs, families, levels = benchmark_rows()
    photo_offset = {ref: 0.7 * i for i, ref in enumerate(REFS)}
    pred = -0.1 * levels - 2.0 * (families == "noise") + np.array([photo_offset[r] for r in refs])
    result = ranking_breakdown(ids, mos, pred)
    assert result["srcc_within_reference_family"] == pytest.approx(1.0)
    assert result["per_family"]["noise"]["srcc_within_reference"] == pytest.approx(1.0)
    within_reference = np.mean([spearmanr(pred[refs == r], mos[refs == r]).statistic for r in REFS])
    assert result["srcc_within_reference"] == pytest.approx(within_reference) and within_reference < 0.9
    assert (
        result["srcc"] == pytest.approx(spearmanr(pred, mos).statistic) and result["srcc"] < within_reference
    )
    assert result["reference_offset_sd"] == pytest.approx(np.std(list(photo_offset.values())))
    assert result["per_family"]["blur"]["mean_mos"] == pytest.approx(3.0 + 0.1)
    assert result["per_family"]["noise"]["mean_prediction"] == pytest.approx(pred[families == "noise"].mean())


def test_main_reads_an_evaluation_csv(tmp_path, capsys):
    ids, mos, *_ = benchmark_rows()
    path = tmp_path / "eval_after_predictions.csv"
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["id", "mos", "pred_mean", "pred_expected"])
        writer.writerows(zip(ids, mos, mos, -mos, strict=True))
    assert main([str(path), "--column", "pred_mean"]) == 0
    assert "SRCC +1.000 | within reference +1.000" in capsys.readouterr().out
    assert main([str(path)]) == 0
    assert "SRCC -1.000" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no column 'pred_sharp'"):
        main([str(path), "--column", "pred_sharp"])
