"""Start-up as TF Serving's: the REST and gRPC ports open only once the models loading at
start-up are AVAILABLE, so a probe or a client that connects at once never sees a half-loaded
server."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from tests.conftest import BrokerProcess, make_model_config, wait_for


def connect(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def test_the_ports_open_once_every_model_is_available(test_models: Path, tmp_path: Path) -> None:
    (tmp_path / "models.config").write_text(make_model_config({"slow": test_models / "slow",
                                                               "linear": test_models / "linear"}))
    # Warm-up at eight batch sizes of the slow model (~0.3 s a call): a few seconds of loading.
    (tmp_path / "batching.config").write_text("max_batch_size { value: 128 }\n" + "".join(
        f"allowed_batch_sizes: {size}\n" for size in (1, 2, 4, 8, 16, 32, 64, 128)))
    broker = BrokerProcess(tmp_path, [f"--model_config_file={tmp_path / 'models.config'}",
                                      f"--batching_parameters_file={tmp_path / 'batching.config'}"], frontends=1)
    try:
        wait_for(lambda: "tfbroker: worker:slow:1" in broker.roles(), 60, "the slow model's worker")
        refused = 0
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not connect(broker.port):
            refused += 1
            assert not connect(broker.grpc_port), "the gRPC port opened before the REST port"
            time.sleep(0.1)
        assert refused > 5, "the port was open while the slow model was still loading"
        for name in ("slow", "linear"):  # the first answers already see both models AVAILABLE
            status = broker.http.get(f"/v1/models/{name}").json()["model_version_status"]
            assert [v["state"] for v in status] == ["AVAILABLE"], status
        wait_for(lambda: connect(broker.grpc_port), 30, "the gRPC port")
        assert "tfbroker: ready" in broker.log()
    finally:
        broker.stop()
