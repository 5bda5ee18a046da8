r"""The imagen-pytorch side of a benchmark: the same U-Net hyperparameters, batch,
resolution, precision and optimizer as one of our stages, timed in PyTorch.

Runs inside the peer's own virtual environment (bench/peer_env.py makes it), so it
imports no JAX and nothing of imagen_jax: the benchmark passes everything as JSON.

  python bench/peers/imagen_pytorch_peer.py '{"mode": "train", ...}'
Prints one JSON line (prefixed "PEER_RESULT ") with the figures. Modes: "train" (one
optimizer step, bench/train_step.py) and "sample" (one stage of imagen-pytorch's own
DDPM sampling with `sample_steps` steps and guidance, bench/sample.py).

With `"rounds": R` in the spec the timed steps come in R rounds of `steps`, each started
by a line "go" on stdin and answered by "PEER_ROUND [times]" (after "PEER_READY" once
the warm-up is done), so that the benchmark can interleave them with its own steps: on a
machine whose speed drifts, both sides then see the same drift (bench/peer_env.py).

How our U-Net config maps onto imagen-pytorch's `Unet` (the knobs both have):
  base_channels -> dim, channel_mults -> dim_mults, num_res_blocks -> num_resnet_blocks,
  cond_dim, text_dim -> text_embed_dim, self/cross_attn_levels -> layer_attns /
  layer_cross_attns (+ attend_at_middle when the lowest level attends), attention head
  width -> attn_dim_head, efficient -> memory_efficient, input_to_output_skip ->
  init_conv_to_final_conv_residual, dropout. (Its GroupNorms use 8 groups; ours
  num_groups.)
imagen-pytorch extras that our U-Net does not have are switched off (cross-embed stem,
global-context attention in resnet blocks, text tokens in self-attention); its structure
is otherwise its own (one transformer block with a feed-forward per level, a final
resnet block, pixel-shuffle upsampling), so parameter counts and FLOPs differ a little:
the result reports both, counted by torch's FlopCounterMode on the same step.
"""
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def unet_kwargs(unet: dict, text_len: int) -> dict:
  levels = len(unet["channel_mults"])
  blocks = unet["num_res_blocks"]
  head_dim = unet.get("attn_head_channels") or unet["attn_head_dim"]
  attn_levels = sorted(set(unet["self_attn_levels"]) | set(unet["cross_attn_levels"]))
  if unet.get("attn_head_channels"):  # ours: heads = channels / head width, per level
    first = attn_levels[0] if attn_levels else 0
    heads = max(1, unet["base_channels"] * unet["channel_mults"][first] // head_dim)
  else:
    heads = unet["attn_heads"]
  return dict(
      dim=unet["base_channels"], dim_mults=tuple(unet["channel_mults"]),
      num_resnet_blocks=tuple(blocks) if isinstance(blocks, (list, tuple)) else blocks,
      cond_dim=unet["cond_dim"], text_embed_dim=unet["text_dim"], max_text_len=text_len,
      attn_heads=heads, attn_dim_head=head_dim,
      layer_attns=tuple(i in unet["self_attn_levels"] for i in range(levels)),
      layer_cross_attns=tuple(i in unet["cross_attn_levels"] for i in range(levels)),
      attend_at_middle=(levels - 1) in unet["self_attn_levels"],
      memory_efficient=unet["efficient"],
      init_conv_to_final_conv_residual=unet.get("input_to_output_skip", False),
      dropout=unet["dropout"],
      init_cross_embed=False, init_conv_kernel_size=3, use_global_context_attn=False,
      layer_attns_add_text_cond=False)


def build(spec, torch, ip):
  unet = ip.Unet(**unet_kwargs(spec["unet"], spec["text_len"]))
  sr = bool(spec["lowres_resolution"])
  unets = (ip.NullUnet(), unet) if sr else (unet,)
  sizes = (spec["lowres_resolution"], spec["resolution"]) if sr else (spec["resolution"],)
  imagen = ip.Imagen(
      unets=unets, image_sizes=sizes, text_embed_dim=spec["unet"]["text_dim"],
      timesteps=spec.get("sample_steps", 1000), cond_drop_prob=spec["cond_drop_prob"],
      noise_schedules=spec["schedule"],
      pred_objectives={"eps": "noise", "v": "v", "x0": "x_start"}[spec["prediction"]],
      min_snr_loss_weight=False, dynamic_thresholding=spec.get("dynamic_thresholding", True),
      lowres_sample_noise_level=spec.get("lowres_noise_level", 0.2))
  return imagen.to(spec["device"]), len(unets)


def sync(torch, device):
  if device.startswith("cuda"):
    torch.cuda.synchronize()


def main():
  spec = json.loads(sys.argv[1])
  import torch
  from imagen_pytorch_loader import load_imagen_pytorch
  if spec.get("threads"):
    torch.set_num_threads(spec["threads"])
  ip = load_imagen_pytorch()
  torch.manual_seed(0)
  device = spec["device"]
  imagen, unet_number = build(spec, torch, ip)
  unet = imagen.unets[unet_number - 1]
  params = [p for p in unet.parameters() if p.requires_grad]
  b, r, L, d = spec["batch"], spec["resolution"], spec["text_len"], spec["unet"]["text_dim"]
  gen = torch.Generator().manual_seed(0)
  images = torch.rand(b, 3, r, r, generator=gen).to(device)
  text = torch.randn(b, L, d, generator=gen).to(device)
  mask = torch.ones(b, L, dtype=torch.bool, device=device)
  autocast = torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16,
                            enabled=spec["dtype"] == "bfloat16")
  result = dict(peer="imagen-pytorch", torch=torch.__version__, device=device,
                params_m=round(sum(p.numel() for p in params) / 1e6, 3),
                threads=torch.get_num_threads(),
                # Inherited from the benchmark (imagen_jax/host_malloc.py): both sides run
                # on the same malloc.
                ld_preload=os.environ.get("LD_PRELOAD", ""))

  if spec["mode"] == "train":
    opt = torch.optim.Adam(params, lr=spec["lr"], betas=(spec["b1"], spec["b2"]),
                           eps=spec["eps"])
    ema = [p.detach().clone() for p in params]

    def step():
      with autocast:
        loss = imagen(images, text_embeds=text, text_masks=mask, unet_number=unet_number)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(params, spec["grad_clip"])
      opt.step()
      opt.zero_grad(set_to_none=True)
      with torch.no_grad():
        torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - spec["ema_decay"])
      return loss

    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
      step()
    result["train_flops_per_image"] = counter.get_total_flops() / b
    item = b
  elif spec["mode"] == "sample":
    # One stage of imagen-pytorch's own sampler: ancestral DDPM over `timesteps` =
    # spec["sample_steps"] uniform steps in t (fixed when the Imagen is built), classifier-
    # free guidance as two U-Net forwards of the batch per step (cond, then null text),
    # plain CFG (cfg_remove_parallel_component=False, like ours). SR stages start from
    # random low-res images in [0, 1] (imagen-pytorch's image range), noised at
    # lowres_sample_noise_level on its own (linear) schedule.
    lowres_r = spec["lowres_resolution"]
    lowres = torch.rand(b, 3, lowres_r, lowres_r, generator=gen).to(device) if lowres_r else None

    def step():
      with torch.no_grad(), autocast:
        return imagen.sample(text_embeds=text, text_masks=mask, cond_scale=spec["guidance"],
                             cfg_remove_parallel_component=False,
                             start_at_unet_number=unet_number, start_image_or_video=lowres,
                             stop_at_unet_number=unet_number, use_tqdm=False,
                             return_pil_images=False)

    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:  # one untimed call, counted
      out = step()
    if tuple(out.shape) != (b, 3, r, r):
      raise RuntimeError(f"the peer sampled shape {tuple(out.shape)}, not {(b, 3, r, r)}")
    result["sample_flops_per_image"] = counter.get_total_flops() / b
    result["unet_evals_per_image"] = spec["sample_steps"] * (1 if spec["guidance"] == 1 else 2)
    result["sampler"] = f"imagen-pytorch DDPM, {spec['sample_steps']} steps"
    item = b
  else:
    raise ValueError(f"mode must be train or sample, got {spec['mode']!r}")

  if device.startswith("cuda"):
    torch.cuda.reset_peak_memory_stats()

  def timed(n):
    times = []
    for _ in range(n):
      sync(torch, device)
      t0 = time.perf_counter()
      step()
      sync(torch, device)
      times.append(time.perf_counter() - t0)
    return times

  timed(spec["warmup"])
  rounds = spec.get("rounds", 0)
  if rounds:  # interleaved with the benchmark's own steps: it says when (see above)
    print("PEER_READY", flush=True)
    times = []
    for _ in range(rounds):
      command = sys.stdin.readline().strip()
      if command != "go":
        raise SystemExit(f"imagen_pytorch_peer: expected 'go' on stdin, got {command!r}")
      round_times = timed(spec["steps"])
      times += round_times
      print("PEER_ROUND " + json.dumps(round_times), flush=True)
  else:
    times = timed(spec["steps"])
  step_s = statistics.median(times)
  result.update(step_s=step_s, items_per_s=item / step_s, times=times)
  if device.startswith("cuda"):
    result["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
  print("PEER_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
