"""runtime/masks.py: numpy positions and masks against small cases worked out by hand (docs/glm.md 2, 3, 4.2) and
against the torch reference's build_attention_mask for the sep forms."""

from __future__ import annotations

import numpy as np
import pytest

from glm_runtime import masks

T, F = True, False


def test_context_positions_by_hand():
    pos = masks.context_positions([3, 1], seq=4)
    assert pos.dtype == np.int64 and pos.shape == (2, 2, 4)
    assert pos[0].tolist() == [[0, 1, 2, 0], [0, 0, 0, 0]]  # padding gets (0, 0)
    assert pos[1].tolist() == [[0, 0, 0, 0], [0, 0, 0, 0]]


def test_decode_and_span_positions_by_hand():
    # docs/glm.md 2: token t of a span (t = 0 is sop) sits at (mask_pos, t + 1)
    assert masks.decode_positions([2, 5], [0, 3]).tolist() == [[[2], [1]], [[5], [4]]]
    assert masks.span_positions(5, 0, 3).tolist() == [[5, 5, 5], [1, 2, 3]]
    assert masks.span_positions(5, 2, 2).tolist() == [[5, 5], [3, 4]]


def test_filled_layout_is_spec_4_2():
    # "t1 [MASK] t2 t3 [MASK] t4": C = 8, masks at 2 and 5; span 1 fed sop u1 u2, span 2 fed sop v1
    pos, sep = masks.filled_layout(8, [(2, 2), (5, 1)])
    assert sep == 8
    assert pos.tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, 2, 2, 2, 5, 5], [0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 1, 2]]


def test_context_mask_by_hand():
    m = masks.context_mask([2, 3], seq=3)
    assert m.shape == (2, 1, 3, 3) and m.dtype == bool
    assert m[0, 0].tolist() == [[T, T, F], [T, T, F], [F, F, T]]  # padding key hidden; padding query sees itself
    assert m[1, 0].tolist() == [[T, T, T]] * 3  # no padding: fully bidirectional (sep = C)


def test_decode_mask_by_hand():
    visible = np.array([[T, T, F, T], [T, F, F, F]])
    m = masks.decode_mask(visible)
    assert m.shape == (2, 1, 1, 5)
    assert m[:, 0, 0].tolist() == [[T, T, F, T, T], [T, F, F, F, T]]


def test_chunk_mask_by_hand():
    m = masks.chunk_mask(np.array([[T, F]]), 3)
    assert m.shape == (1, 1, 3, 5)
    assert m[0, 0].tolist() == [[T, F, T, F, F], [T, F, T, T, F], [T, F, T, T, T]]
    visible = np.array([[T, F, T], [F, T, T]])
    assert np.array_equal(masks.chunk_mask(visible, 1), masks.decode_mask(visible))


def test_sep_mask_by_hand():
    assert masks.sep_mask(2, 4).tolist() == [[T, T, F, F], [T, T, F, F], [T, T, T, F], [T, T, T, T]]
    assert masks.sep_mask(0, 2).tolist() == [[T, F], [T, T]]  # plain causal


def test_bad_lengths_are_refused():
    with pytest.raises(ValueError, match="at least one token"):
        masks.context_mask([2, 0])
    with pytest.raises(ValueError, match="shorter than the longest row"):
        masks.context_positions([5], seq=3)


# ---------------------------------------------------------------- against the torch reference's mask builder

try:
    import torch
except ImportError:  # the numpy cases above still run on a torch-free install
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="needs torch (the reference's mask builder)")


@needs_torch
@pytest.mark.parametrize("sep,seq", [(0, 5), (3, 5), (5, 5), (1, 1), (4, 7)])
def test_sep_mask_equals_torch(sep, seq):
    from glm_export.model import build_attention_mask

    ref = build_attention_mask(sep, 1, seq, 0)[0, 0].numpy().astype(bool)
    assert np.array_equal(masks.sep_mask(sep, seq), ref)


@needs_torch
def test_per_sample_sep_vector_equals_torch():
    from glm_export.model import build_attention_mask

    seps = [2, 5, 0]
    ref = build_attention_mask(torch.tensor(seps), 3, 5, 0)[:, 0].numpy().astype(bool)
    for b, sep in enumerate(seps):
        assert np.array_equal(masks.sep_mask(sep, 5), ref[b])


@needs_torch
def test_context_mask_equals_torch_sep_on_real_tokens():
    # the context pass is the original's sep = C per row; padding keys are the only difference
    from glm_export.model import build_attention_mask

    lengths, seq = [4, 2, 6], 6
    ours = masks.context_mask(lengths, seq)[:, 0]
    ref = build_attention_mask(torch.tensor(lengths), 3, seq, 0)[:, 0].numpy().astype(bool)
    for b, n in enumerate(lengths):
        assert np.array_equal(ours[b, :n, :n], ref[b, :n, :n])
        assert not ours[b, :n, n:].any()  # real tokens never see padding


@needs_torch
def test_decode_mask_equals_torch_sep_zero_with_memory():
    # a decode step in the original: scalar sep 0 over one new token, all memory visible (docs/glm.md 4.1 step 2)
    from glm_export.model import build_attention_mask

    past = 6
    ref = build_attention_mask(0, 1, 1, past)[0, 0].numpy().astype(bool)
    assert np.array_equal(masks.decode_mask(np.ones((1, past), dtype=bool))[0, 0], ref)


@needs_torch
def test_chunk_mask_equals_torch_sep_zero_with_memory():
    from glm_export.model import build_attention_mask

    ref = build_attention_mask(0, 1, 3, 4)[0, 0].numpy().astype(bool)
    assert np.array_equal(masks.chunk_mask(np.ones((1, 4), dtype=bool), 3)[0, 0], ref)
