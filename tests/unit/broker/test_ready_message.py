"""The ready message's example bodies: short, and answerable (a looked-up input gets entries
of its own tables)."""

from __future__ import annotations

import json
from pathlib import Path

from broker.frontends import example_body
from tests.unit.broker.shell import model_with
from tfbroker.wire import protocol


def test_a_lookup_input_gets_words_and_keys_from_its_tables(tmp_path: Path) -> None:
    _, served = model_with(1)
    served.path = str(tmp_path)
    extra = tmp_path / "assets.extra"
    extra.mkdir()
    (extra / "vocab.txt").write_text("word0\nw1_1\nw1_2\nword3\n")
    (extra / "users.txt").write_text("u0\nu2\n")
    (extra / "lookups.json").write_text(json.dumps({"lookups": [
        {"input": "words", "output": "word_ids", "vocabulary": "vocab.txt"},
        {"input": "user", "output": "user_vec", "embedding": "users.npy", "keys": "users.txt"}]}))
    served.signatures = {"serving_default": protocol.SignatureSpec(
        inputs={"words": ("string", [-1, -1]), "user": ("string", [-1])}, outputs={"score": ("float32", [-1])})}
    body = json.loads(example_body(served))
    assert body == {"instances": [{"words": ["word0", "w1_1", "w1_2"], "user": "u0"}]}


def test_numeric_inputs_get_a_row_of_their_width_and_no_tables_no_guess(tmp_path: Path) -> None:
    _, served = model_with(1)
    served.path = str(tmp_path)
    served.signatures = {"serving_default": protocol.SignatureSpec(
        inputs={"x": ("float32", [-1, 16])}, outputs={"y": ("float32", [-1, 4])})}
    assert json.loads(example_body(served)) == {"instances": [[0.5] * 16]}
    served.signatures = {"serving_default": protocol.SignatureSpec(
        inputs={"x": ("float32", [-1])}, outputs={"y": ("float32", [-1])})}
    assert example_body(served) == '{"instances": [1.0, 2.0, 5.0]}'


def test_each_input_gets_values_of_its_dtype_and_every_fixed_dimension_filled(tmp_path: Path) -> None:
    _, served = model_with(1)
    served.path = str(tmp_path)
    served.signatures = {"serving_default": protocol.SignatureSpec(
        inputs={"ids": ("int64", [-1, 2]), "flag": ("bool", [-1]), "name": ("string", [-1]),
                "image": ("float32", [-1, 2, 2, 1])}, outputs={"y": ("float32", [-1])})}
    assert json.loads(example_body(served)) == {"instances": [
        {"ids": [1, 1], "flag": True, "name": "example", "image": [[[0.5], [0.5]], [[0.5], [0.5]]]}]}
    served.signatures = {"serving_default": protocol.SignatureSpec(
        inputs={"ids": ("int64", [-1])}, outputs={"y": ("float32", [-1])})}
    assert json.loads(example_body(served)) == {"instances": [1]}  # an int for an int input, never 0.5
    served.signatures = {"serving_default": protocol.SignatureSpec(
        inputs={"x": ("float32", None)}, outputs={"y": ("float32", [-1])})}
    assert example_body(served) == ""  # unknown rank: no guess


def test_the_client_finds_a_broker_by_its_port_or_runtime_directory() -> None:
    from tfbroker import Client
    from tfbroker.runtime.settings import default_frontend_address

    assert Client(rest_api_port=18501).address == default_frontend_address(18501)
    assert Client(runtime_dir="/run/tfb").address == "ipc:///run/tfb/frontend.sock"
    assert Client("tcp://10.0.0.1:5555", rest_api_port=18501).address == "tcp://10.0.0.1:5555"
