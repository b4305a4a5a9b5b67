from __future__ import annotations

import base64
import json
import re
import struct
from pathlib import Path

import pytest
from synthetic_study import STATIC, make_study
from typer.testing import CliRunner

from sweeper import export, report
from sweeper.cli import app
from sweeper.params import Fixed
from sweeper.space import load_space

runner = CliRunner()
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (the file must start with the PNG signature)."""
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def embedded_images(page: str) -> dict[str, bytes]:
    """Map each <img>'s data-file name to the bytes of its data: URI."""
    found = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" data-file="([^"]+)"', page)
    return {name: base64.b64decode(data) for data, name in found}


def check_report(written: report.Report) -> str:
    """Every PNG beside the report is a valid image, embedded in the HTML and linked from the Markdown."""
    page = written.html.read_text()
    markdown = written.markdown.read_text()
    on_disk = {p.name: p.read_bytes() for p in written.html.parent.glob("*.png")}
    assert on_disk and set(on_disk) == {p.name for p in written.images.values()}
    assert embedded_images(page) == on_disk, "the HTML embeds exactly the PNGs written, byte for byte"
    for name, data in on_disk.items():
        width, height = png_size(data)
        assert width > 200 and height > 100, name
        assert f"]({name})" in markdown
    assert "src=\"http" not in page and "<script" not in page, "self-contained: nothing to fetch, nothing to run"
    return page


def test_report_renders_every_plot_and_table(tmp_path: Path) -> None:
    study = make_study(tmp_path)
    written = report.write_report(study)
    assert written.html == study / "report" / "report.html"
    assert set(written.images) == {"pareto", "speedup", "history", "importance", "sensitivity"}
    page = check_report(written)
    assert "Best feasible: trial 0, onnxruntime_static_int8" in page
    assert "&lt;boom&gt; &amp; friends" in page and "<boom>" not in page, "error text is escaped"
    assert "excluded_<wbr>in_<wbr>best" in page and "conv1" in page
    assert "torch_dynamic_int8: 3 complete trials" in page, "skipped importance scopes say why"
    md = written.markdown.read_text()
    assert md.startswith("# sweeper report: syn") and "| trial | backend |" in md


def test_report_without_journal_or_sensitivity_skips_cleanly(tmp_path: Path) -> None:
    study = make_study(tmp_path, sensitivity=False, journal=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "sensitivity.png").write_bytes(b"from an earlier run")
    written = report.write_report(study, out)
    assert set(written.images) == {"pareto", "speedup", "history"}
    assert not (out / "sensitivity.png").exists()
    page = check_report(written)
    assert f"looked for {study / 'sensitivity.parquet'}" in page and "no Optuna journal" in page
    assert f"sweeper sensitivity --task digits_cnn --backend BACKEND --out {study}" in page, "says how to add it"


def test_cli_report_and_its_input_errors(tmp_path: Path) -> None:
    study = make_study(tmp_path)
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (study / "report" / "report.html").is_file()
    missing = runner.invoke(app, ["report", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "does not exist" in missing.output and "Traceback" not in missing.output
    (tmp_path / "empty").mkdir()
    empty = runner.invoke(app, ["report", str(tmp_path / "empty")])
    assert empty.exit_code == 2 and "holds no study" in empty.output


def test_export_writes_artifact_config_space_and_loader(tmp_path: Path) -> None:
    study = make_study(tmp_path)
    written = export.export_trial(study, tmp_path / "best", best=True)
    assert written.trial_number == 0 and written.artifact.name == "model.onnx"
    assert written.artifact.read_bytes() == (study / "artifacts" / "trial-000000" / "model.onnx").read_bytes()
    config = json.loads(written.config.read_text())
    assert config["backend"] == STATIC and config["task"] == "digits_cnn"
    assert config["params"] == {"calibration_method": "minmax", "calibration_samples": 32,
                                "nodes_to_exclude": ["conv1"], "per_channel": True}
    assert config["metrics"]["accuracy"] == pytest.approx(97.7) and config["metrics"]["latency_ms_p50"] == 0.2
    assert config["eval_batch_size"] == 128 and config["num_threads"] == 1 and config["artifact"] == "model.onnx"
    space = load_space(written.space)
    assert space.trials == 1 and list(space.backends) == [STATIC]
    assert space.backends[STATIC]["nodes_to_exclude"] == Fixed(("conv1",))
    assert all(isinstance(p, Fixed) for p in space.backends[STATIC].values())
    compile(written.loader.read_text(), str(written.loader), "exec")
    assert "get_backend(config[\"backend\"])" in written.loader.read_text()


def test_export_of_a_moved_study_finds_its_artifact(tmp_path: Path) -> None:
    study = make_study(tmp_path / "before")
    moved = study.rename(tmp_path / "syn")
    written = export.export_trial(moved, tmp_path / "t8", trial=8)
    assert written.artifact.name == "state_dict.pt"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--trial", "10"], "trial 10 is failed"),
        (["--trial", "99"], "has no trial 99"),
        ([], "exactly one of --trial N or --best"),
        (["--trial", "1", "--best"], "exactly one of --trial N or --best"),
    ],
)
def test_cli_export_input_errors(tmp_path: Path, args: list[str], message: str) -> None:
    study = make_study(tmp_path)
    result = runner.invoke(app, ["export", str(study), "--to", str(tmp_path / "out"), *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not (tmp_path / "out").exists(), "nothing is written on bad input"


def test_cli_export_refuses_a_non_empty_target(tmp_path: Path) -> None:
    study = make_study(tmp_path)
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    result = runner.invoke(app, ["export", str(study), "--best", "--to", str(target)])
    assert result.exit_code == 2 and "not an empty folder" in " ".join(result.output.split())
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    ok = runner.invoke(app, ["export", str(study), "--best", "--to", str(tmp_path / "fresh")])
    assert ok.exit_code == 0, ok.output
    assert "Exported trial 0" in ok.output
