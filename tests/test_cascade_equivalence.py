"""Part 0 of "The cascade, rebuilt": the one-loop cascade gives the losses, gradients and outputs of the
hand-unrolled one it replaced (reference file written by ``tests/cascade_reference.py`` on the old code,
every switch pinned to its old value)."""
import pytest
import torch

from cascade_reference import CASES, REFERENCE_FILE, cascade_outputs


@pytest.fixture(scope="module")
def reference():
    return torch.load(REFERENCE_FILE)


@pytest.mark.parametrize("case", sorted(CASES))
def test_restructured_cascade_matches_the_reference(case, reference):
    torch.set_num_threads(1)  # the reference was written with one thread: reductions in the same order
    expected, got = reference[case], cascade_outputs(case)
    assert sorted(got) == sorted(expected)
    assert any(k.startswith("final") and v.numel() for k, v in expected.items()), "the case detects nothing"
    for key in expected:
        assert got[key].shape == expected[key].shape, key
        assert torch.allclose(got[key].float(), expected[key].float(), rtol=1e-5, atol=1e-6), key
