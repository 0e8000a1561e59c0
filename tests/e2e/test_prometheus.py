"""/metrics scraped by Debian's real Prometheus server, and checked by promtool."""

import json
import re
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request

import numpy as np
import pytest

from conftest import results_dir, wait_until
from helpers import make_inputs


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _query(port, expr):
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)["data"]["result"]


def test_prometheus_scrapes_the_request_counter(server, client, tmp_path):
    binary = shutil.which("prometheus")
    assert binary, "Debian's prometheus package is missing; run ./setup.sh"
    x = np.ones((1, 32, 2, 8), dtype=np.float32)
    client.infer("dilated_attention", make_inputs(x, x, x),
                 parameters={"segment_lengths": "16", "dilation_rates": "1"})
    port = _free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: dilattn\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{server.metrics_port}']\n")
    log = open(results_dir() / "prometheus.log", "w")
    proc = subprocess.Popen([binary, f"--config.file={config}",
                             f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        def scraped():
            try:
                result = _query(port, 'nv_inference_request_success{model="dilated_attention"}')
            except OSError:
                return False
            return bool(result) and float(result[0]["value"][1]) >= 1
        assert wait_until(scraped, timeout=60, interval=0.5), "Prometheus never saw the counter"
        up = _query(port, 'up{job="dilattn"}')
        assert up and up[0]["value"][1] == "1"
        assert _query(port, "dilattn_buffer_pool_bytes")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


# Triton's metric names predate Prometheus' naming rules (no _total suffix, _us units, _count on
# counters); they are kept for compatibility with Triton dashboards. promtool's lint names exactly
# these rules for exactly these metrics, and nothing else.
TRITON_NAMING_RULES = (
    'counter metrics should have "_total" suffix',
    "metric names should not contain abbreviated units",
    'non-histogram and non-summary metrics should not have "_count" suffix',
)


def test_promtool_check_metrics(server):
    text = server.metrics_text()
    ours = "".join(line + "\n" for line in text.splitlines()
                   if not re.match(r"(# (HELP|TYPE) )?nv_inference_", line))
    r = subprocess.run(["promtool", "check", "metrics"], input=ours, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                       text=True, timeout=60)
    for problem in (r.stdout + r.stderr).strip().splitlines():
        name, _, rule = problem.partition(" ")
        assert name.startswith("nv_inference_") and rule in TRITON_NAMING_RULES, problem
