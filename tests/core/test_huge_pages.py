"""Huge-page advice for large new tensors (``qpasses.ir.huge_pages``) and trace's deep copy that
uses it (``deepcopy_module``): advice changes no value, and the copy keeps deepcopy's semantics
(fresh storage, tied parameters stay tied, requires_grad and types kept, the model untouched)."""
from __future__ import annotations

import copy
import resource

import pytest
import torch
from torch import nn

from qpasses.ir.huge_pages import MIN_ADVISED_BYTES, advise_huge_pages, empty_like_huge
from qpasses.ir.trace import deepcopy_module


def test_advice_keeps_values_shape_and_dtype():
    for shape, dtype in (((3, 5), torch.float32), ((1 << 20,), torch.float32),
                         ((1 << 21,), torch.int8), ((0,), torch.float64)):
        t = torch.arange(int(torch.tensor(shape).prod())).reshape(shape).to(dtype)
        before = t.clone()
        assert advise_huge_pages(t) is t and torch.equal(t, before)
        e = empty_like_huge(t)
        assert e.shape == t.shape and e.dtype == dtype and e.is_contiguous()
        assert empty_like_huge(t, torch.int16).dtype == torch.int16


def test_advised_memory_takes_fewer_page_faults_where_the_kernel_allows():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read()
    except OSError:
        mode = ""
    if "[madvise]" not in mode:
        pytest.skip("transparent huge pages are not in madvise mode")
    n = 64 << 20                                   # 64 MiB, written once

    def faults(advised: bool) -> int:
        t = torch.empty(n, dtype=torch.uint8)
        if advised:
            advise_huge_pages(t)
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t.fill_(1)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0

    plain, advised = faults(False), faults(True)
    if plain < (n >> 12) // 2:                     # the allocator reused mapped memory
        pytest.skip("no fresh memory to fault in")
    assert advised < plain // 4, (advised, plain)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.big = nn.Linear(1024, MIN_ADVISED_BYTES // 4096 + 8)      # over the advice limit
        self.head = nn.Linear(1024, self.big.out_features, bias=False)
        self.head.weight = self.big.weight                              # tied
        self.frozen = nn.Linear(1024, 1024)
        self.frozen.weight.requires_grad_(False)
        self.view_pair = nn.Parameter(torch.randn(1024, 1024))
        self.register_buffer("alias", self.view_pair.data[:512])       # shares storage
        self.small = nn.Conv2d(3, 4, 3)


def test_deepcopy_module_keeps_deepcopys_semantics():
    torch.manual_seed(0)
    model = Tied()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    new = deepcopy_module(model)
    ref = copy.deepcopy(model)
    assert new.head.weight is new.big.weight                              # still tied
    assert new.big.weight is not model.big.weight
    def shared(m):        # whatever deepcopy keeps of the alias, the copy keeps
        return m.alias.untyped_storage().data_ptr() == m.view_pair.untyped_storage().data_ptr()
    assert shared(new) == shared(ref)
    assert not new.frozen.weight.requires_grad and new.big.weight.requires_grad
    own = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for (name, p), (_, q) in zip(new.named_parameters(), ref.named_parameters()):
        assert type(p) is nn.Parameter and p.requires_grad == q.requires_grad, name
        assert torch.equal(p, q) and p.untyped_storage().data_ptr() not in own, name
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k                               # the model untouched
    with torch.no_grad():
        new.big.weight.add_(1)
    assert torch.equal(model.big.weight, state["big.weight"])
