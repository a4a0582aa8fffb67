# Goldens for canonicalize's swin-* rules (qpasses.ir.swin_rules): torchvision's fx.wrap'ped
# shifted_window_attention / _get_relative_position_bias / _patch_merging_pad become traced ops.
# -----
# CASE: shifted-window-attention-padded-and-shifted
# RUN: graph(canonicalize,dce)
# CHECK: %x = placeholder : f32[1,6,7,8]
# CHECK: %_get_relative_position_bias_gather = call_function[operator.getitem](%attn_relative_position_bias_table, %attn_relative_position_index) : f32[256,2]
# CHECK-NEXT: %_get_relative_position_bias_pairs = call_method[reshape](%_get_relative_position_bias_gather, 16, 16, -1) : f32[16,16,2]
# CHECK-NEXT: %_get_relative_position_bias_heads = call_method[permute](%_get_relative_position_bias_pairs, 2, 0, 1) : f32[2,16,16]
# CHECK-NEXT: %_get_relative_position_bias_bias = call_method[unsqueeze](%_get_relative_position_bias_heads, 0) : f32[1,2,16,16]
# CHECK-NEXT: %shifted_window_attention_pad = call_function[torch.nn.functional.pad](%x, (0, 0, 0, 1, 0, 2)) : f32[1,8,8,8]
# CHECK-NEXT: %shifted_window_attention_shift = call_function[torch.roll](%shifted_window_attention_pad, (-2, -2), (1, 2)) : f32[1,8,8,8]
# CHECK-NEXT: %shifted_window_attention_reshape = call_method[reshape](%shifted_window_attention_shift, -1, 2, 4, 2, 4, 8) : f32[1,2,4,2,4,8]
# CHECK-NEXT: %shifted_window_attention_permute = call_method[permute](%shifted_window_attention_reshape, 0, 1, 3, 2, 4, 5) : f32[1,2,2,4,4,8]
# CHECK-NEXT: %shifted_window_attention_windows = call_method[reshape](%shifted_window_attention_permute, -1, 16, 8) : f32[4,16,8]
# CHECK-NEXT: %shifted_window_attention_q_proj = call_module[attn.qkv.q](%shifted_window_attention_windows) : f32[4,16,8]
# CHECK-NEXT: %shifted_window_attention_q_heads = call_method[reshape](%shifted_window_attention_q_proj, -1, 16, 2, 4) : f32[4,16,2,4]
# CHECK-NEXT: %shifted_window_attention_q = call_method[transpose](%shifted_window_attention_q_heads, 1, 2) : f32[4,2,16,4]
# CHECK-NEXT: %shifted_window_attention_k_proj = call_module[attn.qkv.k](%shifted_window_attention_windows) : f32[4,16,8]
# CHECK: %shifted_window_attention_v_proj = call_module[attn.qkv.v](%shifted_window_attention_windows) : f32[4,16,8]
# CHECK: %shifted_window_attention_kt = call_method[transpose](%shifted_window_attention_k, -2, -1) : f32[4,2,4,16]
# CHECK-NEXT: %shifted_window_attention_scores = call_function[torch.matmul](%shifted_window_attention_q, %shifted_window_attention_kt) : f32[4,2,16,16]
# CHECK-NEXT: %shifted_window_attention_biased = call_function[operator.add](%shifted_window_attention_scores, %_get_relative_position_bias_bias) : f32[4,2,16,16]
# CHECK-NEXT: %shifted_window_attention_shift_mask = get_attr[attn.shift_mask] : f32[1,4,1,16,16]
# CHECK-NEXT: %shifted_window_attention_per_window = call_method[reshape](%shifted_window_attention_biased, -1, 4, 2, 16, 16) : f32[1,4,2,16,16]
# CHECK-NEXT: %shifted_window_attention_masked = call_function[operator.add](%shifted_window_attention_per_window, %shifted_window_attention_shift_mask) : f32[1,4,2,16,16]
# CHECK-NEXT: %shifted_window_attention_unmasked = call_method[reshape](%shifted_window_attention_masked, -1, 2, 16, 16) : f32[4,2,16,16]
# CHECK-NEXT: %shifted_window_attention_attn = call_function[torch.softmax](%shifted_window_attention_unmasked, -1) : f32[4,2,16,16]
# CHECK-NEXT: %shifted_window_attention_context = call_function[torch.matmul](%shifted_window_attention_attn, %shifted_window_attention_v) : f32[4,2,16,4]
# CHECK-NEXT: %shifted_window_attention_context_t = call_method[transpose](%shifted_window_attention_context, 1, 2) : f32[4,16,2,4]
# CHECK-NEXT: %shifted_window_attention_merged = call_method[reshape](%shifted_window_attention_context_t, -1, 16, 8) : f32[4,16,8]
# CHECK-NEXT: %shifted_window_attention_proj = call_module[attn.proj](%shifted_window_attention_merged) : f32[4,16,8]
# CHECK-NEXT: %shifted_window_attention_reshape_1 = call_method[reshape](%shifted_window_attention_proj, -1, 2, 2, 4, 4, 8) : f32[1,2,2,4,4,8]
# CHECK-NEXT: %shifted_window_attention_permute_1 = call_method[permute](%shifted_window_attention_reshape_1, 0, 1, 3, 2, 4, 5) : f32[1,2,4,2,4,8]
# CHECK-NEXT: %shifted_window_attention_unwindowed = call_method[reshape](%shifted_window_attention_permute_1, -1, 8, 8, 8) : f32[1,8,8,8]
# CHECK-NEXT: %shifted_window_attention_unshift = call_function[torch.roll](%shifted_window_attention_unwindowed, (2, 2), (1, 2)) : f32[1,8,8,8]
# CHECK-NEXT: %shifted_window_attention_unpad = call_function[operator.getitem](%shifted_window_attention_unshift, (None:None:None, None:6:None, None:7:None, None:None:None)) : f32[1,6,7,8]
# CHECK-NEXT: %_patch_merging_pad_pad = call_function[torch.nn.functional.pad](%shifted_window_attention_unpad, (0, 0, 0, 1, 0, 0)) : f32[1,6,8,8]
# CHECK-NEXT: %_patch_merging_pad_x0 = call_function[operator.getitem](%_patch_merging_pad_pad, (Ellipsis, 0:None:2, 0:None:2, None:None:None)) : f32[1,3,4,8]
# CHECK-NEXT: %_patch_merging_pad_x1 = call_function[operator.getitem](%_patch_merging_pad_pad, (Ellipsis, 1:None:2, 0:None:2, None:None:None)) : f32[1,3,4,8]
# CHECK-NEXT: %_patch_merging_pad_x2 = call_function[operator.getitem](%_patch_merging_pad_pad, (Ellipsis, 0:None:2, 1:None:2, None:None:None)) : f32[1,3,4,8]
# CHECK-NEXT: %_patch_merging_pad_x3 = call_function[operator.getitem](%_patch_merging_pad_pad, (Ellipsis, 1:None:2, 1:None:2, None:None:None)) : f32[1,3,4,8]
# CHECK-NEXT: %_patch_merging_pad_cat = call_function[torch.cat]([%_patch_merging_pad_x0, %_patch_merging_pad_x1, %_patch_merging_pad_x2, %_patch_merging_pad_x3], 3) : f32[1,3,4,32]
# CHECK-NEXT: %merge_norm = call_module[merge.norm](%_patch_merging_pad_cat) : f32[1,3,4,32]
# CHECK-NOT: shifted_window_attention(
# CHECK-NOT: get_attr[attn.qkv.weight]


