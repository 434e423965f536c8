"""Through the command line: `msdda align --task gaussian` with each exact trainer lands on the step optimum,
and `msdda diagnose` says so (kl_to_optimum_over_reference <= 0.05), agreeing with the oracle's closed form."""

import json

import pytest

from msdda.cli import entry


def _run(args):
    """The exit code of `msdda ARGS` (entry returns on success and exits with 2 on an error)."""
    try:
        entry(args)
    except SystemExit as exc:
        return exc.code
    return 0


def _closed_form_ratio(model_dir):
    return json.loads((model_dir / "config.json").read_text())["metadata"]["fit"]["kl_to_optimum_over_reference"]


@pytest.mark.parametrize("trainer", ["bt", "listwise", "step-rl"])
def test_align_then_diagnose_on_the_oracle(tmp_path, trainer):
    model = tmp_path / f"policy-{trainer}"
    assert _run(
        ["align", "--task", "gaussian", "--reward", "objective_1", "--trainer", trainer, "--out", str(model), "--quiet"]
    ) in (0, None)
    assert _closed_form_ratio(model) <= 0.05  # the closed-form KL ratio at the training grid's states
    out = tmp_path / "diagnose"
    assert _run(
        [
            "diagnose",
            "--task",
            "gaussian",
            "--model",
            f"objective_1={model}",
            "--draws",
            "2048",
            "--out",
            str(out),
            "--quiet",
        ]
    ) in (0, None)
    summary = json.loads((out / "diagnose.json").read_text())
    ratio = summary["models"]["objective_1"]["kl_to_optimum_over_reference"]
    assert ratio["median"] <= 0.05, ratio
    # the oracle's own aligned model (objective_2, untouched) is the optimum: diagnose finds it within 3 se
    exact = summary["models"]["objective_2"]["kl_to_optimum_over_reference"]
    assert exact["median"] <= 3 * exact["se"] + 1e-3, exact
