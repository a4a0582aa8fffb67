# Goldens for prune-zero-bit-channels. The 0-bit kernels come from annotate-bitwidths configs in
# this directory (per-kernel lists with 0s; the paths are relative to the repository root, where
# the tests run). print<channel-groups> after the pass shows how every layer's weight was sliced:
# ``producer`` is weight dim 0, ``consumer`` weight dim 1.
# -----
# CASE: chain-consumer-input-sliced
# conv a loses kernels 1 and 3 (no bias, so those channels carry exactly 0); conv b reads the
# pruned tensor, so its weight loses the same input channels.
# RUN: graph(annotate-bitwidths{config=tests/golden/prune-zero-bit-channels/chain.json},prune-zero-bit-channels,print<channel-groups>)
# CHECK-LABEL: group 0: 2 channels, 2 prunable; producers: a
# CHECK-NEXT: producer   a (a.weight) dim 0 [0:2]
# CHECK-NEXT: tensor     relu (relu) dim 1 [0:2]
# CHECK-NEXT: consumer   b (b.weight) dim 1 [0:2]
# CHECK-LABEL: graph {
# CHECK: %a = call_module[a](%x) : f32[1,2,6,6] {w=i{4x2} act=i8 pruned=2}
# CHECK-NEXT: %relu = call_function[torch.relu](%a) : f32[1,2,6,6]
# CHECK-NEXT: %b = call_module[b](%relu) : f32[1,2,6,6] {w=i8 act=u8}


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.b = nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def build():
    torch.manual_seed(0)
    return Chain(), (torch.randn(1, 3, 6, 6),)
# -----
# CASE: constant-channel-kept-in-exact-mode
# Rationale: a's bias (0.5) survives the ReLU and reaches b, a padded conv: folding the constant
# into b's bias would be wrong on the border, so mode=exact keeps both 0-bit channels.
# RUN: graph(annotate-bitwidths{config=tests/golden/prune-zero-bit-channels/chain.json},prune-zero-bit-channels)
# CHECK: %a = call_module[a](%x) : f32[1,4,6,6] {w=i{4,0,4,0} act=i8}
# CHECK-NEXT: %relu = call_function[torch.relu](%a) : f32[1,4,6,6]


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def build():
    torch.manual_seed(0)
    m = Chain()
    with torch.no_grad():
        m.a.bias.fill_(0.5)
    return m, (torch.randn(1, 3, 6, 6),)
# -----
# CASE: constant-channel-folded-in-fold-constant-mode
# The same model: mode=fold-constant folds the constant into b's bias and removes the channels.
# RUN: graph(annotate-bitwidths{config=tests/golden/prune-zero-bit-channels/chain.json},prune-zero-bit-channels{mode=fold-constant})
# CHECK: %a = call_module[a](%x) : f32[1,2,6,6] {w=i{4x2} act=i8 pruned=2}
# CHECK-NEXT: %relu = call_function[torch.relu](%a) : f32[1,2,6,6]


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def build():
    torch.manual_seed(0)
    m = Chain()
    with torch.no_grad():
        m.a.bias.fill_(0.5)
    return m, (torch.randn(1, 3, 6, 6),)
# -----
# CASE: residual-add-prunes-the-shared-group
# a and b feed one add, so their output channels are one group. Channel 1 is 0-bit in both and
# goes from a, b, the add and c's input; channel 3 is 0-bit only in a and stays (a keeps its
# 0-bit kernel).
# RUN: graph(annotate-bitwidths{config=tests/golden/prune-zero-bit-channels/residual.json},prune-zero-bit-channels,print<channel-groups>)
# CHECK-LABEL: group 1: 3 channels, 3 prunable; producers: a, b
# CHECK-NEXT: producer   a (a.weight) dim 0 [0:3]
# CHECK-NEXT: producer   b (b.weight) dim 0 [0:3]
# CHECK-NEXT: tensor     add (add) dim 1 [0:3]
# CHECK-NEXT: tensor     relu_1 (relu) dim 1 [0:3]
# CHECK-NEXT: consumer   c (c.weight) dim 1 [0:3]
# CHECK-LABEL: graph {
# CHECK: %stem = call_module[stem](%x) : f32[1,4,6,6] {w=i8 act=i8}
# CHECK-NEXT: %relu = call_function[torch.relu](%stem) : f32[1,4,6,6]
# CHECK-NEXT: %a = call_module[a](%relu) : f32[1,3,6,6] {w=i{4x2,0} act=u8 pruned=1}
# CHECK-NEXT: %b = call_module[b](%relu) : f32[1,3,6,6] {w=i{4x3} act=u8 pruned=1}
# CHECK-NEXT: %add = call_function[operator.add](%a, %b) : f32[1,3,6,6]
# CHECK-NEXT: %relu_1 = call_function[torch.relu](%add) : f32[1,3,6,6]
# CHECK-NEXT: %c = call_module[c](%relu_1) : f32[1,2,6,6]


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.a = nn.Conv2d(4, 4, 1, bias=False)
        self.b = nn.Conv2d(4, 4, 1, bias=False)
        self.c = nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        return self.c(torch.relu(self.a(x) + self.b(x)))


def build():
    torch.manual_seed(0)
    return Residual(), (torch.randn(1, 3, 6, 6),)
# -----
# CASE: concat-offsets
# a loses channel 0 and b channel 1: the concat's channels 0 and 3 go, and c's input slices
# follow the concat offsets (a's channel at 0, b's at 1:3).
# RUN: graph(annotate-bitwidths{config=tests/golden/prune-zero-bit-channels/concat.json},prune-zero-bit-channels,print<channel-groups>)
# CHECK-LABEL: group 0: 1 channels, 1 prunable; producers: a
# CHECK-NEXT: producer   a (a.weight) dim 0 [0:1]
# CHECK-NEXT: tensor     cat (cat) dim 1 [0:1]
# CHECK-NEXT: consumer   c (c.weight) dim 1 [0:1]
# CHECK-NEXT: group 1: 2 channels, 2 prunable; producers: b
# CHECK-NEXT: producer   b (b.weight) dim 0 [0:2]
# CHECK-NEXT: tensor     cat (cat) dim 1 [1:3]
# CHECK-NEXT: consumer   c (c.weight) dim 1 [1:3]
# CHECK-LABEL: graph {
# CHECK: %a = call_module[a](%x) : f32[1,1,6,6] {w=i{4} act=i8 pruned=1}
# CHECK-NEXT: %b = call_module[b](%x) : f32[1,2,6,6] {w=i{4x2} act=i8 pruned=1}
# CHECK-NEXT: %cat = call_function[torch.cat]([%a, %b], dim=1) : f32[1,3,6,6]
# CHECK-NEXT: %c = call_module[c](%cat) : f32[1,2,6,6]


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 2, 1, bias=False)
        self.b = nn.Conv2d(3, 3, 1, bias=False)
        self.c = nn.Conv2d(5, 2, 1)

    def forward(self, x):
        return self.c(torch.cat([self.a(x), self.b(x)], dim=1))


def build():
    torch.manual_seed(0)
    return Concat(), (torch.randn(1, 3, 6, 6),)
# -----
# CASE: unknown-mode
# RUN: graph(prune-zero-bit-channels{mode=approx})
# EXPECT-ERROR: option 'mode' of pass 'prune-zero-bit-channels': 'approx' is not one of exact, fold-constant
# CHECK: pipeline:1:36: error:
# CHECK-NEXT: graph(prune-zero-bit-channels{mode=approx})
# CHECK-NEXT: {{^}}                                     ^{{$}}
