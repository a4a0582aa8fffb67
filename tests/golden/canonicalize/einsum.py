# Goldens for canonicalize's einsum rule (qpasses.ir.einsum_rules).
# -----
# CASE: maxvit-relative-attention-products
# RUN: graph(canonicalize)
# CHECK: %v = placeholder : f32[1,2,2,5,4]
# CHECK-NEXT: %einsum_rhs = call_method[transpose](%k, 3, 4) : f32[1,2,2,4,5]
# CHECK-NEXT: %einsum = call_function[torch.matmul](%q, %einsum_rhs) : f32[1,2,2,5,5]
# CHECK-NEXT: %softmax = call_method[softmax](%einsum, -1) : f32[1,2,2,5,5]
# CHECK-NEXT: %einsum_1 = call_function[torch.matmul](%softmax, %v) : f32[1,2,2,5,4]
# CHECK-NEXT: output(%einsum_1)


class RelativeAttention(nn.Module):
    def forward(self, q, k, v):
        s = torch.einsum("B G H I D, B G H J D -> B G H I J", q, k)
        return torch.einsum("B G H I J, B G H J D -> B G H I D", s.softmax(-1), v)


def build():
    return RelativeAttention(), tuple(torch.randn(1, 2, 2, 5, 4) for _ in range(3))
# -----
# CASE: grouped-free-indices-flatten-and-reshape
# RUN: graph(canonicalize)
# CHECK: %einsum_lhs = call_method[transpose](%x, 1, 3) : f32[2,5,4,3]
# CHECK-NEXT: %einsum_lhs1 = call_function[torch.flatten](%einsum_lhs, 1, 2) : f32[2,20,3]
# CHECK-NEXT: %einsum_rhs = call_function[torch.flatten](%w, 2) : f32[2,3,12]
# CHECK-NEXT: %einsum_matmul = call_function[torch.matmul](%einsum_lhs1, %einsum_rhs) : f32[2,20,12]
# CHECK-NEXT: %einsum_b0 = call_method[size](%einsum_matmul, 0)
# CHECK-NEXT: %einsum_out = call_method[reshape](%einsum_matmul, %einsum_b0, -1, 4, 2, 6) : f32[2,5,4,2,6]
# CHECK-NEXT: %einsum = call_method[permute](%einsum_out, 0, 1, 3, 4, 2) : f32[2,5,2,6,4]
# CHECK-NEXT: output(%einsum)


class Grouped(nn.Module):
    def forward(self, x, w):
        return torch.einsum("nchw,ncgk->nwgkh", x, w)


def build():
    return Grouped(), (torch.randn(2, 3, 4, 5), torch.randn(2, 3, 2, 6))
# -----
# CASE: diagonal-stays-an-einsum
# RUN: graph(canonicalize)
# CHECK-UNCHANGED
# CHECK: %einsum = call_function[torch.einsum]('ii,ij->j', %x, %y) : f32[4]


class Diagonal(nn.Module):
    def forward(self, x, y):
        return torch.einsum("ii,ij->j", x, y)


def build():
    return Diagonal(), (torch.randn(3, 3), torch.randn(3, 4))
