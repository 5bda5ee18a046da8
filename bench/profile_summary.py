r"""Where a compiled step's time goes: a `jax.profiler` trace read against the step's
optimized HLO.

The trace holds one event per executed HLO instruction (a fusion, a convolution, a
collective) on every device; the optimized HLO (`compiled.as_text()`) says what each one
is. Each event is put in one category:

  convolution, forward          a convolution fusion traced from the forward pass
  convolution, input gradient   one traced from the backward pass (`transpose(...)`)
  convolution, weight gradient  a convolution whose window is larger than 3x3: XLA's
                                filter gradient (the activations convolved with the output
                                gradient; its window is the image)
  matmul                        dot fusions (attention, dense layers)
  collective                    all-reduce / all-gather / reduce-scatter / ... (on a CPU
                                split into devices, mostly one device waiting for another)
  copy / transpose              fusions that only move data (layouts, concatenations)
  elementwise / reduce          everything else (norms, activations, the optimizer, EMA)

and reported in seconds per step per device, with the top instructions. On a GPU the
convolutions and most matmuls are library calls (`custom-call`s to cuDNN / cuBLAS), put in
the same categories by their target (`__cudnn$convBackwardFilter` is a weight gradient,
a fused attention kernel `__cudnn$fmha...` a matmul), and only the device's own timeline
counts: its kernels carry their HLO instruction in an `hlo_op` stat, while the host's
events there are launches.
`bench/train_step.py --profile_dir=DIR` writes a trace and prints this table;
`python bench/profile_summary.py --trace_dir=DIR --hlo=FILE --steps=N` reads one back.
"""
from __future__ import annotations

import collections
import glob
import math
import os
import re

CATEGORIES = ("convolution, forward", "convolution, input gradient",
              "convolution, weight gradient", "matmul", "collective", "copy / transpose",
              "elementwise / reduce")
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                "collective-permute")
_DATA_MOVES = {"copy", "transpose", "bitcast", "concatenate", "slice", "pad", "reshape",
               "broadcast", "dynamic-slice", "dynamic-update-slice", "parameter", "tuple",
               "get-tuple-element", "constant", "iota"}
# Library calls (a GPU's convolutions and matmuls) by a marker in their custom-call target;
# first match wins, so the backward convolutions come before the forward ones.
_LIBRARY_CALLS = (("$convBackwardFilter", "convolution, weight gradient"),
                  ("$convBackwardInput", "convolution, input gradient"),
                  ("$conv", "convolution, forward"),
                  ("$fmha", "matmul"), ("cublas", "matmul"), ("gemm", "matmul"))
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")


def _opcode(rhs: str) -> str:
  """The opcode of an instruction's right-hand side: `f32[8]{0} add(...)` -> add; the shape
  may be a tuple, `(f32[8]{0}, /*index=1*/f32[4]{0}) all-reduce(...)`."""
  if rhs.startswith("("):  # skip the tuple shape, parentheses balanced
    depth = 0
    for end, char in enumerate(rhs):
      depth += {"(": 1, ")": -1}.get(char, 0)
      if depth == 0:
        break
    rest = rhs[end + 1:]
  else:
    rest = rhs.split(" ", 1)[1] if " " in rhs else ""
  match = re.match(r"\s*([\w\-]+)\(", rest)
  return match.group(1) if match else ""


def parse_hlo(hlo_text: str) -> dict[str, dict]:
  """{instruction name: {"opcode", "op_name", "window", "target", "inner"}} of every
  instruction in an HLO module's text ("target": a custom call's); "inner" lists the
  instructions of the computation it calls (a fusion's body), empty for the others."""
  ops, computations, current = {}, {}, None
  for line in hlo_text.splitlines():
    if current is None or line.startswith(("ENTRY", "%")) and line.rstrip().endswith("{"):
      match = _COMPUTATION.match(line)
      if match:
        current = match.group(1)
        computations[current] = []
        continue
    if line.strip() == "}":
      current = None
      continue
    match = _INSTRUCTION.match(line)
    if not match or current is None:
      continue
    name, rhs = match.groups()
    op_name = re.search(r'op_name="([^"]*)"', rhs)
    calls = re.search(r"calls=%?([\w.\-]+)", rhs)
    window = re.search(r"window=\{size=([\dx]+)", rhs)
    target = re.search(r'custom_call_target="([^"]*)"', rhs)
    ops[name] = dict(opcode=_opcode(rhs), op_name=op_name.group(1) if op_name else "",
                     calls=calls.group(1) if calls else "",
                     window=window.group(1) if window else "",
                     target=target.group(1) if target else "")
    computations[current].append(name)
  for op in ops.values():
    op["inner"] = [ops[i] for i in computations.get(op.pop("calls"), ())]
  return ops


