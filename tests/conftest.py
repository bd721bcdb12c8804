"""Fixtures shared by several test modules: a local S3-compatible server (moto) and a fresh bucket on it,
Orbax runs of every layout ckpt reads, and the ckpt.progress logger put back after each test."""
from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests import procs


@pytest.fixture(scope="session")
def orbax_runs(tmp_path_factory) -> Path:
    """Every layout, written once by Orbax in one subprocess (with 2 CPU devices: a sharded array); see
    tests/orbax_writer.py."""
    directory = tmp_path_factory.mktemp("orbax_runs")
    result = procs.run_script(procs.REPO / "tests" / "orbax_writer.py", str(directory), timeout=600,
                              XLA_FLAGS="--xla_force_host_platform_device_count=2")
    assert result.returncode == 0, result.stderr[-3000:]
    return directory


@pytest.fixture(scope="session")
def s3_server():
    """The endpoint of a moto S3 server on 127.0.0.1, stopped at the end of the session; skips without moto."""
    pytest.importorskip("moto", reason="needs moto (the dev extra) for a local S3 server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the local S3 server did not start")
                time.sleep(0.1)
        yield endpoint
    finally:
        procs.stop(server)


@pytest.fixture
def bucket(s3_server, monkeypatch, request):
    """``s3://<a new bucket>/runs/exp``, with the AWS_* environment pointing at the local server."""
    env = {"AWS_ENDPOINT_URL": s3_server, "AWS_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    name = f"b{abs(hash(request.node.nodeid)) % 10**8}"
    urllib.request.urlopen(urllib.request.Request(f"{s3_server}/{name}", method="PUT"))
    return f"s3://{name}/runs/exp"


@pytest.fixture
def s3_user(bucket, s3_server):
    """``make(deny)``: the AWS_* environment (a dict) of a new user of the local server who may do anything in
    S3 but the actions ``deny`` (IAM's names, such as ``s3:DeleteObject``, each with the resource it is
    denied on). From the first call until the test ends, the server checks every request's credentials."""
    boto3 = pytest.importorskip("boto3")
    keys = {"endpoint_url": s3_server, "region_name": "us-east-1", "aws_access_key_id": "test",
            "aws_secret_access_key": "test"}
    iam = boto3.client("iam", **keys)

    def make(deny: dict[str, str]) -> dict[str, str]:
        name = f"u{len(iam.list_users()['Users'])}"
        iam.create_user(UserName=name)
        statements = [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}] + [
            {"Effect": "Deny", "Action": action, "Resource": resource} for action, resource in deny.items()]
        iam.put_user_policy(UserName=name, PolicyName="p", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": statements}))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        _reset_auth(s3_server, "0")
        return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}

    try:
        yield make
    finally:
        _reset_auth(s3_server, "inf")


def _reset_auth(endpoint: str, count: str) -> None:
    """Makes the moto server check the credentials of every request after ``count`` more ("inf": none)."""
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=count.encode(), method="POST",
                                                  headers={"Content-Type": "text/plain"}))


@pytest.fixture(autouse=True)
def restore_progress_logger():
    """cli.main() and progress.enable() change the ckpt.progress logger; each test gets it back as it was."""
    logger = logging.getLogger("ckpt.progress")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved
