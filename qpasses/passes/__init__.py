"""Every registered pass, one module per pass named after its textual name, imported explicitly so
registration order is deterministic."""
from qpasses.passes import canonicalize, dce, fold_batch_norm  # noqa: F401
from qpasses.passes import annotate_bitwidths  # noqa: F401
from qpasses.passes import insert_fake_quant, calibrate  # noqa: F401
from qpasses.passes import check_acc_width  # noqa: F401
from qpasses.passes import search_mixquant, solve_bitwidths  # noqa: F401
from qpasses.passes import prune_zero_bit_channels  # noqa: F401
from qpasses.passes import lower_fake_quant_ops, fuse_requantize  # noqa: F401
from qpasses.passes import shift_unfused_biases, exact_zero_kernel_constants  # noqa: F401
from qpasses.passes import cleanup_int_sim, lower_to_int_sim, verify_int_sim  # noqa: F401
from qpasses.passes import insert_fracbits, freeze_fracbits  # noqa: F401
from qpasses.passes import ptq_bitsplit  # noqa: F401
from qpasses.passes import insert_gmpq_supernet, select_gmpq_policy  # noqa: F401
from qpasses.passes import emulate_int_sim  # noqa: F401
