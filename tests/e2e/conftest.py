"""Shared e2e fixtures: a real Prometheus server on a free loopback port, and PromQL helpers."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_BIN = shutil.which("prometheus")
# Grafana variables as Grafana substitutes them with "All" selected (allValue ".*").
SUBSTITUTIONS = {"$__rate_interval": "1m", "$__interval": "15s", "$run": ".*", "$layer": ".*"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(port: int, path: str, **params) -> dict:
    url = f"http://127.0.0.1:{port}{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    return body["data"]


def query(port: int, expr: str) -> list[dict]:
    return api(port, "/api/v1/query", query=expr)["result"]


def wait_for(predicate, *, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except (OSError, AssertionError) as exc:
            last = exc
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def dashboard_and_alert_exprs() -> list[tuple[str, str]]:
    out = []
    for name in ("plasticity", "system"):
        dash = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / f"{name}.json").read_text())
        for p in dash["panels"]:
            out += [(f"{name}: {p['title']} {t['refId']}", t["expr"]) for t in p.get("targets", [])]
        out += [(f"{name}: annotation {a['name']}", a["expr"]) for a in dash["annotations"]["list"] if "expr" in a]
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    out += [(f"alert {r['alert']}", r["expr"]) for g in rules["groups"] for r in g["rules"]]
    for i, (where, expr) in enumerate(out):
        for var, value in SUBSTITUTIONS.items():
            expr = expr.replace(var, value)
        out[i] = (where, expr)
    return out


@pytest.fixture
def prometheus(tmp_path):
    if PROMETHEUS_BIN is None:
        pytest.skip("prometheus binary not installed (apt-get install prometheus; .ci/run installs it)")
    sd_dir = tmp_path / "runs" / "prometheus_targets"
    sd_dir.mkdir(parents=True)
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(ROOT / "deploy" / "prometheus" / "alerts.yml")]
    (job,) = config["scrape_configs"]
    job["file_sd_configs"] = [{"files": [str(sd_dir / "*.json")], "refresh_interval": "1s"}]
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(tmp_path / "prometheus.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [PROMETHEUS_BIN, f"--config.file={config_path}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        def ready():
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as resp:
                return resp.status == 200
        wait_for(ready, timeout=60, what="prometheus /-/ready")
        yield port, sd_dir
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
