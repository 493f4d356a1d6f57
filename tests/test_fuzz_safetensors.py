"""Property: whatever bytes a safetensors file (or its index) holds, reading it raises a LowbitError or works.

Never another exception: a file from a stranger on the Hub gets one clear
line, not a traceback.
"""

from __future__ import annotations

import json
import math
import struct
import tempfile
from pathlib import Path

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from lowbit.errors import LowbitError
from lowbit.quantize.checkpoint import SAFETENSORS_DTYPES, SafetensorsCheckpoint, read_header

FUZZ = settings(max_examples=150, deadline=None)

VALID = save({
    "a.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4),
    "b.codes": torch.arange(6, dtype=torch.int32),
    "c.half": torch.ones(2, 2, dtype=torch.bfloat16),
    "d.bytes": torch.arange(5, dtype=torch.uint8),
    "e.empty": torch.zeros(0, 3, dtype=torch.float16),
}, metadata={"format": "pt"})

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
odd_numbers = st.sampled_from([-1, 2**63, 2**70, float("inf"), float("nan"), 1.5, True, "3", None])
sizes = st.integers(0, 40) | st.integers(2**31, 2**70) | odd_numbers
entries = st.fixed_dictionaries({
    "dtype": st.sampled_from([*SAFETENSORS_DTYPES, "X9", ""]) | json_values,
    "shape": st.lists(sizes, max_size=4) | json_values,
    "data_offsets": st.lists(sizes, min_size=2, max_size=2) | st.lists(sizes, max_size=3) | json_values,
})
headers = st.dictionaries(st.text(max_size=10), entries | json_values, max_size=4) | json_values


@st.composite
def consistent_files(draw) -> bytes:
    """Headers that agree with their data (any dtype, shapes with zeros or huge empty dims), at most a few bytes cut."""
    header, offset = {}, 0
    for i in range(draw(st.integers(1, 3))):
        dtype = draw(st.sampled_from(list(SAFETENSORS_DTYPES)))
        shape = draw(st.lists(st.integers(0, 5) | st.sampled_from([2**40, 2**62, 2**63 - 1]), max_size=4))
        nbytes = math.prod(shape) * torch.empty((), dtype=SAFETENSORS_DTYPES[dtype]).element_size()
        if nbytes > 2048:  # keep the data small: make it an empty tensor with the same odd dims
            shape, nbytes = [0, *shape], 0
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    data = with_header(json.dumps(header).encode(), draw(st.binary(min_size=offset, max_size=offset)))
    return data[: len(data) - draw(st.integers(0, 3))]


def read_everything(data: bytes, index: str | None = None) -> None:
    """Open a folder holding `data` as a checkpoint and read every tensor; only LowbitError may come out."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "model.safetensors").write_bytes(data)
        if index is not None:
            (folder / "model.safetensors.index.json").write_text(index)
        try:
            read_header(folder / "model.safetensors")
            reader = SafetensorsCheckpoint(folder)
            for name in reader.names():
                reader.read(name)
            reader.read_prefix("a.")
        except LowbitError:
            pass


def with_header(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


def test_the_valid_file_reads():
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "model.safetensors").write_bytes(VALID)
        reader = SafetensorsCheckpoint(Path(tmp))
        assert torch.equal(reader.read("a.weight"), torch.arange(12, dtype=torch.float32).reshape(3, 4))
        assert reader.read("e.empty").shape == (0, 3)


@FUZZ
@given(st.binary(max_size=600))
def test_random_bytes(data):
    read_everything(data)


@FUZZ
@given(st.integers(0, len(VALID) - 1))
def test_truncated_file(length):
    read_everything(VALID[:length])


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=6))
def test_valid_file_with_bytes_changed(changes):
    data = bytearray(VALID)
    for position, value in changes:
        data[position] = value
    read_everything(bytes(data))


@FUZZ
@given(consistent_files())
def test_consistent_header_with_random_data(data):
    read_everything(data)


@FUZZ
@given(headers, st.binary(max_size=200))
def test_random_json_header(header, data):
    read_everything(with_header(json.dumps(header).encode(), data))


@FUZZ
@given(st.binary(max_size=300), st.binary(max_size=100), st.integers(0, 2**64 - 1))
def test_random_header_bytes_and_length(header, data, length):
    read_everything(with_header(header, data))
    read_everything(struct.pack("<Q", length) + header + data)


@FUZZ
@given(json_values | st.fixed_dictionaries({"weight_map": st.dictionaries(st.text(max_size=8), json_values)}))
def test_random_index(index):
    read_everything(VALID, json.dumps(index))


@FUZZ
@given(st.text(max_size=30))
def test_index_naming_any_file(shard):
    read_everything(VALID, json.dumps({"weight_map": {"a.weight": shard}}))
