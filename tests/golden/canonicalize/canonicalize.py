# Goldens for canonicalize: one spelling per operation, functional and out-of-place.
# -----
# CASE: modules-methods-and-aliases
# RUN: graph(canonicalize)
# CHECK: %flat = call_function[torch.flatten](%x, 1) : f32[2,12]
# CHECK-NEXT: %fc = call_module[fc](%flat) : f32[2,3]
# CHECK-NEXT: = call_function[torch.relu](%fc) : f32[2,3]
# CHECK-NEXT: = call_function[operator.add]
# CHECK-NOT: call_module[drop]
# CHECK-NOT: call_module[id]
# CHECK: output(


class Aliases(nn.Module):
    def __init__(self):
        super().__init__()
        self.flat = nn.Flatten()
        self.fc = nn.Linear(12, 3)
        self.drop = nn.Dropout()
        self.id = nn.Identity()

    def forward(self, x):
        y = self.fc(self.flat(x)).clamp(min=0)
        return self.id(self.drop(torch.add(y, y)))


def build():
    return Aliases(), (torch.randn(2, 3, 2, 2),)
# -----
# CASE: activation-modules-become-functions
# RUN: graph(canonicalize,dce)
# CHECK: call_function[torch.relu]
# CHECK: call_function[torch.nn.functional.relu6]
# CHECK: call_function[torch.sigmoid]
# CHECK-NOT: call_module[


def build():
    return nn.Sequential(nn.ReLU(), nn.ReLU6(), nn.Sigmoid()), (torch.randn(2, 5),)
# -----
# CASE: already-canonical
# RUN: graph(canonicalize)
# CHECK-UNCHANGED
# CHECK: %relu = call_function[torch.relu](%x)
# CHECK-NEXT: %add = call_function[operator.add](%relu, %x)


class Canonical(nn.Module):
    def forward(self, x):
        return torch.relu(x) + x


def build():
    return Canonical(), (torch.randn(3),)
# -----
# CASE: in-place-on-an-input-stays
# Rationale: relu_ on a placeholder mutates the caller's tensor; it is left as it is.
# RUN: graph(canonicalize)
# CHECK-UNCHANGED
# CHECK: relu_


class InPlaceInput(nn.Module):
    def forward(self, x):
        return torch.relu_(x)


def build():
    return InPlaceInput(), (torch.randn(3),)
