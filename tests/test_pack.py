import pytest
import torch

from lowbit.quantize.gptq import GPTQConfig, QuantizedWeight, gptq_quantize, rtn_quantize
from lowbit.quantize.pack import dequantize_gptq_v1, pack_gptq_v1, pack_rows, unpack_gptq_v1, unpack_rows


def as_int32(word: int) -> int:
    """The int32 with the bits of an unsigned 32-bit word."""
    return word - 2**32 if word >= 2**31 else word


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_rows_round_trip(bits):
    codes = torch.randint(0, 2**bits, (96, 7), dtype=torch.int32)
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (96 * bits // 32, 7)
    assert torch.equal(unpack_rows(packed, bits, rows=96), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_top_bit_set_makes_negative_words_and_survives(bits):
    codes = torch.full((32, 3), 2**bits - 1)
    packed = pack_rows(codes, bits)
    assert torch.equal(packed, torch.full_like(packed, -1))  # every bit set
    assert torch.equal(unpack_rows(packed, bits, rows=32), codes.to(torch.int32))


def test_4bit_layout_lowest_row_in_lowest_nibble():
    codes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8]).unsqueeze(1)
    assert pack_rows(codes, 4).item() == as_int32(0x87654321)


def test_3bit_layout_straddles_words_like_autogptq():
    codes = torch.zeros(32, 1, dtype=torch.int64)
    codes[0] = 0b111  # word 0, bits 0-2
    codes[10] = 0b101  # bits 30-31 of word 0 take the low two bits (01), bit 0 of word 1 the top bit
    codes[21] = 0b110  # bit 31 of word 1 takes the low bit (0), bits 0-1 of word 2 the top two (11)
    codes[31] = 0b111  # bits 29-31 of word 2
    words = pack_rows(codes, 3)[:, 0].tolist()
    assert words == [as_int32(0x40000007), 0x00000001, as_int32(0xE0000003)]


def test_pack_rows_rejects_partial_words_and_out_of_range_codes():
    with pytest.raises(ValueError):
        pack_rows(torch.zeros(12, 2, dtype=torch.int32), 4)
    with pytest.raises(ValueError):
        pack_rows(torch.full((8, 2), 16), 4)


def test_symmetric_4bit_qzeros_are_0x77777777():
    q = rtn_quantize(torch.randn(16, 64), GPTQConfig(bits=4, group_size=32, sym=True))
    tensors = pack_gptq_v1(q)
    assert tensors["qzeros"].shape == (2, 2)
    assert (tensors["qzeros"] == 2004318071).all()
    assert 2004318071 == 0x77777777


def random_quantized(bits: int, act_order: bool, n_rows=32, n_cols=64, group_size=16) -> QuantizedWeight:
    gen = torch.Generator().manual_seed(bits)
    X = torch.randn(n_cols, 256, generator=gen) * torch.rand(n_cols, 1, generator=gen)
    config = GPTQConfig(bits=bits, group_size=group_size, sym=False, act_order=act_order)
    q, _ = gptq_quantize(torch.randn(n_rows, n_cols, generator=gen), X @ X.T / 128, config)
    return q


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_v1_round_trip_is_exact(bits, act_order):
    q = random_quantized(bits, act_order)
    bias = torch.randn(32)
    tensors = pack_gptq_v1(q, bias=bias)
    pf = 32 // bits if bits != 3 else None
    assert tensors["qweight"].dtype == torch.int32 and tensors["qweight"].shape == (64 * bits // 32, 32)
    assert tensors["qzeros"].dtype == torch.int32 and tensors["qzeros"].shape == (4, 32 * bits // 32)
    assert tensors["scales"].dtype == torch.float16 and tensors["scales"].shape == (4, 32)
    assert tensors["g_idx"].dtype == torch.int32 and torch.equal(tensors["g_idx"], q.g_idx)
    assert torch.equal(tensors["bias"], bias.half())
    assert all(t.is_contiguous() for t in tensors.values())
    if pf is not None:  # qweight word r, column n holds codes[n, r*pf : (r+1)*pf], lowest row lowest
        assert (tensors["qweight"][1, 5].item() & (2**bits - 1)) == q.codes[5, pf].item()

    back = unpack_gptq_v1(tensors, bits)
    assert torch.equal(back.codes, q.codes)
    assert torch.equal(back.zeros, q.zeros)
    assert torch.equal(back.scales, q.scales)
    assert torch.equal(back.g_idx, q.g_idx)
    assert torch.equal(dequantize_gptq_v1(tensors, bits), q.dequantize())


def test_qzeros_are_stored_minus_one():
    q = random_quantized(4, act_order=False)
    stored = unpack_rows(pack_gptq_v1(q)["qzeros"].T, 4, rows=32).T
    assert torch.equal(stored, q.zeros - 1)


def test_zero_point_zero_cannot_be_stored():
    q = rtn_quantize(torch.randn(8, 32), GPTQConfig(bits=4, group_size=32, sym=False))
    q.zeros[0, 0] = 0
    with pytest.raises(ValueError):
        pack_gptq_v1(q)
