# Golden expected-error cases raised while a pipeline runs: pass failures and verify-each.
# -----
# CASE: pass-failure-names-pass-position-pipeline
# RUN: graph(test-golden-options,test-fail)
# EXPECT-ERROR: pass 'test-fail' (element 1 of the pipeline) failed: at node 'input_1': this pass always fails
# CHECK: failed:
# CHECK-NEXT: pipeline: graph(test-golden-options{count=1 flag=false mode=a ratio=0.5 sizes={}},test-fail)


def build():
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU()), (torch.randn(2, 4),)
# -----
# CASE: dishonest-pass-caught-by-verify-each
# RUN: graph(test-dishonest)
# EXPECT-ERROR: pass 'test-dishonest' (element 0 of the pipeline) failed: pass reported modified=False but changed the graph's structure


class M(nn.Module):
    def forward(self, x):
        return torch.relu(x) + 1


def build():
    return M(), (torch.randn(3),)
# -----
# CASE: trace-input-mismatch
# RUN: graph(test-golden-options)
# EXPECT-ERROR: failed at node 'linear'


def build():
    m = nn.Sequential()
    m.add_module("linear", nn.Linear(4, 2))
    return m, (torch.randn(1, 5),)