def categorize(op: dict) -> str:
  """The category (CATEGORIES) of one instruction of `parse_hlo`."""
  opcodes = {op["opcode"]} | {i["opcode"] for i in op["inner"]}
  if any(o.startswith(_COLLECTIVES) for o in opcodes):  # also their -start / -done halves
    return "collective"
  for target in [op["target"]] + [i["target"] for i in op["inner"]]:
    for marker, category in _LIBRARY_CALLS:
      if marker in target:
        return category
  convs = [i for i in [op] + op["inner"] if i["opcode"] == "convolution"]
  if convs:
    window = convs[0]["window"]
    if window and math.prod(int(d) for d in window.split("x")) > 9:
      return "convolution, weight gradient"
    op_name = op["op_name"] or convs[0]["op_name"]
    return "convolution, input gradient" if "transpose(" in op_name else "convolution, forward"
  if "dot" in opcodes:
    return "matmul"
  if opcodes <= _DATA_MOVES:
    return "copy / transpose"
  return "elementwise / reduce"


def trace_file(trace_dir: str) -> str:
  paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
  if not paths:
    raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}: was a trace written there?")
  return paths[-1]  # the newest


def hlo_op(event) -> str:
  """The HLO instruction an event ran: its `hlo_op` stat (XLA's CPU thunks and GPU kernels
  carry one), else its name."""
  for name, value in event.stats:
    if name == "hlo_op":
      return value
  return event.name


def device_planes(planes) -> list:
  """The planes that time the devices: an accelerator's own (`/device:GPU:0`, ...), or on
  a CPU, where XLA runs each instruction on host threads, every plane."""
  planes = list(planes)
  return [p for p in planes if p.name.startswith("/device:")] or planes


def event_seconds(planes, names) -> collections.Counter:
  """Total seconds of the events of `device_planes` that ran an HLO instruction in `names`,
  over every device and thread (XLA's own bookkeeping events are left out)."""
  total = collections.Counter()
  for plane in device_planes(planes):
    for line in plane.lines:
      for event in line.events:
        op = hlo_op(event)
        if op in names:
          total[op] += event.duration_ns * 1e-9
  return total


def op_seconds(trace_dir: str, names) -> collections.Counter:
  """`event_seconds` of the newest trace under `trace_dir`."""
  import jax
  data = jax.profiler.ProfileData.from_file(trace_file(trace_dir))
  return event_seconds(data.planes, names)


def summarize(trace_dir: str, hlo_text: str, *, steps: int, num_devices: int) -> dict:
  """Seconds per step per device of each category, and the top instructions."""
  ops = parse_hlo(hlo_text)
  seconds = op_seconds(trace_dir, set(ops))
  if not seconds:
    raise ValueError(f"the trace in {trace_dir} has no events of this HLO module's "
                     "instructions: was it traced while running this compiled step?")
  per = 1.0 / (steps * num_devices)
  by_category = collections.Counter()
  for name, s in seconds.items():
    by_category[categorize(ops[name])] += s * per
  top = [dict(name=name, category=categorize(ops[name]), seconds=s * per,
              op_name=ops[name]["op_name"][-120:]) for name, s in seconds.most_common(15)]
  return dict(seconds_per_step={c: by_category.get(c, 0.0) for c in CATEGORIES},
              total=sum(by_category.values()), top=top, steps=steps,
              num_devices=num_devices)


def format_summary(summary: dict) -> str:
  total = summary["total"]
  lines = [f"time in HLO instructions per step per device: {total:.4f} s "
           f"(trace of {summary['steps']} steps on {summary['num_devices']} devices)"]
  for category, s in sorted(summary["seconds_per_step"].items(), key=lambda kv: -kv[1]):
    lines.append(f"  {category:<30}{s:>9.4f} s {100 * s / total:>6.1f}%")
  lines.append("  top instructions:")
  for op in summary["top"][:10]:
    lines.append(f"    {op['seconds']:>8.4f} s  {op['category']:<30}{op['name']:<28}"
                 f"{op['op_name'][-60:]}")
  return "\n".join(lines)


def main(argv):
  del argv
  from absl import flags
  f = flags.FLAGS
  with open(f.hlo) as file:
    text = file.read()
  print(format_summary(summarize(f.trace_dir, text, steps=f.steps, num_devices=f.devices)))


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_string("trace_dir", None, "Directory jax.profiler traced into.", required=True)
  flags.DEFINE_string("hlo", None, "The step's optimized HLO (compiled.as_text()).",
                      required=True)
  flags.DEFINE_integer("steps", 1, "Steps in the trace.")
  flags.DEFINE_integer("devices", 1, "Devices that ran them.")
  app.run(main)
