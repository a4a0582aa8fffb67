# Golden expected-error cases for annotate-bitwidths options and config files.
# -----
# CASE: weight-bits-out-of-range
# RUN: graph(annotate-bitwidths{weight-bits=0})
# EXPECT-ERROR: option 'weight-bits' of pass 'annotate-bitwidths': 0 is out of range: bit-widths are 1..32
# -----
# CASE: act-bits-out-of-range
# RUN: graph(annotate-bitwidths{act-bits=33})
# EXPECT-ERROR: option 'act-bits' of pass 'annotate-bitwidths': 33 is out of range
# -----
# CASE: granularity-typo
# RUN: graph(annotate-bitwidths{granularity=kernal})
# EXPECT-ERROR: 'kernal' is not one of layer, kernel (did you mean 'kernel'?)
# -----
# CASE: missing-config-file
# RUN: graph(annotate-bitwidths{config=does/not/exist.json})
# EXPECT-ERROR: config 'does/not/exist.json' (option 'config' of pass 'annotate-bitwidths'): no such file


def build():
    return nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()), (torch.randn(1, 3, 4, 4),)
# -----
# CASE: skip-glob-matches-nothing
# RUN: graph(annotate-bitwidths{skip=conv*})
# EXPECT-ERROR: option 'skip' of pass 'annotate-bitwidths': glob 'conv*' matches no layer; closest layer names:


def build():
    return nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1)), \
        (torch.randn(1, 3, 4, 4),)
