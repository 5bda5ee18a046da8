"""The logical axis vocabulary shared by every model in the package.

Model code names the axes of its parameters and big activations with these logical
names; a config maps them to mesh axes (`data`, `fsdp`, `tensor`, and `slice` on several
TPU slices). Keeping the vocabulary in one place means a new mesh layout is a config
change, never a model change.
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

# The mesh axis over TPU slices (multi-slice training; parallel/mesh.py, BUILD_TPU.md). Its
# devices are grouped by slice, so collectives over it are the only traffic on the slow
# data-center network (DCN): only the batch may be sharded over it, so that it carries the
# data-parallel gradient all-reduce and nothing else; params, optimizer state and every
# fsdp / tensor collective stay inside a slice, on the fast inter-chip network (ICI).
SLICE = "slice"


def with_slices(rules):
  """`rules` with the batch sharded over the slices first, then over its other axes (e.g.
  batch -> (slice, data, fsdp)); every other rule unchanged. Idempotent. Use these rules
  with a mesh that has a `slice` axis (a mesh without one cannot resolve them)."""
  out = []
  for name, target in rules:
    if name == BATCH:
      targets = () if target is None else (target,) if isinstance(target, str) else tuple(target)
      target = (SLICE,) + tuple(t for t in targets if t != SLICE)
    elif isinstance(target, list):
      target = tuple(target)
    out.append((name, target))
  return tuple(out)


# DEFAULT_RULES for a mesh with a `slice` axis (size 1 is fine): batch over
# (slice, data, fsdp). DEFAULT_RULES themselves stay without `slice`: JAX refuses a rule
# that names an axis the mesh lacks, and most meshes (every single-slice config, tools and
# tests) have none.
MULTISLICE_RULES = with_slices(DEFAULT_RULES)
