# Goldens for canonicalize's multihead-attention rule (qpasses.ir.attention_rules).
# -----
# CASE: self-attention-batch-first
# RUN: graph(canonicalize,dce)
# CHECK: %x = placeholder : f32[2,5,8]
# CHECK-NEXT: %attn_n = call_method[size](%x, 0)
# CHECK-NEXT: %attn_l = call_method[size](%x, 1)
# CHECK-NEXT: %attn_q_proj = call_module[attn.q_proj](%x) : f32[2,5,8]
# CHECK-NEXT: %attn_q_heads = call_method[reshape](%attn_q_proj, %attn_n, %attn_l, 2, 4) : f32[2,5,2,4]
# CHECK-NEXT: %attn_q = call_method[transpose](%attn_q_heads, 1, 2) : f32[2,2,5,4]
# CHECK-NEXT: %attn_k_proj = call_module[attn.k_proj](%x) : f32[2,5,8]
# CHECK-NEXT: %attn_k_heads = call_method[reshape](%attn_k_proj, %attn_n, %attn_l, 2, 4) : f32[2,5,2,4]
# CHECK-NEXT: %attn_k = call_method[transpose](%attn_k_heads, 1, 2) : f32[2,2,5,4]
# CHECK-NEXT: %attn_v_proj = call_module[attn.v_proj](%x) : f32[2,5,8]
# CHECK-NEXT: %attn_v_heads = call_method[reshape](%attn_v_proj, %attn_n, %attn_l, 2, 4) : f32[2,5,2,4]
# CHECK-NEXT: %attn_v = call_method[transpose](%attn_v_heads, 1, 2) : f32[2,2,5,4]
# CHECK-NEXT: %attn_kt = call_method[transpose](%attn_k, -2, -1) : f32[2,2,4,5]
# CHECK-NEXT: %attn_scores = call_function[torch.matmul](%attn_q, %attn_kt) : f32[2,2,5,5]
# CHECK-NEXT: %attn_attn = call_function[torch.softmax](%attn_scores, -1) : f32[2,2,5,5]
# CHECK-NEXT: %attn_context = call_function[torch.matmul](%attn_attn, %attn_v) : f32[2,2,5,4]
# CHECK-NEXT: %attn_context_t = call_method[transpose](%attn_context, 1, 2) : f32[2,5,2,4]
# CHECK-NEXT: %attn_merged = call_method[reshape](%attn_context_t, %attn_n, %attn_l, 8) : f32[2,5,8]
# CHECK-NEXT: %attn_out_proj = call_module[attn.out_proj](%attn_merged) : f32[2,5,8]
# CHECK-NEXT: output(%attn_out_proj)
# CHECK-NOT: getitem


class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        out, _ = self.attn(x, x, x, need_weights=False)
        return out


def build():
    return SelfAttention(), (torch.randn(2, 5, 8),)
# -----
# CASE: cross-attention-seq-first-with-averaged-weights
# RUN: graph(canonicalize,dce)
# CHECK: %attn_query_bf = call_method[transpose](%x, 0, 1) : f32[2,3,6]
# CHECK-NEXT: %attn_key_bf = call_method[transpose](%mem, 0, 1) : f32[2,4,6]
# CHECK-NEXT: %attn_n = call_method[size](%attn_query_bf, 0)
# CHECK-NEXT: %attn_l = call_method[size](%attn_query_bf, 1)
# CHECK-NEXT: %attn_s = call_method[size](%attn_key_bf, 1)
# CHECK-NEXT: %attn_q_proj = call_module[attn.q_proj](%attn_query_bf) : f32[2,3,6]
# CHECK: %attn_k_proj = call_module[attn.k_proj](%attn_key_bf) : f32[2,4,6]
# CHECK: %attn_v_proj = call_module[attn.v_proj](%attn_key_bf) : f32[2,4,6]
# CHECK: %attn_scores = call_function[torch.matmul](%attn_q, %attn_kt) : f32[2,3,3,4]
# CHECK-NEXT: %attn_attn = call_function[torch.softmax](%attn_scores, -1) : f32[2,3,3,4]
# CHECK: %attn_out_proj = call_module[attn.out_proj](%attn_merged) : f32[2,3,6]
# CHECK-NEXT: %attn_out = call_method[transpose](%attn_out_proj, 0, 1) : f32[3,2,6]
# CHECK-NEXT: %attn_weights = call_method[mean](%attn_attn, 1) : f32[2,3,4]
# CHECK-NEXT: %add = call_function[operator.add](%attn_out, 1)
# CHECK-NEXT: output((%add, %attn_weights))


class CrossAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(6, 3)

    def forward(self, x, mem):
        out, w = self.attn(x, mem, mem)
        return out + 1, w


def build():
    return CrossAttention(), (torch.randn(3, 2, 6), torch.randn(4, 2, 6))
# -----
# CASE: masked-attention-stays-a-leaf
# RUN: graph(canonicalize)
# CHECK-UNCHANGED
# CHECK: call_module[attn](%x, %x, %x, attn_mask=%mask, need_weights=False)


class Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.register_buffer("mask", torch.zeros(3, 3, dtype=torch.bool))

    def forward(self, x):
        return self.attn(x, x, x, attn_mask=self.mask, need_weights=False)[0]


def build():
    return Masked(), (torch.randn(2, 3, 4),)
