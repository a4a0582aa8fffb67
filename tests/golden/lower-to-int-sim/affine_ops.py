# Goldens for per-channel affine ops (issue 14 part 3): a BatchNorm after a concatenation becomes
# one IntAffine onto the grid of the quantizer after its ReLU (the ReLU folds into its range); a
# layer scale after a permute of a linear accumulator is an IntAffine on that accumulator (the
# permute moves its channel axis, no requantization before it).
# -----
# CASE: batch-norm-after-cat
# RUN: graph(annotate-bitwidths{first-last-bits=none},insert-fake-quant{act-scheme=pact pact-alpha=4.0},calibrate{method=trained},lower-to-int-sim)
# CHECK: %cat = call_module[int_sim.cat](%a, %b) : i64[1,8,6,6]
# CHECK-NEXT: %bn = call_module[int_sim.bn](%cat) : i64[1,8,6,6]
# CHECK-NEXT: %conv = call_module[conv](%bn) : i64[1,4,6,6]
# CHECK-NOT: float-island


class CatBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(F.relu(self.bn(torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], 1))))


def build():
    torch.manual_seed(0)
    m = CatBN()
    with torch.no_grad():
        m.bn.weight.copy_(torch.tensor([1.0, -0.5, 2.0, 0.0, 0.7, -1.2, 0.3, 1.1]))
        m.bn.bias.copy_(torch.linspace(-0.3, 0.4, 8))
        m.bn.running_mean.copy_(torch.linspace(0.0, 0.5, 8))
        m.bn.running_var.copy_(torch.linspace(0.5, 1.5, 8))
    return m.eval(), (torch.randn(1, 3, 6, 6),)
# -----
# CASE: layer-scale-after-permute
# RUN: graph(annotate-bitwidths{first-last-bits=none},insert-fake-quant{act-scheme=pact pact-alpha=4.0},calibrate{method=trained},lower-to-int-sim)
# CHECK: %fc = call_module[fc](%permute) : i64[1,6,6,4]
# CHECK-NEXT: %permute_1 = call_method[permute](%fc, 0, 3, 1, 2) : i64[1,4,6,6]
# CHECK-NEXT: %mul = call_module[int_sim.mul](%permute_1) : i64[1,4,6,6]
# CHECK-NOT: float-island


class LayerScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.fc = nn.Linear(4, 4)
        self.layer_scale = nn.Parameter(torch.tensor([0.5, -1.5, 2.0, 0.25]).reshape(4, 1, 1))

    def forward(self, x):
        y = F.relu(self.dw(x)).permute(0, 2, 3, 1)
        return x + self.layer_scale * self.fc(y).permute(0, 3, 1, 2)


def build():
    torch.manual_seed(0)
    return LayerScale().eval(), (torch.randn(1, 4, 6, 6),)
