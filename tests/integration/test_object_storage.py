"""Results on object storage: a real S3-compatible server (moto in server mode), ``file://`` URIs,
and the Optuna study in an RDB given by ``--storage``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from sweeper import results
from sweeper.location import RemotePath, location

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _space(tmp_path: Path, trials: int) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(textwrap.dedent(f"""
        task: {ROOT / "tasks" / "digits_cnn.py"}
        trials: {trials}
        seed: 0
        max_concurrent: 2
        constraint: {{max_drop: 1.0}}
        hardware: {{num_cpus: 1}}
        measure: {{warmup_runs: 3, min_runs: 20, min_time_s: 0.05}}
        backends:
          onnxruntime_fp32: {{opset: {{low: 14, high: 18}}}}
          torch_dynamic_int8: {{engine: [x86, fbgemm]}}
          onnxruntime_dynamic_int8: {{per_channel: [true, false], weight_type: [int8, uint8]}}
    """))
    return path


def _sweeper(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sweeper.cli", *args], cwd=cwd, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on a free local port, with a bucket ``sweeps``; stopped by its process id."""
    pytest.importorskip("moto", reason="the test extra installs moto[server]")
    import boto3
    from ray_head import free_ports

    port = free_ports(1)[0]
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://{endpoint}/", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "moto_server did not start"
                time.sleep(0.5)
        boto3.client("s3", endpoint_url=f"http://{endpoint}", **{
            "aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1",
        }).create_bucket(Bucket="sweeps")
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_sweep_writes_its_rows_and_artifacts_to_s3(s3_endpoint: str, tmp_path: Path, monkeypatch) -> None:
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    query = f"endpoint_override={s3_endpoint}&scheme=http"
    out = f"s3://sweeps/results?{query}"
    study_uri = f"s3://sweeps/results/space?{query}"
    space = _space(tmp_path, trials=3)
    run = _sweeper("run", str(space), "--out", out, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr

    df = results.load(study_uri)
    assert len(df) == 3 and df["trial_number"].is_unique and set(df["state"]) == {"complete"}
    for uri in df["artifact_path"]:
        artifact = location(uri)
        assert isinstance(artifact, RemotePath) and artifact.is_file(), uri
    study = location(study_uri)
    assert (study / "study.json").is_file() and (study / "study.journal").is_file()

    # DuckDB reads the same rows through fsspec's S3 filesystem.
    duckdb = pytest.importorskip("duckdb")
    s3fs = pytest.importorskip("s3fs")
    con = duckdb.connect()
    con.register_filesystem(s3fs.S3FileSystem(key="testing", secret="testing",
                                              client_kwargs={"endpoint_url": f"http://{s3_endpoint}"}))
    count = con.execute("SELECT count(*) FROM read_parquet('s3://sweeps/results/space/trials/*.parquet')").fetchall()[0][0]
    assert count == 3

    # A fresh driver machine (no local journal) resumes from the bucket alone.
    fresh = _sweeper("run", str(space), "--out", out, "--resume", "--trials", "5", cwd=tmp_path,
                     env={"SWEEPER_CACHE_DIR": str(tmp_path / "fresh-cache")})
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    after = results.load(study_uri)
    assert len(after) == 5 and after["trial_number"].is_unique
    kept = after.set_index("trial_number").loc[df["trial_number"].tolist(), "finished_at"].tolist()
    assert kept == df["finished_at"].tolist(), "rows are never rewritten"

    shown = _sweeper("show", study_uri, cwd=tmp_path)
    assert shown.returncode == 0 and "5 rows" in shown.stdout, shown.stdout + shown.stderr


def test_file_uris_and_an_rdb_storage(tmp_path: Path) -> None:
    import optuna

    space = _space(tmp_path, trials=2)
    db = tmp_path / "studies.db"
    run = _sweeper("run", str(space), "--out", f"file://{tmp_path}/out", "--storage", f"sqlite:///{db}", cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    df = results.load(f"file://{tmp_path}/out/space")
    assert len(df) == 2 and Path(df["artifact_path"][0]).is_file()
    assert not (tmp_path / "out" / "space" / "study.journal").exists(), "the RDB holds the study"
    study = optuna.load_study(study_name="space", storage=f"sqlite:///{db}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
