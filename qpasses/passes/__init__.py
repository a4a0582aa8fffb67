"""Every registered pass, imported explicitly so registration order is deterministic."""
from .canonicalize import canonicalize, dce, fold_batch_norm  # noqa: F401
from .quantize import annotate_bitwidths  # noqa: F401
from .quantize import insert_fake_quant, calibrate  # noqa: F401,E402
from .analysis import acc_width, bitops, check_acc_width, cost_layers, macs, model_size  # noqa: F401,E402
from .search import search_mixquant, solve_bitwidths  # noqa: F401,E402
from .analysis import channel_groups  # noqa: F401,E402
from .prune import prune_zero_bit_channels  # noqa: F401,E402
from .lower import int_sim_kernels, lower_to_int_sim, verify_int_sim  # noqa: F401,E402
from .search import insert_fracbits, freeze_fracbits  # noqa: F401,E402
from .ptq import ptq_bitsplit  # noqa: F401,E402
from .search import insert_gmpq_supernet, select_gmpq_policy  # noqa: F401,E402
