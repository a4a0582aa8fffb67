"""Fuzz: random pipelines (mostly valid options, some invalid) over the quantization passes on
random small models (conv/linear/add/cat/pool stacks) with random, sometimes malformed,
calibration data; and the search passes (insert-fracbits / insert-gmpq-supernet, a training step
or none, then freeze-fracbits / select-gmpq-policy with random targets, unreachable ones
included). Only typed errors (``PassesError``, which ``QpassesError`` extends) may come out, a
failing freeze/select leaves the graph as it was (fingerprint) so a retry works, and the user's
model is never changed. Derandomized and small: well under a minute."""
from __future__ import annotations

import warnings

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import qpasses
from passes_registry import AnalysisManager, PassContext, PassManager, PassesError, fingerprint


class _Block(nn.Module):
    def __init__(self, kind: str, c: int) -> None:
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c) if kind in ("conv-bn", "add") else None
        self.other = nn.Conv2d(c, c, 1) if kind in ("add", "cat") else None
        self.squeeze = nn.Conv2d(2 * c, c, 1) if kind == "cat" else None

    def forward(self, x):
        y = self.conv(x)
        if self.bn is not None:
            y = self.bn(y)
        y = torch.relu(y)
        if self.kind == "add":
            y = y + self.other(x)
        elif self.kind == "cat":
            y = self.squeeze(torch.cat([y, self.other(x)], 1))
        elif self.kind == "pool":
            y = nn.functional.max_pool2d(y, 2)
        return y


