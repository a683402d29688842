"""TF Serving's flags that change how versions load and batch: each with TF Serving's meaning."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, BrokerProcess, debian_binary, free_port, make_model_config, serving, stop_and_check

# Every flag of tensorflow_model_server (tensorflow_serving/model_servers/main.cc, master).
TF_SERVING_FLAGS = (
    "allow_version_labels_for_unavailable_models batching_parameters_file enable_batching "
    "enable_grpc_healthcheck_service enable_model_warmup enable_per_model_batching_parameters enable_profiler "
    "enable_serialization_as_tensor_content enable_signature_method_name_check file_system_poll_wait_seconds "
    "flush_filesystem_caches grpc_channel_arguments grpc_max_threads grpc_socket_path load_retry_interval_micros "
    "max_num_load_retries mixed_precision model_base_path model_config_file model_config_file_poll_wait_seconds "
    "model_name monitoring_config_file num_load_threads num_request_iterations_for_warmup "
    "num_tflite_interpreters_per_pool num_tflite_pools num_unload_threads per_process_gpu_memory_fraction "
    "platform_config_file port prefer_tflite_model remove_unused_fields_from_bundle_metagraph "
    "rest_api_enable_cors_support rest_api_num_threads rest_api_port rest_api_timeout_in_ms saved_model_tags "
    "skip_initialize_tpu ssl_config_file tensorflow_inter_op_parallelism tensorflow_intra_op_parallelism "
    "tensorflow_session_config_file tensorflow_session_parallelism thread_pool_factory_config_file "
    "use_alts_credentials version xla_cpu_compilation_enabled xla_gpu_compilation_enabled").split()


def test_version_flag_prints_and_exits() -> None:
    result = subprocess.run([sys.executable, "-m", "broker", "--version"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("tfbroker "), result


def test_saved_model_tags_choose_the_metagraph(test_models: Path, tmp_path: Path) -> None:
    with serving(tmp_path, {"tagged": test_models / "tagged"}, ["--saved_model_tags=serve,gpu"]) as broker:
        assert broker.predict("tagged", {"instances": [2.0]}).json() == {"predictions": [3.0]}


def test_per_version_batching_warmup_off_and_load_retries(test_models: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(test_models / "batch_reporter", models / "batch_reporter")
    shutil.copytree(test_models / "linear" / "1", models / "bad_batching" / "1")
    # batch_reporter/1 batches at most 4 rows, padded to 4; bad_batching/1's file does not parse.
    (models / "batch_reporter" / "1" / "batching_params.pbtxt").write_text(
        "max_batch_size { value: 4 }\nbatch_timeout_micros { value: 50000 }\nallowed_batch_sizes: 4\n")
    (models / "bad_batching" / "1" / "batching_params.pbtxt").write_text("max_batch_size { value: oops }\n")
    served = {"batch_reporter": models / "batch_reporter", "bad_batching": models / "bad_batching",
              "warm_bad": test_models / "warm_bad", "broken": test_models / "broken"}
    (tmp_path / "models.config").write_text(make_model_config(served))
    broker = BrokerProcess(tmp_path / "run", [
        f"--model_config_file={tmp_path / 'models.config'}", "--enable_per_model_batching_parameters=true",
        "--enable_model_warmup=false", "--max_num_load_retries=2", "--load_retry_interval_micros=200000"],
        frontends=1)
    try:
        broker.wait_available(["batch_reporter", "warm_bad"])
        rows: list[float] = []

        def call() -> None:
            with httpx.Client(base_url=broker.base_url, timeout=30) as client:
                answer = client.post("/v1/models/batch_reporter:predict", json={"instances": [0.0]})
                rows.extend(answer.json()["predictions"])

        threads = [threading.Thread(target=call) for _ in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert len(rows) == 12 and set(rows) == {4.0}, rows  # every batch ran padded to 4 rows

        # bad_batching/1 failed to load (its batching file); warm_bad loaded without its warm-up.
        [status] = broker.http.get("/v1/models/bad_batching").json()["model_version_status"]
        assert status["state"] == "END" and "batching_params.pbtxt cannot be used" in status["status"]["error_message"]
        assert broker.predict("warm_bad", {"instances": [1.0]}).status_code == 200

        # broken/1 was tried three times (two retries) before it ended.
        assert "retry 2 of 2" in broker.log() and "retry 3" not in broker.log()
        [state] = broker.http.get("/v1/models/broken").json()["model_version_status"]
        assert state["state"] == "END" and state["status"]["error_code"] != "OK", state
    finally:
        broker.stop()


def make_tls(directory: Path) -> dict[str, bytes]:
    """A CA, a server certificate for localhost and a client certificate, made with openssl."""
    openssl = debian_binary("openssl", "openssl")
    directory.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=directory, check=True, capture_output=True, timeout=60)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=tfbroker test CA")
    (directory / "san.txt").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "1", "-extfile", "san.txt")
    return {name: (directory / name).read_bytes() for name in ("ca.pem", "server.key", "server.pem", "client.key",
                                                               "client.pem")}


def test_every_flag_of_tf_serving_main_starts_the_broker(test_models: Path, tmp_path: Path) -> None:
    """Every flag of tensorflow_model_server's main.cc (but --version, and --model_name with
    --model_base_path, which TF Serving refuses beside --model_config_file too), each with a
    value TF Serving takes; the gRPC port then takes TLS with a client certificate only."""
    import grpc

    from frontend import grpc_messages as pb

    tls = make_tls(tmp_path / "tls")
    ssl_config = tmp_path / "ssl.config"
    ssl_config.write_text(f"server_key: {json.dumps(tls['server.key'].decode())}\n"
                          f"server_cert: {json.dumps(tls['server.pem'].decode())}\n"
                          f"custom_ca: {json.dumps(tls['ca.pem'].decode())}\nclient_verify: true\n")
    (tmp_path / "batching.config").write_text("max_batch_size { value: 8 }\nbatch_timeout_micros { value: 1000 }\n")
    (tmp_path / "monitoring.config").write_text("prometheus_config { enable: true }\n")
    (tmp_path / "models.config").write_text(make_model_config({"linear": test_models / "linear"}))
    grpc_port = free_port()
    flags = {
        "port": grpc_port, "grpc_socket_path": tmp_path / "grpc.sock", "grpc_channel_arguments": "",
        "grpc_max_threads": 0, "enable_grpc_healthcheck_service": "true", "enable_serialization_as_tensor_content":
        "false", "ssl_config_file": ssl_config, "use_alts_credentials": "false", "rest_api_num_threads": 4,
        "rest_api_timeout_in_ms": 30000, "rest_api_enable_cors_support": "true", "enable_batching": "true",
        "batching_parameters_file": tmp_path / "batching.config", "enable_per_model_batching_parameters": "false",
        "allow_version_labels_for_unavailable_models": "false", "model_config_file": tmp_path / "models.config",
        "model_config_file_poll_wait_seconds": 0, "file_system_poll_wait_seconds": 1,
        "monitoring_config_file": tmp_path / "monitoring.config", "max_num_load_retries": 0,
        "load_retry_interval_micros": 60000000, "num_load_threads": 2, "num_unload_threads": 2,
        "flush_filesystem_caches": "true", "tensorflow_session_parallelism": 0, "tensorflow_intra_op_parallelism": 1,
        "tensorflow_inter_op_parallelism": 1, "tensorflow_session_config_file": "", "platform_config_file": "",
        "per_process_gpu_memory_fraction": 0.5, "saved_model_tags": "serve", "enable_model_warmup": "true",
        "num_request_iterations_for_warmup": 1, "prefer_tflite_model": "false", "num_tflite_pools": 2,
        "num_tflite_interpreters_per_pool": 1, "remove_unused_fields_from_bundle_metagraph": "true",
        "enable_signature_method_name_check": "true", "xla_cpu_compilation_enabled": "false",
        "xla_gpu_compilation_enabled": "false", "enable_profiler": "true", "thread_pool_factory_config_file": "",
        "mixed_precision": "", "skip_initialize_tpu": "true"}
    main_cc = {"version", "model_name", "model_base_path", "rest_api_port"}  # rest_api_port: BrokerProcess's
    assert set(flags) | main_cc == set(TF_SERVING_FLAGS), sorted(set(TF_SERVING_FLAGS) ^ (set(flags) | main_cc))
    broker = BrokerProcess(tmp_path / "run", [f"--{name}={value}" for name, value in flags.items()], frontends=1)
    try:
        broker.wait_available(["linear"])
        assert broker.predict("linear", {"instances": [2.0]}).json() == {"predictions": [4.0]}
        request = pb.PredictRequest()
        request.model_spec.name = "linear"
        request.inputs["x"].dtype = pb.DATA_TYPES["DT_FLOAT"]
        request.inputs["x"].tensor_shape.dim.add(size=1)
        request.inputs["x"].float_val.append(2.0)
        method = "/tensorflow.serving.PredictionService/Predict"
        with_client = grpc.ssl_channel_credentials(tls["ca.pem"], tls["client.key"], tls["client.pem"])
        with grpc.secure_channel(f"localhost:{grpc_port}", with_client) as channel:
            call = channel.unary_unary(method, request_serializer=lambda m: m.SerializeToString(),
                                       response_deserializer=pb.PredictResponse.FromString)
            assert list(call(request, timeout=30).outputs["y"].float_val) == [4.0]
        without = grpc.ssl_channel_credentials(tls["ca.pem"])  # TLS, but no client certificate
        with grpc.secure_channel(f"localhost:{grpc_port}", without) as channel:
            call = channel.unary_unary(method, request_serializer=lambda m: m.SerializeToString(),
                                       response_deserializer=pb.PredictResponse.FromString)
            with pytest.raises(grpc.RpcError) as refused:
                call(request, timeout=30)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:  # no TLS at all
            call = channel.unary_unary(method, request_serializer=lambda m: m.SerializeToString(),
                                       response_deserializer=pb.PredictResponse.FromString)
            with pytest.raises(grpc.RpcError):
                call(request, timeout=10)
    finally:
        stop_and_check(broker)


@pytest.mark.parametrize(("flag", "reason"), [
    ("--platform_config_file=/etc/platform.config", "serves the TensorFlow platform only"),
    ("--tensorflow_session_config_file=/etc/session.config", "--per_process_gpu_memory_fraction"),
    ("--thread_pool_factory_config_file=/etc/pools.config", "TensorFlow's own thread pools"),
    ("--mixed_precision=fp16", "bfloat16"),
    ("--per_process_gpu_memory_fraction=1.5", "0 to 1"),
    ("--ssl_config_file=/nowhere/ssl.config", "ssl_config_file /nowhere/ssl.config"),
    ("--use_alts_credentials=true --ssl_config_file=/x", "Either use_alts_credentials must be false"),
])
def test_flags_with_no_meaning_here_are_refused_with_the_reason(flag: str, reason: str) -> None:
    result = subprocess.run([sys.executable, "-m", "broker", "--model_name=m", "--model_base_path=/nowhere",
                             *flag.split()], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result
    assert reason in result.stderr and "unrecognized arguments" not in result.stderr, result.stderr
