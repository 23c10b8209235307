"""The mixed-slot LoRA op against the PEFT-shaped loop oracle."""
from __future__ import annotations

import torch

from handler.engine import lora_ops as ops


def _pool(K=5, r=8, d_in=12, d_out=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(K, r, d_in, generator=g)
    Bt = torch.randn(K, r, d_out, generator=g)
    A[0] = 0
    Bt[0] = 0
    scaling = torch.rand(K, generator=g) + 0.5
    scaling[0] = 0
    return A, Bt.transpose(1, 2), scaling


def test_lora_delta_matches_reference_for_mixed_rows():
    A, B, s = _pool()
    x = torch.randn(6, 4, 12)
    slots = torch.tensor([3, 0, 1, 3, 4, 2])
    got = ops.lora_delta(x, slots, A, B, s)
    want = ops.lora_delta_reference(x, slots, A, B, s)
    assert got.shape == (6, 4, 10)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not got[1].any()  # slot 0 is exactly zero


def test_rank_trim_is_exact_when_padding_is_zero():
    A, B, s = _pool(r=8)
    A[:, 3:] = 0
    B[:, :, 3:] = 0
    x = torch.randn(3, 2, 12)
    slots = torch.tensor([1, 2, 4])
    full = torch.zeros(3, 2, 10)
    trimmed = torch.zeros(3, 2, 10)
    ops.add_mixed_(full, x, ops.prepare_mixed(slots, A, B, s))
    ops.add_mixed_(trimmed, x, ops.prepare_mixed(slots, A, B, s, rank=3))
    torch.testing.assert_close(full, trimmed, rtol=1e-6, atol=1e-6)


def test_uniform_path_matches_reference():
    A, B, s = _pool()
    x = torch.randn(2, 5, 12)
    out = torch.zeros(2, 5, 10)
    ops.add_uniform_(out, x, A[2], B.transpose(1, 2)[2], float(s[2]))
    want = ops.lora_delta_reference(x, torch.tensor([2, 2]), A, B, s)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_add_mixed_adds_in_place_onto_base_output():
    A, B, s = _pool()
    x = torch.randn(2, 3, 12)
    base = torch.randn(2, 3, 10)
    out = base.clone()
    ret = ops.add_mixed_(out, x, ops.prepare_mixed(torch.tensor([1, 0]), A, B, s))
    assert ret.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, base + ops.lora_delta_reference(x, torch.tensor([1, 0]), A, B, s))


def test_by_slot_delta_matches_reference_for_mixed_rows_one_token_or_more():
    A, B, s = _pool(K=6)
    for slots in ([3, 0, 1, 3, 4, 2], [5, 5, 1, 5, 3], [2, 0, 2, 0]):  # base rows, gaps, a slot on many rows
        for tokens in (1, 3):
            x = torch.randn(len(slots), tokens, 12)
            groups = ops.group_by_slot(slots)
            got = ops.by_slot_delta(x, groups, A, B, s)
            want = ops.lora_delta_reference(x, torch.tensor(slots), A, B, s)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            assert not got[torch.tensor(slots) == 0].any()  # base rows get exact zeros


def test_by_slot_groups_rows_by_slot_and_trims_rank_exactly():
    groups = ops.group_by_slot([0, 4, 2, 4, 0, 4])
    assert (groups.lo, groups.count, groups.width) == (2, 3, 3)
    assert groups.group.tolist() == [2, 0, 2, 2] and groups.place.tolist() == [0, 0, 1, 2]
    assert groups.flat.tolist() == [6, 0, 7, 8]
    assert groups.rows.tolist() == [1, 2, 3, 5]
    assert ops.group_by_slot([1, 2]).rows is None and ops.group_by_slot([0, 0]) is None
    A, B, s = _pool(r=8)
    A[:, 3:] = 0
    B[:, :, 3:] = 0
    x = torch.randn(3, 1, 12)
    g = ops.group_by_slot([1, 2, 4])
    torch.testing.assert_close(ops.by_slot_delta(x, g, A, B, s, rank=3), ops.by_slot_delta(x, g, A, B, s))


def test_by_slot_a_non_finite_slot_reaches_no_other_slots_rows():
    """Slots 2 (used by one row) and 3 (inside the batch's slot range, used by none) hold inf/NaN:
    the other rows' deltas are exactly what they are alone."""
    A, B, s = _pool(K=6)
    A[2, 0, 0] = float("inf")
    A[3] = float("nan")
    B[3] = float("nan")
    slots = [1, 2, 4, 0, 1]
    x = torch.randn(5, 1, 12)
    got = ops.by_slot_delta(x, ops.group_by_slot(slots), A, B, s)
    clean = [0, 2, 3, 4]
    assert torch.isfinite(got[clean]).all()
    for i in clean:
        alone = ops.lora_delta_reference(x[i:i + 1], torch.tensor([slots[i]]), A, B, s)
        torch.testing.assert_close(got[i:i + 1], alone, rtol=1e-5, atol=1e-5)
