"""Caches keyed by a tensor (WeightFakeQuant's observed weight, the integer simulation's
``tensor_versions``) hold it weakly and never match another tensor at its freed address."""
from __future__ import annotations

import torch

from qpasses.modules.fake_quant import WeightFakeQuant
from qpasses.modules.tensor_keys import tensor_versions


def test_weight_observer_cache_follows_the_tensor_not_its_address():
    """The "unchanged weight" shortcut holds the tensor weakly: a new tensor at a freed one's
    address is observed (an ``id`` key skipped it in some processes), and copies and pickles
    of an observed quantizer work and observe afresh."""
    import copy
    import pickle
    q = WeightFakeQuant(4, bits=8)
    hits = 0
    for _ in range(20):
        w1 = torch.full((4, 3), 1.0)
        q.observe(w1)
        old, s1 = id(w1), q.scale.clone()
        del w1
        w2 = torch.full((4, 3), 4.0)        # often at w1's address, same version (0)
        hits += id(w2) == old
        q.observe(w2)
        assert torch.allclose(q.scale, s1 * 4), "a new tensor must be observed"
        w2.mul_(0.5)                        # a new version of the same tensor
        q.observe(w2)
        assert torch.allclose(q.scale, s1 * 2)
        same = q.scale.clone()
        q.observe(w2)                       # unchanged: kept
        assert torch.equal(q.scale, same)
    for twin in (copy.deepcopy(q), pickle.loads(pickle.dumps(q))):
        assert twin._seen is None and torch.equal(twin.scale, q.scale)
        w3 = torch.full((4, 3), 8.0)
        twin.observe(w3)
        assert torch.allclose(twin.scale, s1 * 8)


def test_tensor_versions_never_match_a_new_tensor_at_a_freed_address():
    """Caches of the integer simulation key on ``tensor_versions``: equal for the same unchanged
    tensor, unequal after an in-place edit and for any other tensor, even one that took the
    freed tensor's address with the same version."""
    t = torch.zeros(5)
    key = tensor_versions(t, None)
    assert key == tensor_versions(t, None)
    t.add_(1)
    assert key != tensor_versions(t, None)
    for _ in range(20):
        a = torch.zeros(7)
        k, old = tensor_versions(a), id(a)
        del a
        b = torch.zeros(7)                   # often at a's address, version 0
        assert k != tensor_versions(b), id(b) == old
