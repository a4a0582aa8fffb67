# Golden cases for insert-fake-quant: weight quantizers on module and functional layers, one
# activation node per quantized tensor, scale sharing across a residual join, per-tensor joins,
# schemes recorded in QMeta, float islands left alone, idempotence and bad annotations.
# The model: stem conv -> relu -> two convs reading one tensor -> add -> relu -> pool ->
# flatten -> functional linear on a parameter.
# -----
# CASE: shared-join-scales
# RUN: graph(annotate-bitwidths{weight-bits=4 act-bits=4},insert-fake-quant)
# the image input gets its own quantizer, right after the placeholder
# CHECK: %x = placeholder : f32[1,3,6,6]
# CHECK-NEXT: %activation_fake_quant_x = call_module[activation_fake_quant.x](%x) : f32[1,3,6,6] {out=i8:asymmetric}
# module layers keep their path; the weight quantizer lives inside the swapped module
# CHECK-NEXT: %stem = call_module[stem](%activation_fake_quant_x) : f32[1,4,6,6] {w=i8/ch0 act=i8:asymmetric}
# CHECK-NEXT: %relu = call_function[torch.relu](%stem)
# one node for the tensor read by both convs (unsigned: after relu)
# CHECK-NEXT: %activation_fake_quant_relu = call_module[activation_fake_quant.relu](%relu) : f32[1,4,6,6] {out=u4:asymmetric}
# CHECK-NEXT: %a = call_module[a](%activation_fake_quant_relu) : f32[1,4,6,6] {w=i4/ch0 act=u4:asymmetric}
# the join's inputs and output share ONE module (activation_fake_quant.a), called per tensor
# CHECK-NEXT: %activation_fake_quant_a = call_module[activation_fake_quant.a](%a)
# CHECK-NEXT: %b = call_module[b](%activation_fake_quant_relu)
# CHECK-NEXT: %activation_fake_quant_a_1 = call_module[activation_fake_quant.a](%b)
# CHECK-NEXT: %add = call_function[operator.add](%activation_fake_quant_a, %activation_fake_quant_a_1) : f32[1,4,6,6] {out=i4:asymmetric}
# CHECK-NEXT: %activation_fake_quant_a_2 = call_module[activation_fake_quant.a](%add)
# CHECK-NEXT: %relu_1 = call_function[torch.relu](%activation_fake_quant_a_2)
# a functional layer gets a weight quantizer node between the get_attr and the call
# CHECK: %w = get_attr[w] : f32[2,4]
# CHECK-NEXT: %weight_fake_quant_w = call_module[weight_fake_quant.w](%w) : f32[2,4]
# CHECK-NEXT: %linear = call_function[torch.nn.functional.linear](%activation_fake_quant_flatten, %weight_fake_quant_w) : f32[1,2] {w=i8/ch0 act=u4:asymmetric}


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 1)
        self.w = nn.Parameter(torch.randn(2, 4))

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = self.a(x) + self.b(x)
        return F.linear(torch.flatten(F.adaptive_avg_pool2d(torch.relu(y), 1), 1), self.w)


def build():
    torch.manual_seed(0)
    return Block(), (torch.randn(1, 3, 6, 6),)
# -----
# CASE: per-tensor-joins-and-pact
# RUN: graph(annotate-bitwidths{weight-bits=4 act-bits=4},insert-fake-quant{join-scales=per-tensor act-scheme=pact})
# one module per tensor, keyed by the producer
# CHECK: %activation_fake_quant_a = call_module[activation_fake_quant.a](%a) : f32[1,4,6,6] {out=i4:pact}
# CHECK: %activation_fake_quant_b = call_module[activation_fake_quant.b](%b) : f32[1,4,6,6] {out=i4:pact}
# CHECK-NEXT: %add = call_function[operator.add](%activation_fake_quant_a, %activation_fake_quant_b) : f32[1,4,6,6] {out=i4:pact}
# CHECK-NEXT: %activation_fake_quant_add = call_module[activation_fake_quant.add](%add)
# CHECK-NOT: activation_fake_quant_a_1


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 1)
        self.w = nn.Parameter(torch.randn(2, 4))

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = self.a(x) + self.b(x)
        return F.linear(torch.flatten(F.adaptive_avg_pool2d(torch.relu(y), 1), 1), self.w)


def build():
    torch.manual_seed(0)
    return Block(), (torch.randn(1, 3, 6, 6),)
# -----
# CASE: dorefa-weights-and-a-float-island
# RUN: graph(annotate-bitwidths{weight-bits=4 act-bits=4 skip={a}},insert-fake-quant{weight-scheme=dorefa})
# CHECK: %stem = call_module[stem](%activation_fake_quant_x) : f32[1,4,6,6] {w=i8/ch0:dorefa act=i8:asymmetric}
# the skipped layer reads the float tensor and gets no quantizer of its own
# CHECK: %a = call_module[a](%relu) : f32[1,4,6,6] {float-island}
# CHECK: %b = call_module[b](%activation_fake_quant_relu) : f32[1,4,6,6] {w=i4/ch0:dorefa act=u4:asymmetric}


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 1)
        self.w = nn.Parameter(torch.randn(2, 4))

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = self.a(x) + self.b(x)
        return F.linear(torch.flatten(F.adaptive_avg_pool2d(torch.relu(y), 1), 1), self.w)


def build():
    torch.manual_seed(0)
    return Block(), (torch.randn(1, 3, 6, 6),)
# -----
# CASE: second-run-is-a-no-op
# RUN: graph(annotate-bitwidths{weight-bits=4 act-bits=4},insert-fake-quant,insert-fake-quant)
# CHECK: %activation_fake_quant_relu = call_module[activation_fake_quant.relu](%relu)
# CHECK-NOT: activation_fake_quant_relu_1
# CHECK-NOT: weight_fake_quant_w_1


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 1)
        self.w = nn.Parameter(torch.randn(2, 4))

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = self.a(x) + self.b(x)
        return F.linear(torch.flatten(F.adaptive_avg_pool2d(torch.relu(y), 1), 1), self.w)


def build():
    torch.manual_seed(0)
    return Block(), (torch.randn(1, 3, 6, 6),)
# -----
# CASE: needs-bit-annotations
# RUN: graph(insert-fake-quant)
# EXPECT-ERROR: requires property 'bits-annotated'


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x)


def build():
    return Block(), (torch.randn(1, 3, 6, 6),)
# -----
# CASE: bad-option
# RUN: graph(annotate-bitwidths,insert-fake-quant{pact-alpha=0})
# EXPECT-ERROR: pact-alpha


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x)


def build():
    return Block(), (torch.randn(1, 3, 6, 6),)
