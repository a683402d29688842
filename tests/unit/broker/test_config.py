"""Flags and TF Serving's text-protobuf files into our dataclasses."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from broker.config import BatchingParameters, ServerConfig
from broker.config_files import load_batching_parameters, load_model_config, parse_batching_parameters, parse_model_config
from tfbroker.runtime import flags
from tfbroker.runtime.flags import add_dataclass_flags, dataclass_from_args, dataclass_to_argv
from tfbroker.runtime.settings import TensorFlowOptions, WorkerConfig
from tfbroker.wire.errors import ConfigError


def parse(argv: list[str]) -> ServerConfig:
    parser = argparse.ArgumentParser()
    add_dataclass_flags(parser, ServerConfig)
    return dataclass_from_args(ServerConfig, parser.parse_args(argv))


def test_tf_serving_style_flags() -> None:
    config = parse(["--model_name=m", "--model_base_path=/models/m", "--rest_api_port=9000",
                    "--enable_batching=false", "--frontends", "4"])
    assert (config.model_name, config.model_base_path, config.rest_api_port) == ("m", "/models/m", 9000)
    assert config.enable_batching is False
    assert config.frontends == 4
    assert parse(["--enable_batching"]).enable_batching is True


@pytest.mark.parametrize(("argv", "message"), [
    (["--model_name=m"], "go together"),
    (["--model_config_file=x", "--model_name=m", "--model_base_path=p"], "either"),
    (["--frontends=-1"], "frontends"),
])
def test_inconsistent_flags_are_refused(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse(argv)


def test_worker_config_survives_the_command_line() -> None:
    config = WorkerConfig(model_name="m", version=3, path="/p/3", backend_address="ipc:///x",
                          warmup_batch_sizes=(1, 8),
                          tensorflow=TensorFlowOptions(tensorflow_session_parallelism=2, prefer_tflite_model=True,
                                                       mixed_precision="bfloat16", saved_model_tags="serve,gpu"))
    parser = argparse.ArgumentParser()
    add_dataclass_flags(parser, WorkerConfig)
    assert dataclass_from_args(WorkerConfig, parser.parse_args(dataclass_to_argv(config))) == config


def test_tensorflow_flags_are_one_group_from_broker_to_worker() -> None:
    """TensorFlowOptions is declared once: the broker's flags reach a worker as they are, and the
    worker resolves --tensorflow_session_parallelism as TF Serving does."""
    server = parse(["--tensorflow_session_parallelism=3", "--tensorflow_intra_op_parallelism=1",
                    "--use_tflite_model", "--num_request_iterations_for_warmup=2"])
    worker = flags.parse_flags(WorkerConfig, ["--model_name=m", "--version=1", "--path=/p", "--backend_address=ipc:///x",
                                              *dataclass_to_argv(server.tensorflow)])
    assert worker.tensorflow == server.tensorflow
    assert (worker.tensorflow.intra_op_threads, worker.tensorflow.inter_op_threads) == (1, 3)
    with pytest.raises(ValueError, match="mixed_precision"):
        parse(["--mixed_precision=float16"])


# TF Serving's own test files (servables/tensorflow/testdata), in its text format, as written there.
TF_SERVING_BATCHING = """max_batch_size { value: 128 }
batch_timeout_micros { value: 0 }
max_enqueued_batches { value: 1000000 }
num_batch_threads { value: 8 }
"""
TF_SERVING_MODELS = """model_config_list: {
  config: {
    name: "half_plus_two",
    base_path: "${TEST_HALF_PLUS_TWO_DIR}",
    model_platform: "tensorflow"
  },
  config: {
    name: "half_plus_three",
    base_path: "${TEST_HALF_PLUS_THREE_DIR}",
    model_platform: "tensorflow"
  }
}
"""


def test_tf_serving_batching_file(tmp_path: Path) -> None:
    (tmp_path / "batching_config.txt").write_text(TF_SERVING_BATCHING)
    params = load_batching_parameters(str(tmp_path / "batching_config.txt"))
    assert params == BatchingParameters(max_batch_size=128, batch_timeout_micros=0,
                                        max_enqueued_batches=1000000, num_batch_threads=8)


def test_batching_file_keeps_defaults_for_unset_fields() -> None:
    params = parse_batching_parameters("max_batch_size { value: 16 }\nallowed_batch_sizes: 8\nallowed_batch_sizes: 16")
    assert params.max_batch_size == 16
    assert params.allowed_batch_sizes == (8, 16)
    assert params.batch_timeout_micros == BatchingParameters().batch_timeout_micros


def test_bad_batching_file_says_where() -> None:
    with pytest.raises(ConfigError, match="1:1"):
        parse_batching_parameters("max_batch_sise { value: 16 }")
    with pytest.raises(ValueError, match="must end with max_batch_size"):
        parse_batching_parameters("max_batch_size { value: 16 }\nallowed_batch_sizes: 8")


def test_tf_serving_model_config_files(tmp_path: Path) -> None:
    (tmp_path / "good_model_config.txt").write_text(TF_SERVING_MODELS)
    (tmp_path / "bad_model_config.txt").write_text("improperly formatted file\n")
    models = load_model_config(str(tmp_path / "good_model_config.txt"))
    assert [(m.name, m.base_path) for m in models] == [
        ("half_plus_two", "${TEST_HALF_PLUS_TWO_DIR}"), ("half_plus_three", "${TEST_HALF_PLUS_THREE_DIR}")]
    with pytest.raises(ConfigError, match="bad_model_config.txt"):
        load_model_config(str(tmp_path / "bad_model_config.txt"))


def test_model_config_labels_and_errors() -> None:
    [model] = parse_model_config('model_config_list { config { name: "a" base_path: "/m/a" '
                                 'version_labels { key: "stable" value: 3 } } }')
    assert model.version_labels == (("stable", 3),)
    with pytest.raises(ValueError, match="repeat"):
        parse_model_config('model_config_list { config { name: "a" base_path: "/x" } '
                           'config { name: "a" base_path: "/y" } }')
    with pytest.raises(ValueError, match="not supported"):
        parse_model_config('model_config_list { config { name: "a" base_path: "/x" model_platform: "onnx" } }')
    with pytest.raises(ValueError, match="cannot read"):
        load_model_config("/nonexistent/models.config")


def test_the_older_flag_name_sets_the_same_setting() -> None:
    assert flags.parse_flags(ServerConfig, ["--use_tflite_model"]).tensorflow.prefer_tflite_model
    assert flags.parse_flags(ServerConfig, ["--use_tflite_model=true"]).tensorflow.prefer_tflite_model
    assert not flags.parse_flags(ServerConfig, []).tensorflow.prefer_tflite_model


def test_a_models_logging_config_is_read_as_tf_serving_writes_it() -> None:
    entry = 'config {{ name: "m" base_path: "/m" logging_config {{ {} }} }}'
    text = ('sampling_config { sampling_rate: 0.25 per_task_sampling_configs { dc: "aa" sampling_rate: 1.0 } } '
            'log_collector_config { type: "tfrecord" filename_prefix: "/var/log/m" }')
    (model,) = parse_model_config(f"model_config_list {{ {entry.format(text)} }}")
    assert model.logging is not None
    assert (model.logging.sampling_rate, model.logging.filename_prefix) == (0.25, "/var/log/m")  # "aa" is no cell here
    no_logging = parse_model_config('model_config_list { config { name: "m" base_path: "/m" } }')
    assert no_logging[0].logging is None
    for bad, message in (('log_collector_config { type: "kafka" filename_prefix: "/x" }', "kafka"),
                         ('sampling_config { sampling_rate: 0.5 }', "filename_prefix"),
                         ('sampling_config { sampling_rate: 1.5 } log_collector_config { filename_prefix: "/x" }',
                          "between 0 and 1")):
        with pytest.raises(ConfigError, match=message):
            parse_model_config(f"model_config_list {{ {entry.format(bad)} }}")


def test_inter_op_parallelism_takes_minus_one_for_the_callers_thread() -> None:
    assert TensorFlowOptions(tensorflow_inter_op_parallelism=-1).inter_op_threads == -1
    with pytest.raises(ConfigError, match="-1 or more"):
        TensorFlowOptions(tensorflow_inter_op_parallelism=-2)
    with pytest.raises(ConfigError, match=">= 0"):
        TensorFlowOptions(tensorflow_intra_op_parallelism=-1)
