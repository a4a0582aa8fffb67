# Goldens for emulate-int-sim: an engine node after the inputs, an emulate_point node after each
# activation quantizer (taking over its name), the emulated outputs, and each fake-quant layer gets
# the engine's values (it takes the integer graph's accumulator); lowering removes them again.
# PACT activations with a fixed clip and calibrate{method=trained}: calibrated without data.
# -----
# CASE: emulation-nodes
# RUN: graph(annotate-bitwidths{first-last-bits=none},insert-fake-quant{act-scheme=pact pact-alpha=4.0},calibrate{method=trained},emulate-int-sim)
# CHECK: // record qpasses.emulation: rounding=gemmlowp, multiplier-bits=31, bias-frac-bits=auto, 2 points, 0 float islands
# CHECK-LABEL: graph {
# CHECK: %int_sim_values = call_module[int_sim_emulation](%x)
# CHECK-NEXT: %activation_fake_quant_x_fq = call_module[activation_fake_quant.x](%x) : f32[1,3,6,6]
# CHECK-NEXT: %activation_fake_quant_x = call_function[qpasses.modules.emulation.emulate_point](%activation_fake_quant_x_fq, %int_sim_values, 'activation_fake_quant_x') : f32[1,3,6,6]
# CHECK-NEXT: %conv1 = call_module[conv1](%activation_fake_quant_x, emulation=%int_sim_values)
# CHECK: %fc = call_module[fc](%activation_fake_quant_flatten, emulation=%int_sim_values)
# CHECK: %emulated_output = call_function[qpasses.modules.emulation.emulate_output](%fc, %int_sim_values)
# CHECK-NEXT: output(%emulated_output)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = F.relu(self.conv1(x))
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


def build():
    torch.manual_seed(0)
    return Net().eval(), (torch.randn(1, 3, 6, 6),)
