"""Pure tensor math of quantization (no graph code): quantizers and observers."""
from qpasses.numerics.observers import (ACIQ_GAUSS, ACIQ_GAUSS_HALF, ACIQ_LAPLACE, ACIQ_LAPLACE_HALF,
                                        OBSERVERS, ACIQObserver, AvgMinMaxObserver,
                                        HistogramObserverBase, KLObserver, MinMaxObserver,
                                        MovingAverageMinMaxObserver, MSEObserver, Observer,
                                        PercentileObserver, aciq_clip, make_observer)
from qpasses.numerics.quantizers import (DEFAULT_EPS, ROUNDING_MODES, SCHEMES, calc_qparams, dequantize,
                                         dorefa_normalize, dorefa_weight, fake_quantize, fracbits_interp,
                                         lsq_fake_quant, minmax_qparams, pact, qrange, quantize,
                                         quantize_dequantize, round_tensor, scheme_qrange, unit_quantize)
