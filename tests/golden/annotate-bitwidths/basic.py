# Golden cases for annotate-bitwidths: FracBits pinning, signedness, add joins, per-kernel
# vectors, skip. The model: stem conv -> relu -> two convs reading one tensor -> add -> relu ->
# pool -> flatten -> fc.
# -----
# CASE: w4a4-pins-first-and-last
# RUN: graph(annotate-bitwidths{weight-bits=4 act-bits=4})
# CHECK: %x = placeholder
# first layer: weights and (signed) image input at first-last-bits
# CHECK-NEXT: %stem = call_module[stem](%x) : f32[1,4,6,6] {w=i8 act=i8}
# two layers reading one post-relu tensor: one unsigned spec
# CHECK: %a = call_module[a](%relu) : f32[1,4,6,6] {w=i4 act=u4}
# CHECK-NEXT: %b = call_module[b](%relu) : f32[1,4,6,6] {w=i4 act=u4}
# the join of two conv outputs is signed, at its consumer's width
# CHECK-NEXT: %add = call_function[operator.add](%a, %b) : f32[1,4,6,6] {out=i4}
# CHECK-NOT: {w=
# last layer: weights pinned, input keeps act-bits; flatten(pool(relu)) is non-negative
# CHECK: %fc = call_module[fc](%flatten) : f32[1,2] {w=i8 act=u4}


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = self.a(x) + self.b(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(torch.relu(y), 1), 1))


def build():
    return Block(), (torch.randn(1, 3, 6, 6),)
# -----
# CASE: kernel-granularity-no-pinning
# RUN: graph(annotate-bitwidths{granularity=kernel weight-bits=3 first-last-bits=none})
# CHECK: %stem = call_module[stem](%x) : f32[1,4,6,6] {w=i{3x4} act=i8}
# CHECK: %a = call_module[a](%relu) : f32[1,4,6,6] {w=i{3x4} act=u8}
# CHECK: %fc = call_module[fc](%flatten) : f32[1,2] {w=i{3x2} act=u8}


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = self.a(x) + self.b(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(torch.relu(y), 1), 1))


def build():
    return Block(), (torch.randn(1, 3, 6, 6),)
# -----
# CASE: skip-leaves-float-islands
# RUN: graph(annotate-bitwidths{skip={a,fc}})
# CHECK: %a = call_module[a](%relu) : f32[1,4,6,6] {float-island}
# CHECK-NEXT: %b = call_module[b](%relu) : f32[1,4,6,6] {w=i8 act=u8}
# CHECK: %fc = call_module[fc](%flatten) : f32[1,2] {float-island}


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = self.a(x) + self.b(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(torch.relu(y), 1), 1))


def build():
    return Block(), (torch.randn(1, 3, 6, 6),)
# -----
# CASE: cat-of-non-negative-tensors-is-unsigned
# RUN: graph(annotate-bitwidths{act-bits=6 first-last-bits=none})
# CHECK: %cat = call_function[torch.cat]([%max_pool2d, %relu_1], 1) : f32[1,8,2,2] {out=u6}
# CHECK-NEXT: %c = call_module[c](%cat) : f32[1,2,2,2] {w=i8 act=u6}


class Cat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(4, 4, 1)
        self.c = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        p = F.max_pool2d(torch.relu(self.a(x)), 2)
        return self.c(torch.cat([p, torch.relu(self.b(p))], 1))


def build():
    return Cat(), (torch.randn(1, 3, 4, 4),)
# -----
# CASE: no-quantizable-layers-is-unchanged
# RUN: graph(annotate-bitwidths)
# CHECK-UNCHANGED
# CHECK-NOT: act=


def build():
    return nn.Sequential(nn.ReLU(), nn.Flatten()), (torch.randn(2, 3),)
