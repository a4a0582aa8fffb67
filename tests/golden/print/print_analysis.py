# print<ANALYSIS> writes to the context's stream; the golden output is that text followed by the
# final graph, so analyses and the graph can be checked together.
# -----
# CASE: print-before-and-after-fold
# RUN: graph(print<test-golden-node-count>,fold-batch-norm,dce,print<test-golden-node-count>)
# CHECK-LABEL: // ----- test-golden-node-count -----
# CHECK-NEXT: call_module: 2
# CHECK-LABEL: // ----- test-golden-node-count -----
# CHECK-NEXT: call_module: 1
# CHECK-NEXT: output: 1
# CHECK-NEXT: placeholder: 1
# CHECK-LABEL: graph {
# CHECK-NEXT: %input_1 = placeholder


def build():
    return nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3)), (torch.randn(1, 2, 3, 3),)
# -----
# CASE: print-changes-nothing
# RUN: graph(print<test-golden-node-count>,require<test-golden-node-count>,invalidate<test-golden-node-count>)
# CHECK-UNCHANGED
# CHECK: call_module: 1


def build():
    return nn.Sequential(nn.Linear(2, 2)), (torch.randn(1, 2),)
