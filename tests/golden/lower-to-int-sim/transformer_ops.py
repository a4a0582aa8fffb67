# Goldens for the transformer kernels (issue 14 part 2): Q·Kᵀ of two quantized linear outputs is
# one IntMatMul (its requantization onto the scale table's grid fused), the scale a table, softmax
# an IntSoftmax, attention·V an IntMatMul onto the quantizer before the residual add, LayerNorm an
# IntLayerNorm onto the quantizer before the last linear; no float island.
# -----
# CASE: attention-and-layer-norm
# RUN: graph(canonicalize,annotate-bitwidths{first-last-bits=none},insert-fake-quant{act-scheme=pact pact-alpha=4.0},calibrate{method=trained},lower-to-int-sim)
# CHECK: %bmm = call_module[int_sim.bmm](%q, %transpose) : i64[2,4,4]
# CHECK-NEXT: %mul = call_module[int_sim.mul](%bmm) : i64[2,4,4]
# CHECK-NEXT: %softmax = call_module[int_sim.softmax](%mul) : i64[2,4,4]
# CHECK: %bmm_1 = call_module[int_sim.bmm_1](%softmax, %v) : i64[2,4,8]
# CHECK-NEXT: %add = call_module[int_sim.add](%activation_fake_quant_x, %bmm_1) : i64[2,4,8]
# CHECK-NEXT: %norm = call_module[int_sim.norm](%add) : i64[2,4,8]
# CHECK-NEXT: %out = call_module[out](%norm) : i64[2,4,3]
# CHECK-NOT: float-island


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        a = torch.softmax(torch.bmm(self.q(x), self.k(x).transpose(1, 2)) * 0.35, -1)
        return self.out(self.norm(x + torch.bmm(a, self.v(x))))


def build():
    torch.manual_seed(0)
    return Attn().eval(), (torch.randn(2, 4, 8),)
