"""The CL P2P study benchmark runs (quick) and reports every figure it promises."""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from cl_p2p_study import VALUE_SETTINGS, study


@pytest.mark.slow
def test_the_quick_study_reports_every_figure():
    figures = study(quick=True)
    assert figures["cases"] >= 2
    for name in (
        "cycle_psnr_without_value_injection",
        "cycle_psnr_with_value_injection",
        "two_run_cycle_psnr_without_value_injection",
        "two_run_cycle_psnr_with_value_injection",
    ):
        assert math.isfinite(figures[name]) and 0 < figures[name] <= 100, name
    # in one batch the cycle comes back (exactly, see p2p_widgets.study); a second run does not
    assert figures["cycle_psnr_without_value_injection"] > figures["two_run_cycle_psnr_without_value_injection"] + 20
    for preset in ("literature", "optimised"):
        assert 0 <= figures["presets"][preset]["edit_success"] <= 1
        assert figures["presets"][preset]["background_psnr"] > 20
    table = figures["value_injection"]
    assert set(table) == {"none", *VALUE_SETTINGS}
    for name, row in table.items():
        assert 0 <= row["edit_success"] <= 1 and row["background_psnr"] > 20, name
    # on this model: values over the first half keep every swap, over all steps at beta 1 none
    assert table["first_half"]["edit_success"] == table["none"]["edit_success"] == 1
    assert table["all_steps"]["edit_success"] < table["first_half"]["edit_success"]
    # and what values buy: the rest of the image stays closer to the source
    assert table["first_half"]["background_psnr"] > table["none"]["background_psnr"]
