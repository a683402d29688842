"""TensorProto in and out of the frontends' gRPC API, and our protos' descriptor set."""

from __future__ import annotations

import numpy as np
import pytest

from frontend import grpc_messages as pb
from frontend.grpc_api import serialized_examples
from frontend.grpc_tensors import from_proto, to_proto
from tfbroker.wire.errors import InvalidArgument
from tfbroker.wire.tensors import RawTensor


def tensor(dtype: str, shape: list[int], **fields: object) -> object:
    proto = pb.TensorProto(dtype=pb.DATA_TYPES[dtype], **fields)
    for size in shape:
        proto.tensor_shape.dim.add(size=size)
    return proto


def test_the_committed_descriptor_set_is_what_the_protos_compile_to() -> None:
    assert pb.DESCRIPTOR_SET.read_bytes() == pb.compile_descriptor_set(), (
        "frontend/protos changed: run python -m frontend.grpc_messages")


def test_typed_fields_become_arrays_of_the_tensors_dtype() -> None:
    x = from_proto("x", tensor("DT_FLOAT", [2, 2], float_val=[1.0, 2.0, 3.0, 4.0]))
    assert isinstance(x, np.ndarray) and x.dtype == np.float32 and x.tolist() == [[1, 2], [3, 4]]
    assert from_proto("i", tensor("DT_INT8", [2], int_val=[-3, 7])).dtype == np.int8
    assert from_proto("i", tensor("DT_INT8", [1], int_val=[1000])).tolist() == [-24]  # cast as TensorFlow does
    assert from_proto("b", tensor("DT_BOOL", [2], bool_val=[True, False])).tolist() == [True, False]
    strings = from_proto("s", tensor("DT_STRING", [2], string_val=[b"a", b"bc"]))
    assert strings.dtype == object and strings.tolist() == [b"a", b"bc"]
    half = from_proto("h", tensor("DT_HALF", [2], half_val=np.array([1.5, -2], np.float16).view(np.uint16).tolist()))
    assert half.dtype == np.float16 and half.tolist() == [1.5, -2.0]
    c = from_proto("c", tensor("DT_COMPLEX64", [1], scomplex_val=[1.0, 2.0]))
    assert c.tolist() == [1 + 2j]


def test_as_tensorflow_reads_them_one_value_fills_the_shape_and_none_gives_zeros() -> None:
    assert from_proto("x", tensor("DT_FLOAT", [2, 3], float_val=[7.0])).tolist() == [[7.0] * 3] * 2
    assert from_proto("x", tensor("DT_INT64", [4], int64_val=[1, 2])).tolist() == [1, 2, 2, 2]
    assert from_proto("x", tensor("DT_INT32", [3])).tolist() == [0, 0, 0]
    assert from_proto("x", tensor("DT_INT32", [2], int_val=[1, 2, 3])).tolist() == [1, 2]  # more are cut
    assert from_proto("s", tensor("DT_STRING", [3], string_val=[b"z"])).tolist() == [b"z"] * 3
    assert from_proto("x", tensor("DT_FLOAT", [], float_val=[2.5])).shape == ()


def test_tensor_content_is_forwarded_as_it_came() -> None:
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    raw = from_proto("x", tensor("DT_FLOAT", [2, 3], tensor_content=values.tobytes()))
    assert raw == RawTensor("float32", (2, 3), values.tobytes())


@pytest.mark.parametrize(("proto", "message"), [
    (tensor("DT_RESOURCE", [1]), "tensor of type DT_RESOURCE is not supported"),
    (tensor("DT_BFLOAT16", [1]), "tensor of type DT_BFLOAT16 is not supported"),
    (tensor("DT_STRING", [1], tensor_content=b"ab"), "carries its values in string_val"),
    (tensor("DT_COMPLEX64", [1], scomplex_val=[1.0]), "come in \\(real, imaginary\\) pairs"),
    (tensor("DT_FLOAT", [-2]), "not a valid tensor shape"),
])
def test_bad_tensors_are_invalid_arguments(proto: object, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        from_proto("x", proto)


def test_an_unknown_rank_is_refused() -> None:
    proto = tensor("DT_FLOAT", [], float_val=[1.0])
    proto.tensor_shape.unknown_rank = True  # type: ignore[attr-defined]
    with pytest.raises(InvalidArgument, match="needs a known shape"):
        from_proto("x", proto)


@pytest.mark.parametrize("array", [
    np.array([[1.5, -2.0]], np.float32), np.array([1, 2, 3], np.int64), np.array([True, False]),
    np.array([1.5], np.float16), np.array([1 + 2j], np.complex128), np.array([[3]], np.uint8),
])
def test_outputs_round_trip_in_typed_fields_and_in_tensor_content(array: np.ndarray) -> None:
    for as_content in (False, True):
        proto = to_proto(array, as_content=as_content)
        assert bool(proto.tensor_content) == as_content
        back = from_proto("y", pb.TensorProto.FromString(proto.SerializeToString()))
        if isinstance(back, RawTensor):
            back = np.frombuffer(back.data, dtype=back.dtype).reshape(back.shape)
        assert back.dtype == array.dtype and back.tolist() == array.tolist()


def test_string_outputs_are_string_val_in_either_mode() -> None:
    array = np.array([b"a", b"b"], dtype=object)
    proto = to_proto(array, as_content=True)
    assert list(proto.string_val) == [b"a", b"b"] and not proto.tensor_content


def test_examples_with_a_context_carry_its_features_and_their_own_win() -> None:
    given = pb.message_class("tensorflow.serving.Input")()
    listed = given.example_list_with_context
    listed.context.features.feature["c"].float_list.value.append(1.0)
    listed.context.features.feature["x"].float_list.value.append(9.0)
    example = listed.examples.add()
    example.features.feature["x"].float_list.value.append(2.0)
    [serialized] = serialized_examples(given)
    merged = pb.Example.FromString(serialized)
    assert list(merged.features.feature["x"].float_list.value) == [2.0]
    assert list(merged.features.feature["c"].float_list.value) == [1.0]
    with pytest.raises(InvalidArgument, match="Input is empty"):
        serialized_examples(pb.message_class("tensorflow.serving.Input")())