from torchvision.models.swin_transformer import PatchMerging, ShiftedWindowAttention


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = ShiftedWindowAttention(8, [4, 4], [2, 2], 2)
        self.merge = PatchMerging(8)

    def forward(self, x):
        return self.merge(self.attn(x))


def build():
    return Block(), (torch.randn(1, 6, 7, 8),)
# -----
# CASE: window-covers-input-no-shift-no-pad
# RUN: graph(canonicalize,dce)
# CHECK: %x = placeholder : f32[2,4,4,8]
# CHECK-NOT: torch.roll
# CHECK-NOT: pad
# CHECK: %shifted_window_attention_windows = call_method[reshape](%shifted_window_attention_permute, -1, 16, 8) : f32[2,16,8]
# CHECK-NOT: shift_mask
# CHECK: %shifted_window_attention_attn = call_function[torch.softmax](%shifted_window_attention_biased, -1) : f32[2,2,16,16]
# CHECK-NOT: torch.roll
# CHECK: output(%shifted_window_attention_unwindowed)


from torchvision.models.swin_transformer import ShiftedWindowAttention


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = ShiftedWindowAttention(8, [4, 4], [2, 2], 2)

    def forward(self, x):
        return self.attn(x)


def build():
    return Block(), (torch.randn(2, 4, 4, 8),)
