# Golden cases for act x act products: after canonicalize decomposed nn.MultiheadAttention,
# annotate-bitwidths gives each matmul an act spec and insert-fake-quant quantizes EACH operand
# (Q, Kᵀ; the softmax output, V) right after its producer; a masked attention stays a leaf and
# is a float island (its reason, listed by the report, is tested in tests/passes/test_act_products.py).
# -----
# CASE: attention-matmul-operands-are-quantized
# RUN: graph(canonicalize,dce,annotate-bitwidths{weight-bits=4 act-bits=6 first-last-bits=none},insert-fake-quant)
# CHECK: %attn_q = call_method[transpose](%attn_q_heads, 1, 2) : f32[2,2,3,4]
# CHECK-NEXT: %activation_fake_quant_attn_q = call_module[activation_fake_quant.attn_q](%attn_q) : f32[2,2,3,4] {out=i6:asymmetric}
# CHECK: %attn_kt = call_method[transpose](%attn_k, -2, -1) : f32[2,2,4,3]
# CHECK-NEXT: %activation_fake_quant_attn_kt = call_module[activation_fake_quant.attn_kt](%attn_kt) : f32[2,2,4,3] {out=i6:asymmetric}
# CHECK-NEXT: %attn_scores = call_function[torch.matmul](%activation_fake_quant_attn_q, %activation_fake_quant_attn_kt) : f32[2,2,3,3] {act=i6:asymmetric}
# CHECK-NEXT: %attn_attn = call_function[torch.softmax](%attn_scores, -1) : f32[2,2,3,3]
# the softmax output is non-negative but shares the product's spec with V (signed)
# CHECK-NEXT: %activation_fake_quant_attn_attn = call_module[activation_fake_quant.attn_attn](%attn_attn) : f32[2,2,3,3] {out=i6:asymmetric}
# CHECK-NEXT: %attn_context = call_function[torch.matmul](%activation_fake_quant_attn_attn, %activation_fake_quant_attn_v) : f32[2,2,3,4] {act=i6:asymmetric}
# CHECK: %attn_out_proj = call_module[attn.out_proj](%activation_fake_quant_attn_merged) : f32[2,3,8] {w=i4/ch0 act=i6:asymmetric}


class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def build():
    return SelfAttention(), (torch.randn(2, 3, 8),)
# -----
# CASE: masked-attention-is-a-float-island
# RUN: graph(canonicalize,annotate-bitwidths)
# CHECK: %attn = call_module[attn](%x, %x, %x, attn_mask=%mask, need_weights=False) : (f32[2,3,4], ?) {float-island}


class Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.register_buffer("mask", torch.zeros(3, 3, dtype=torch.bool))

    def forward(self, x):
        return self.attn(x, x, x, attn_mask=self.mask, need_weights=False)[0]


def build():
    return Masked(), (torch.randn(2, 3, 4),)
