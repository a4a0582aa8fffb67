# Goldens for fold-batch-norm: which BatchNorms fold into their producer and which stay.
# -----
# CASE: conv-bn-relu-and-linear-bn1d
# RUN: graph(fold-batch-norm)
# CHECK-LABEL: graph {
# CHECK-NEXT: %x = placeholder : f32[1,3,6,6]
# CHECK-NEXT: %conv = call_module[conv](%x) : f32[1,4,4,4]
# CHECK-NEXT: %relu = call_function[torch.nn.functional.relu](%conv, inplace=False)
# CHECK: %fc = call_module[fc](%mean) : f32[1,2]
# CHECK-NEXT: output(%fc)
# CHECK-NOT: call_module[bn


class ConvBnLinearBn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)
        self.bn1 = nn.BatchNorm1d(2)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        return self.bn1(self.fc(y.mean((2, 3))))


def build():
    return ConvBnLinearBn(), (torch.randn(1, 3, 6, 6),)
# -----
# CASE: conv-output-has-another-user
# Rationale: the add needs the un-normalized conv output, so the BatchNorm stays.
# RUN: graph(fold-batch-norm)
# CHECK-UNCHANGED
# CHECK: %conv = call_module[conv](%x)
# CHECK-NEXT: %bn = call_module[bn](%conv)
# CHECK-NEXT: %add = call_function[operator.add](%bn, %conv)


class SharedConvOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        c = self.conv(x)
        return self.bn(c) + c


def build():
    return SharedConvOutput(), (torch.randn(1, 3, 6, 6),)
# -----
# CASE: bn-without-a-producer-layer
# RUN: graph(fold-batch-norm)
# CHECK-UNCHANGED
# CHECK: %bn = call_module[bn](%input_1) : f32[2,4,3,3]


def build():
    m = nn.Sequential()
    m.add_module("bn", nn.BatchNorm2d(4))
    return m, (torch.randn(2, 4, 3, 3),)
# -----
# CASE: resnet-style-block
# RUN: graph(fold-batch-norm,dce)
# CHECK: %conv1 = call_module[conv1](%x) : f32[1,4,5,5]
# CHECK-NEXT: %relu = call_function[torch.relu](%conv1)
# CHECK-NEXT: %conv2 = call_module[conv2](%relu)
# CHECK-NEXT: %down_0 = call_module[down.0](%x)
# CHECK-NEXT: %add = call_function[operator.add](%conv2, %down_0)
# CHECK-COUNT-1: call_function[torch.relu](%add)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.down = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + self.down(x))


def build():
    return Block(), (torch.randn(1, 4, 5, 5),)
