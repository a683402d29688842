"""Frontends on one host, the broker on another (issue 13), on one machine: two Linux network
namespaces joined by a veth pair, so the ZeroMQ traffic (CURVE over tcp://) really crosses a
network interface. The test reaches the frontends through their unix socket (paths are not
namespaced); they reach the broker only through the veth link."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import pytest

from broker.supervisor import terminate
from tests.conftest import ROOT, wait_for

SUBNET = "10.231.{}.{}"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture()
def two_hosts() -> Iterator[dict[str, str]]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2's ip (CI runs as root)")
    tag = secrets.token_hex(3)
    hosts = {"a": f"tfb-a-{tag}", "b": f"tfb-b-{tag}", "link_a": f"tfa{tag}", "link_b": f"tfb{tag}"}
    octet = str(int(tag, 16) % 200 + 20)
    hosts["ip_a"], hosts["ip_b"] = SUBNET.format(octet, 1), SUBNET.format(octet, 2)
    try:
        ip("netns", "add", hosts["a"])
        ip("netns", "add", hosts["b"])
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot make network namespaces here: {exc.stderr.decode(errors='replace').strip()}")
    try:
        ip("link", "add", hosts["link_a"], "netns", hosts["a"], "type", "veth", "peer", "name", hosts["link_b"],
           "netns", hosts["b"])
        for side in ("a", "b"):
            ip("-n", hosts[side], "addr", "add", f"{hosts['ip_' + side]}/24", "dev", hosts["link_" + side])
            ip("-n", hosts[side], "link", "set", hosts["link_" + side], "up")
            ip("-n", hosts[side], "link", "set", "lo", "up")
        yield hosts
    finally:
        for side in ("a", "b"):
            subprocess.run(["ip", "netns", "del", hosts[side]], capture_output=True, timeout=30)


def in_host(host: str, argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(["ip", "netns", "exec", host, *argv], cwd=ROOT, env={**os.environ, **env},
                                stdout=out, stderr=subprocess.STDOUT)


def link_bytes(host: str, link: str) -> int:
    out = subprocess.run(["ip", "netns", "exec", host, "cat", f"/sys/class/net/{link}/statistics/tx_bytes"],
                         capture_output=True, text=True, timeout=10, check=True)
    return int(out.stdout)


def test_frontends_on_host_a_serve_through_a_broker_on_host_b(two_hosts: dict[str, str], test_models: Path,
                                                              tmp_path: Path) -> None:
    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    allowed.mkdir()
    for name in ("broker", "frontend"):
        subprocess.run([sys.executable, "-m", "broker.ctl", "keygen", str(keys), name], cwd=ROOT, check=True,
                       capture_output=True, timeout=60)
    (allowed / "frontend.key").write_bytes((keys / "frontend.key").read_bytes())
    address = f"tcp://{two_hosts['ip_b']}:5555"
    run_dir = Path(tempfile.mkdtemp(prefix="tfb-mh-"))
    log = tmp_path / "hosts.log"
    broker_argv = [sys.executable, "-m", "broker", "--model_name=mlp", f"--model_base_path={test_models / 'mlp'}",
                   "--frontends=0", f"--runtime_dir={run_dir / 'b'}", f"--frontend_address={address}",
                   f"--curve_secret_key_file={keys / 'broker.key_secret'}", f"--curve_client_keys_dir={allowed}"]
    broker = in_host(two_hosts["b"], broker_argv, log, {})
    socket_path = str(run_dir / "http.sock")
    grpc_path = str(run_dir / "grpc.sock")
    frontends = in_host(two_hosts["a"], [sys.executable, "-m", "gunicorn", "-c", "ops/gunicorn.conf.py",
                                         "frontend.app:app"], log,
                        {"TFBROKER_ADDRESS": address, "TFBROKER_BIND": f"unix:{socket_path}",
                         "TFBROKER_FRONTENDS": "1",
                         # TF Serving's gRPC API too, on a unix socket the test reaches from outside host A.
                         "TFBROKER_FRONTEND": f"--port=0 --grpc_socket_path={grpc_path}",
                         "TFBROKER_CURVE_SECRET_KEY_FILE": str(keys / "frontend.key_secret"),
                         "TFBROKER_CURVE_SERVER_KEY_FILE": str(keys / "broker.key")})
    http = httpx.Client(transport=httpx.HTTPTransport(uds=socket_path), base_url="http://host-a", timeout=60)
    x = np.random.default_rng(8).standard_normal((4, 8)).astype(np.float32).tolist()

    def predict() -> httpx.Response:
        return http.post("/v1/models/mlp:predict", json={"instances": x})

    def serving() -> Any:
        assert frontends.poll() is None, log.read_text()[-3000:]
        if not os.path.exists(socket_path):
            return False
        response = predict()
        return response if response.status_code == 200 else False

    try:
        first = wait_for(serving, 120, "host A's frontend to answer through host B's broker")
        expected = first.json()
        sent_before = link_bytes(two_hosts["a"], two_hosts["link_a"])
        for _ in range(20):
            assert predict().json() == expected
        # 20 requests of 4 x 8 floats in JSON become ZeroMQ frames on the wire (CURVE-encrypted).
        assert link_bytes(two_hosts["a"], two_hosts["link_a"]) - sent_before > 20 * 4 * 8 * 4
        # TF Serving's gRPC client, through host A's frontend and CURVE to host B: the same answer.
        calls = [{"rpc": "Predict", "request": {"model_spec": {"name": "mlp"}},
                  "inputs": {"x": {"values": x, "dtype": "float32", "content": content}}} for content in (True, False)]
        answers = subprocess.run([sys.executable, str(ROOT / "tests" / "system" / "tfs_client.py"), f"unix:{grpc_path}"],
                                 input=json.dumps(calls), capture_output=True, text=True, timeout=180)
        assert answers.returncode == 0, answers.stderr[-3000:]
        for answer in json.loads(answers.stdout):
            assert answer["code"] == "OK", answer
            np.testing.assert_allclose(answer["outputs"]["y"]["values"], expected["predictions"], rtol=1e-6)

        # The broker on host B restarts: host A's frontend answers 503 meanwhile, then serves again.
        assert terminate(broker, grace_s=30) == 0
        started = time.monotonic()
        gap = predict()
        assert gap.status_code == 503 and time.monotonic() - started < 5, gap.text
        broker = in_host(two_hosts["b"], broker_argv, log, {})
        assert wait_for(serving, 120, "the frontend to serve through the restarted broker").json() == expected

        # The link goes down: 503 within the deadline (the frontend gives up on a silent broker
        # after its heartbeat liveness, 10 s), never a hang; then the link comes back.
        ip("-n", two_hosts["a"], "link", "set", two_hosts["link_a"], "down")
        started = time.monotonic()
        cut = predict()
        waited = time.monotonic() - started
        assert cut.status_code == 503 and waited < 15, (cut.status_code, cut.text, waited)
        ip("-n", two_hosts["a"], "link", "set", two_hosts["link_a"], "up")
        assert wait_for(serving, 60, "the frontend to serve once the link is back").json() == expected
        assert frontends.poll() is None
    finally:
        http.close()
        terminate(frontends, grace_s=20)
        terminate(broker, grace_s=30)
        shutil.rmtree(run_dir, ignore_errors=True)
