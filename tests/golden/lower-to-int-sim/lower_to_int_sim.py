# Goldens for the lower-to-int-sim pipeline and its steps. PACT activations with a fixed clip and
# calibrate{method=trained} give a calibrated graph without calibration data.
# -----
# CASE: fused-conv-residual-add-pool-float-island
# RUN: graph(annotate-bitwidths{first-last-bits=none},insert-fake-quant{act-scheme=pact pact-alpha=4.0},calibrate{method=trained},lower-to-int-sim,print<int-sim-kernels>)
# CHECK-LABEL: // ----- int-sim-kernels -----
# CHECK: conv1
# CHECK-NEXT: conv2
# CHECK-NEXT: fc
# CHECK-LABEL: graph {
# CHECK: %activation_fake_quant_x = call_module[int_sim.activation_fake_quant_x](%x)
# CHECK-NEXT: %conv1 = call_module[conv1](%activation_fake_quant_x) : i64[1,4,6,6]
# CHECK-NEXT: %conv2 = call_module[conv2](%conv1) : i64[1,4,6,6]
# CHECK-NEXT: %add = call_module[int_sim.add](%conv2, %conv1) : i64[1,4,6,6]
# CHECK-NEXT: %max_pool2d = call_module[int_sim.max_pool2d](%add) : i64[1,4,3,3]
# CHECK-NEXT: %max_pool2d_dequant = call_module[int_sim.max_pool2d_dequant](%max_pool2d) : f32[1,4,3,3]
# CHECK-NEXT: %erf = call_function[torch.erf](%max_pool2d_dequant) : f32[1,4,3,3] {float-island}
# CHECK-NEXT: %mean = call_method[mean](%erf, (2, 3)) : f32[1,4] {float-island}
# CHECK-NEXT: %activation_fake_quant_mean = call_module[int_sim.activation_fake_quant_mean](%mean) : i64[1,4]
# CHECK-NEXT: %fc = call_module[fc](%activation_fake_quant_mean) : i64[1,2]
# CHECK-NEXT: %fc_dequant = call_module[int_sim.fc_dequant](%fc) : f32[1,2]
# CHECK-NEXT: output(%fc_dequant)
# CHECK-NOT: relu


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = F.relu(self.conv1(x))
        z = F.relu(self.conv2(y)) + y
        z = torch.erf(F.max_pool2d(z, 2))          # no integer rule for erf: a float island
        return self.fc(z.mean((2, 3)))


def build():
    torch.manual_seed(0)
    return Net(), (torch.randn(1, 3, 6, 6),)
# -----
# CASE: builder-alone-leaves-requantize-unfused
# RUN: graph(annotate-bitwidths{first-last-bits=none},insert-fake-quant{act-scheme=pact pact-alpha=4.0},calibrate{method=trained},lower-fake-quant-ops)
# CHECK: %conv1 = call_module[conv1](%activation_fake_quant_x) : i64[1,4,6,6]
# CHECK-NEXT: %activation_fake_quant_relu = call_module[int_sim.activation_fake_quant_relu](%conv1) : i64[1,4,6,6]
# CHECK-NEXT: %conv2 = call_module[conv2](%activation_fake_quant_relu)


class ConvReluConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(F.relu(self.conv1(x)))


def build():
    torch.manual_seed(0)
    return ConvReluConv(), (torch.randn(1, 3, 6, 6),)
# -----
# CASE: fuse-requantize-folds-it-into-the-layer
# RUN: graph(annotate-bitwidths{first-last-bits=none},insert-fake-quant{act-scheme=pact pact-alpha=4.0},calibrate{method=trained},lower-fake-quant-ops,fuse-requantize)
# CHECK: %conv1 = call_module[conv1](%activation_fake_quant_x) : i64[1,4,6,6]
# CHECK-NEXT: %conv2 = call_module[conv2](%conv1)


class ConvReluConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(F.relu(self.conv1(x)))


def build():
    torch.manual_seed(0)
    return ConvReluConv(), (torch.randn(1, 3, 6, 6),)
# -----
# CASE: relowering-switches-the-backend-only
# RUN: graph(annotate-bitwidths{first-last-bits=none},insert-fake-quant{act-scheme=pact pact-alpha=4.0},calibrate{method=trained},lower-to-int-sim,lower-to-int-sim{backend=reference},print<int-sim-kernels>)
# CHECK: conv1    reference
# CHECK: rounding=gemmlowp backend=reference


class ConvReluConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(F.relu(self.conv1(x)))


def build():
    torch.manual_seed(0)
    return ConvReluConv(), (torch.randn(1, 3, 6, 6),)
# -----
# CASE: relowering-with-another-contract-fails
# RUN: graph(annotate-bitwidths{first-last-bits=none},insert-fake-quant{act-scheme=pact pact-alpha=4.0},calibrate{method=trained},lower-to-int-sim,lower-to-int-sim{rounding=hawq})
# EXPECT-ERROR: the graph is already lowered with rounding=gemmlowp multiplier-bits=31
# CHECK: pass 'lower-fake-quant-ops'


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), (torch.randn(1, 3, 6, 6),)
# -----
# CASE: prints-as-one-element
# ASSUME: calibrated
# RUN: graph(lower-to-int-sim{rounding=single})
# CHECK: graph(lower-to-int-sim{backend=fast bias=float bias-frac-bits=none gate-bits=12 keep-fake-quant=true lut-bits=16 multiplier-bits=31 rounding=single})
# -----
# CASE: needs-a-calibrated-graph
# RUN: graph(lower-to-int-sim)
# EXPECT-ERROR: pass 'lower-fake-quant-ops' (element 0 of the pipeline) requires property 'calibrated'
# -----
# CASE: option-errors-name-the-pipeline
# ASSUME: calibrated
# RUN: graph(lower-to-int-sim{lut-bits=20})
# EXPECT-ERROR: option 'lut-bits' of pass 'lower-to-int-sim': must be in 8..16, got 20
# CHECK: {{^}}                                  ^
