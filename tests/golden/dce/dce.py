# Goldens for dce: dead nodes, unused submodules and tensors go; placeholders and side effects stay.
# -----
# CASE: dead-node-and-unused-module
# RUN: graph(dce)
# CHECK: %x = placeholder
# CHECK-NEXT: %fc = call_module[fc](%x)
# CHECK-NEXT: output(%fc)
# CHECK-NOT: mul


class Dead(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.unused = nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        z = y * 2  # noqa: F841 - dead
        return y


def build():
    return Dead(), (torch.randn(1, 4),)
# -----
# CASE: unused-placeholder-is-kept
# RUN: graph(dce)
# CHECK-UNCHANGED
# CHECK: %x = placeholder
# CHECK-NEXT: %unused = placeholder


class TwoInputs(nn.Module):
    def forward(self, x, unused):
        return x + 1


def build():
    return TwoInputs(), (torch.randn(2), torch.randn(2))
# -----
# CASE: nothing-dead
# RUN: graph(dce)
# CHECK-UNCHANGED
# CHECK: call_module[0]


def build():
    return nn.Sequential(nn.Linear(4, 2)), (torch.randn(1, 4),)
# -----
# CASE: after-fold-batch-norm
# RUN: graph(fold-batch-norm,dce)
# CHECK: %conv = call_module[conv](%x)
# CHECK-NEXT: output(%conv)


class ConvBn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x))


def build():
    return ConvBn(), (torch.randn(1, 2, 3, 3),)
