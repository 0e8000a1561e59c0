"""/metrics scraped by Debian's real Prometheus server, and checked by promtool."""

import json
import pathlib
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest

from conftest import results_dir, wait_until
from helpers import engine_seconds, make_inputs


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _query(port, expr):
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)["data"]["result"]


DEPLOY = pathlib.Path(__file__).resolve().parents[2] / "deploy"


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    """Debian's real Prometheus scraping the server every second, evaluating the alert and
    recording rules of deploy/prometheus every second; yields its API port."""
    binary = shutil.which("prometheus")
    assert binary, "Debian's prometheus package is missing; run ./setup.sh"
    tmp = tmp_path_factory.mktemp("prometheus")
    port = _free_port()
    config = tmp / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n  - {DEPLOY / 'prometheus' / 'dilattn_rules.yml'}\n"
        "scrape_configs:\n  - job_name: dilattn\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{server.metrics_port}']\n")
    log = open(results_dir() / "prometheus.log", "w")
    proc = subprocess.Popen([binary, f"--config.file={config}",
                             f"--storage.tsdb.path={tmp / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _api(port, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/{path}", timeout=5) as r:
        return json.load(r)


def test_prometheus_scrapes_the_request_counter(server, client, prometheus):
    x = np.ones((1, 32, 2, 8), dtype=np.float32)
    client.infer("dilated_attention", make_inputs(x, x, x),
                 parameters={"segment_lengths": "16", "dilation_rates": "1"})

    def scraped():
        try:
            result = _query(prometheus, 'nv_inference_request_success{model="dilated_attention"}')
        except OSError:
            return False
        return bool(result) and float(result[0]["value"][1]) >= 1
    assert wait_until(scraped, timeout=60, interval=0.5), "Prometheus never saw the counter"
    up = _query(prometheus, 'up{job="dilattn"}')
    assert up and up[0]["value"][1] == "1"
    assert _query(prometheus, "dilattn_buffer_pool_bytes")


# Metric names a rule or panel refers to (not the recorded ones, which hold a colon).
METRIC_NAME = re.compile(r"(?<![:\w])(?:nv_inference|dilattn)_[a-z_]+\b(?!:)")


def _names_on_server(text):
    """Every series name the exposition holds (histograms with their _bucket, _sum, _count)."""
    return {line.split("{")[0].split()[0] for line in text.splitlines()
            if line and not line.startswith("#")}


def test_promtool_passes_the_deploy_rules():
    """The shipped configuration and rules are valid, and the rules' unit tests pass: each alert
    fires on the series that should raise it and stays quiet otherwise."""
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "dilattn_rules.yml"],
                 ["test", "rules", "dilattn_rules_test.yml"]):
        r = subprocess.run(["promtool", *args], cwd=DEPLOY / "prometheus", capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, f"promtool {' '.join(args)}:\n{r.stdout}{r.stderr}"


def test_deploy_rules_and_dashboard_run_against_the_server(server, client, prometheus):
    """Prometheus evaluates every shipped rule on the live server's metrics without error, every
    Grafana panel's query runs, and every metric they name is one the server exports."""
    x = np.ones((1, 32, 2, 8), dtype=np.float32)
    client.infer("dilated_attention", make_inputs(x, x, x),
                 parameters={"segment_lengths": "16", "dilation_rates": "1"})

    def evaluated():
        try:
            groups = _api(prometheus, "rules")["data"]["groups"]
        except OSError:
            return None
        rules = [r for g in groups for r in g["rules"]]
        if len(rules) < 11 or any(r["lastEvaluation"].startswith("0001") for r in rules):
            return None
        return rules
    assert wait_until(lambda: evaluated() is not None, timeout=60, interval=0.5), \
        "Prometheus never evaluated every rule"
    rules = evaluated()
    for rule in rules:
        assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"
    queries = [r["query"] for r in rules]
    dashboard = json.loads((DEPLOY / "grafana" / "dilattn.json").read_text())
    panel_queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert panel_queries
    for expr in panel_queries:
        concrete = expr.replace("$__rate_interval", "1m").replace("$model", ".*")
        result = _api(prometheus, "query?" + urllib.parse.urlencode({"query": concrete}))
        assert result["status"] == "success", f"{expr}: {result}"
    exported = _names_on_server(server.metrics_text())
    named = {m for q in queries + panel_queries for m in METRIC_NAME.findall(q)}
    assert named and named <= exported, f"not exported by the server: {sorted(named - exported)}"


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


def test_pool_events_help_names_every_event(server):
    """The help text of dilattn_buffer_pool_events_total lists every event label a scrape shows
    (it left out oversize)."""
    text = server.metrics_text()
    help_line = next(line for line in text.splitlines()
                     if line.startswith("# HELP dilattn_buffer_pool_events_total "))
    listed = set(re.findall(r"[a-z_]+", help_line.partition(":")[2]))
    events = set(re.findall(r'^dilattn_buffer_pool_events_total\{[^}]*event="([a-z_]+)"', text,
                            re.MULTILINE))
    assert "oversize" in events, text
    assert events <= listed, (help_line, events - listed)


def test_engine_seconds_split_each_threads_time_into_phases(server, client):
    """Each device's engine thread reports its time by phase; the phases add up to the time
    between two scrapes, an idle thread's time goes to idle, and a request's computation (the
    CPU path's, in Start) to start."""
    devices = {d for d, _ in engine_seconds(server)}
    assert devices and all(d == "cpu" or re.fullmatch(r"cuda:\d+", d) for d in devices), devices
    for d in devices:
        assert {p for dd, p in engine_seconds(server) if dd == d} == {
            "idle", "start", "wait", "complete", "gang", "release", "other"}
    t0, a = time.monotonic(), engine_seconds(server)
    time.sleep(1.0)
    t1, b = time.monotonic(), engine_seconds(server)
    for d in devices:
        grew = sum(b[(d, p)] - a[(d, p)] for dd, p in a if dd == d)
        # Each scrape reads the clock once, within the HTTP round trip of the time taken here.
        assert abs(grew - (t1 - t0)) < 0.1, (d, grew, t1 - t0)
        assert b[(d, "idle")] - a[(d, "idle")] > 0.8 * (t1 - t0), (d, a, b)
    x = np.random.default_rng(7).standard_normal((1, 2048, 4, 32)).astype(np.float32)
    before = engine_seconds(server)
    client.infer("dilated_attention", make_inputs(x, x, x),
                 parameters={"segment_lengths": "512", "dilation_rates": "1"})
    after = engine_seconds(server)
    worked = sum(after[(d, p)] - before[(d, p)] for d, p in before if p in ("start", "wait"))
    assert worked > 0, (before, after)


def _held_after_a_request(server):
    """Runs one request, then returns the bytes every pool holds once its leases are back."""
    c = server.client()
    x = np.ones((2, 256, 2, 16), dtype=np.float32)
    c.infer("dilated_attention", make_inputs(x, x, x),
            parameters={"segment_lengths": "64", "dilation_rates": "1"})
    assert wait_until(lambda: server.metric("dilattn_buffer_pool_leases") == 0, timeout=30)
    return server.metric("dilattn_buffer_pool_bytes", state="held")


def test_idle_pools_give_their_memory_back():
    """--pool-idle-release-seconds: once the engine is idle, buffers cached unused that long are
    freed (the pools held up to their caps for good after a burst), each counted as an
    idle_release event; 0 keeps them."""
    from conftest import ServerProcess
    s = ServerProcess("--pool-idle-release-seconds", "1", name="pool-idle-release")
    try:
        assert _held_after_a_request(s) > 0
        assert wait_until(lambda: s.metric("dilattn_buffer_pool_bytes", state="held") == 0,
                          timeout=30), s.metrics_text()
        assert s.metric("dilattn_buffer_pool_events_total", event="idle_release") >= 1
        assert s.metric("dilattn_buffer_pool_events_total", event="eviction") == 0
        # The pools still serve, and give back again.
        assert _held_after_a_request(s) > 0
        assert wait_until(lambda: s.metric("dilattn_buffer_pool_bytes", state="held") == 0,
                          timeout=30), s.metrics_text()
    finally:
        assert s.stop() == 0, s.log_path.read_text()

    kept = ServerProcess("--pool-idle-release-seconds", "0", name="pool-idle-release-off")
    try:
        held = _held_after_a_request(kept)
        assert held > 0
        time.sleep(3)
        assert kept.metric("dilattn_buffer_pool_bytes", state="held") == held
        assert kept.metric("dilattn_buffer_pool_events_total", event="idle_release") == 0
    finally:
        assert kept.stop() == 0, kept.log_path.read_text()