class _Net(nn.Module):
    def __init__(self, kinds: list[str], c: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.Sequential(*[_Block(k, c) for k in kinds])
        self.fc = nn.Linear(c, 3)

    def forward(self, x):
        y = self.blocks(torch.relu(self.stem(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


STAGES = [
    ["fold-batch-norm", "canonicalize,fold-batch-norm,dce", ""],
    ["annotate-bitwidths{weight-bits=4 act-bits=8}", "annotate-bitwidths{granularity=kernel}",
     "annotate-bitwidths{act-bits=30 first-last-bits=none}",
     "annotate-bitwidths{weight-bits=0}",                       # invalid
     "annotate-bitwidths{skip={nope}}",                         # invalid: no such layer
     "annotate-bitwidths,solve-bitwidths{target-bitops=0.0001}",
     "annotate-bitwidths,solve-bitwidths{target-bitops=1e308}",  # invalid
     "annotate-bitwidths,solve-bitwidths{target-bitops=0.0008 act-candidates=[2,4,8]}",
     "annotate-bitwidths{act-bits=6},solve-bitwidths{target-size=0.0002 act-candidates=[4,8]}",
     "annotate-bitwidths,solve-bitwidths{target-bitops=0.0001 act-candidates=[0,4]}",  # invalid
     "annotate-bitwidths{weight-bits=3},search-mixquant{qem=20}"],
    ["insert-fake-quant", "insert-fake-quant{act-scheme=pact}",
     "insert-fake-quant{act-scheme=pact pact-alpha=inf}"],     # invalid
    ["calibrate", "calibrate{method=percentile}", "calibrate{num-batches=0}", "calibrate,calibrate"],
    ["lower-to-int-sim", "lower-to-int-sim,annotate-bitwidths"],
    ["verify-int-sim", "check-acc-width", "default"],
]


@st.composite
def pipelines(draw) -> str:
    """A prefix of the usual order, each stage a random variant (some invalid), sometimes with
    one random stage inserted out of order."""
    n = draw(st.integers(1, len(STAGES)))
    parts = [draw(st.sampled_from(stage)) for stage in STAGES[:n]]
    if draw(st.booleans()):
        parts.insert(draw(st.integers(0, len(parts))),
                     draw(st.sampled_from([v for stage in STAGES for v in stage])))
    return f"graph({','.join(p for p in parts if p)})"


OUTCOMES: list[str] = []     # for inspection when tuning the strategies


def _bad_iter(x):
    yield x
    raise ValueError("user data bug")


DATA = st.sampled_from(["ok", "shape", "dtype", "nan", "empty", "raises", "none"])


def _data(kind: str, x: torch.Tensor):
    return {"ok": [x, x * 0.5], "shape": [x[:, :2]], "dtype": [x.to(torch.int64)],
            "nan": [x * float("nan")], "empty": [], "raises": _bad_iter(x),
            "none": None}[kind]


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(kinds=st.lists(st.sampled_from(["conv", "conv-bn", "add", "cat", "pool"]), max_size=3),
       width=st.sampled_from([2, 4]), text=pipelines(),
       data=DATA)
def test_random_pipelines_raise_only_typed_errors_and_keep_the_model(kinds, width, text,
                                                                     data):
    torch.manual_seed(0)
    model = _Net(kinds, width).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            gm = qpasses.trace(model, x)
            with PassContext(example_inputs=(x,), calibration_data=_data(data, x)):
                PassManager.parse(text).run(gm)
        except PassesError as e:
            # the manager wraps an untyped exception as "internal error: <type>": a bug too
            assert "internal error" not in str(e), f"{text} (model {kinds}, data {data}): {e}"
            OUTCOMES.append(type(e).__name__)
        except Exception as e:     # anything else is a bug: show the pipeline that found it
            raise AssertionError(f"untyped {type(e).__name__} from {text} "
                                 f"(model {kinds}, data {data}): {e}") from e
        else:
            OUTCOMES.append("ok")
    after = model.state_dict()
    assert set(after) == set(state)
    assert all(torch.equal(after[k], v) for k, v in state.items())


SEARCH = {
    "fracbits": (["insert-fracbits", "insert-fracbits{granularity=kernel}",
                  "insert-fracbits{candidates=[2,3,4,5,6] init-bits=5.0}",
                  "insert-fracbits{candidates=[2,4,8]}",                 # invalid: gaps
                  "insert-fracbits{act-scheme=none}"],
                 ["freeze-fracbits", "freeze-fracbits{rounding=offset-bisection target-bitops=T}",
                  "freeze-fracbits{rounding=offset-bisection target-size=S tolerance=0.01}",
                  "freeze-fracbits{rounding=solver target-bitops=T}",
                  "freeze-fracbits{rounding=solver target-size=S}"]),
    "gmpq": (["insert-gmpq-supernet", "insert-gmpq-supernet{w-candidates=[2,4,8] "
              "a-candidates=[4,8]}", "insert-gmpq-supernet{pin-first-last=false}"],
             ["select-gmpq-policy", "select-gmpq-policy{target-bitops=T}"]),
}
# target / the annotated 4-bit model's cost: 1e-6 and 1e6 are unreachable
SCALES = st.sampled_from([1e-6, 0.05, 0.4, 0.8, 1.0, 3.0, 1e6])


def _train_step(gm: torch.fx.GraphModule, x: torch.Tensor, kind: str) -> None:
    gm.train()
    params = [p for p in gm.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05)
    loss = gm(x).square().mean()
    if kind == "fracbits":
        from qpasses.algorithms.fracbits import penalty
        loss = loss + penalty(gm, target_bitops=1e-4)
    loss.backward()
    opt.step()


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(kinds=st.lists(st.sampled_from(["conv", "conv-bn", "add", "cat", "pool"]), max_size=2),
       search=st.sampled_from(sorted(SEARCH)), data=st.data(), scale=SCALES,
       train=st.sampled_from(["none", "step", "step-left-in-train-mode"]))
def test_search_freeze_select_raise_only_typed_errors_and_lose_nothing(kinds, search, data,
                                                                       scale, train):
    torch.manual_seed(0)
    model = _Net(kinds, 4).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 8, 8)
    inserts, finals = SEARCH[search]
    insert, final = data.draw(st.sampled_from(inserts)), data.draw(st.sampled_from(finals))
    where = f"{insert} / {train} / {final} x{scale} (model {kinds})"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = qpasses.trace(model, x)
        with PassContext(example_inputs=(x,), calibration_data=[x]):
            PassManager.parse("graph(fold-batch-norm,annotate-bitwidths{weight-bits=4 "
                              "act-bits=4})").run(gm)
            cost = AnalysisManager().get("bitops", gm)
            size = AnalysisManager().get("model-size", gm)
            final = final.replace("T", repr(cost.total * scale / 1e9)).replace(
                "S", repr(size.mb * scale))
            try:
                PassManager.parse(f"graph({insert})").run(gm)
            except PassesError as e:
                assert "internal error" not in str(e), f"{where}: {e}"
                OUTCOMES.append(f"insert: {type(e).__name__}")
                return
            if train != "none":
                _train_step(gm, x, search)
                if train == "step":
                    gm.eval()
            before = fingerprint(gm)
            try:
                PassManager.parse(f"graph({final})").run(gm)
            except PassesError as e:
                assert "internal error" not in str(e), f"{where}: {e}"
                assert fingerprint(gm) == before, f"{where}: the failure changed the graph"
                # nothing lost: the plain rounding / argmax policy still works afterwards
                gm.eval()
                retry = "freeze-fracbits" if search == "fracbits" else "select-gmpq-policy"
                PassManager.parse(f"graph({retry})").run(gm)
                OUTCOMES.append(f"{final.split('{')[0]}: {type(e).__name__}")
            except Exception as e:
                raise AssertionError(f"untyped {type(e).__name__} from {where}: {e}") from e
            else:
                OUTCOMES.append(f"{final.split('{')[0]}: ok")
    after = model.state_dict()
    assert set(after) == set(state)
    assert all(torch.equal(after[k], v) for k, v in state.items())
