"""The Dagster UI over the miniature pipeline: GraphQL status, and a real headless browser."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from tests.pipeline_support import ALL_ASSETS as ASSETS
from tests.pipeline_support import BIN, free_port, tool_env

pytestmark = pytest.mark.timeout(1200)
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _default_sigint() -> None:
    # Started from a process that ignores SIGINT (a shell's background job),
    # the webserver would inherit that and also shrug off SIGTERM's shutdown.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="module")
def webserver(built, tmp_path_factory):
    """dagster-webserver on 127.0.0.1 over the built pipeline's instance and checkout."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("webserver") / "webserver.log"
    log = open(log_path, "w")
    env = tool_env(
        DAGSTER_HOME=str(built.dagster_home),
        DMM_REPO_ROOT=str(built.repo),
        MLFLOW_TRACKING_URI=built.tracking_uri,
    )
    proc = subprocess.Popen(
        [str(BIN / "dagster-webserver"), "-m", "pipelines.definitions",
         "-h", "127.0.0.1", "-p", str(port)],
        cwd=built.repo,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_default_sigint,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/server_info", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert proc.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, "webserver did not start in 120 s"
                time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def graphql(url: str, query: str, variables: dict | None = None) -> dict:
    request = urllib.request.Request(
        f"{url}/graphql",
        data=json.dumps({"query": query, "variables": variables or {}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        payload = json.loads(response.read())
    assert "errors" not in payload, payload["errors"]
    return payload["data"]


ASSET_STATUS = """
query {
  assetNodes {
    assetKey { path }
    isPartitioned
    partitionStats { numMaterialized numPartitions }
    assetMaterializations(limit: 1) { runId }
  }
}
"""

RUN_STATUS = """
query ($runId: ID!) {
  runOrError(runId: $runId) { ... on Run { status } }
}
"""


def test_webserver_reports_every_asset_materialized(webserver):
    nodes = graphql(webserver, ASSET_STATUS)["assetNodes"]
    by_key = {"/".join(n["assetKey"]["path"]): n for n in nodes}
    assert set(by_key) == ASSETS
    for key, node in by_key.items():
        assert node["assetMaterializations"], f"{key} was never materialized"
        if node["isPartitioned"]:
            stats = node["partitionStats"]
            assert stats["numPartitions"] == 5
            assert stats["numMaterialized"] == stats["numPartitions"], key


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="no chromium (make browser installs it)")
def test_materialize_an_asset_from_the_asset_graph_in_a_browser(webserver):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{webserver}/asset-groups", wait_until="networkidle")
            # A fresh instance greets its first visitor with a newsletter pop-up.
            skip = page.get_by_role("button", name="Skip")
            try:
                skip.wait_for(timeout=5000)
                skip.click()
            except Exception:  # playwright's TimeoutError: no pop-up on this visit
                pass
            expect(page.get_by_text("Global asset lineage")).to_be_visible()
            # Open the "data" group in the graph's sidebar and select one asset.
            page.get_by_text("data", exact=True).first.click()
            page.keyboard.press("ArrowRight")
            page.get_by_text("teacher_manifest", exact=True).first.click()
            page.get_by_role("button", name="Materialize selected").click()
            toast = page.get_by_text(re.compile(r"Launched run [0-9a-f]{8}"))
            toast.wait_for(timeout=60000)
            page.get_by_text("View", exact=True).first.click()
            page.wait_for_url(re.compile(r"/runs/[0-9a-f-]{36}"), timeout=30000)
            run_id = page.url.rsplit("/", 1)[-1].split("?")[0]
            expect(page.get_by_text("Success", exact=True).first).to_be_visible(timeout=180000)
        finally:
            browser.close()
    assert graphql(webserver, RUN_STATUS, {"runId": run_id})["runOrError"]["status"] == "SUCCESS"
