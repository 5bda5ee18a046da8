"""The logical axis vocabulary shared by every model in the package.

Model code names the axes of its parameters and big activations with these logical
names; a config maps them to mesh axes (`data`, `fsdp`, `tensor`). Keeping the
vocabulary in one place means a new mesh layout is a config change, never a model
change.
"""

# Activations.
BATCH = "batch"            # examples; sharded over the data-parallel axes
LENGTH = "length"          # text tokens
HEIGHT = "height"          # image rows
WIDTH = "width"            # image columns
ACT_EMBED = "act_embed"    # channel / model dim of activations (usually replicated)
ACT_HEADS = "act_heads"    # attention heads of activations

# Parameters.
EMBED = "embed"            # model width (T5 d_model, U-Net channels of dense layers)
MLP = "mlp"                # hidden width of feed-forward layers
HEADS = "heads"            # attention heads
KV = "kv"                  # per-head dimension
VOCAB = "vocab"            # token embedding rows
REL_BUCKETS = "relpos_buckets"  # T5 relative-position buckets
CONV_H = "conv_height"     # convolution kernel rows (never sharded)
CONV_W = "conv_width"      # convolution kernel columns (never sharded)
CONV_IN = "conv_in"        # convolution input channels
CONV_OUT = "conv_out"      # convolution output channels
NORM = "norm"              # scales / biases of norms (always replicated)

# Default rules: FSDP over model width, tensor parallelism over heads and MLP,
# batch over both data axes. Each pair is (logical name, mesh axis or None).
DEFAULT_RULES = (
    (BATCH, ("data", "fsdp")),
    (LENGTH, None),
    (HEIGHT, None),
    (WIDTH, None),
    (ACT_EMBED, None),
    (ACT_HEADS, "tensor"),
    (EMBED, "fsdp"),
    (MLP, "tensor"),
    (HEADS, "tensor"),
    (KV, None),
    (VOCAB, "tensor"),
    (REL_BUCKETS, None),
    (CONV_H, None),
    (CONV_W, None),
    (CONV_IN, "fsdp"),
    (CONV_OUT, "tensor"),
    (NORM, None),
)
