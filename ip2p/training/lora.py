"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") on a frozen UNet.

PEFT adapters go on the UNet's attention and feed-forward projections. Widening a 4-channel base
to 8 channels (InstructPix2Pix 3.2) makes new weights that a low-rank update of the old ones
cannot express, so `conv_in` (its weight and bias) then trains in full next to the adapters.

What a run keeps: checkpoints hold only the trainable tensors (accelerate's save/load hooks
replace its whole-model file), and the final folder holds the adapter in the file diffusers'
`load_lora_weights` reads, `conv_in.safetensors` when conv_in trained, and by default the merged
pipeline, whose UNet is the base's fp32 weights with the adapter fused in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ip2p.errors import UserError

ADAPTER_FILE = "pytorch_lora_weights.safetensors"  # the name load_lora_weights looks for
CONV_IN_FILE = "conv_in.safetensors"
TRAINABLE_FILE = "trainable_weights.safetensors"  # in checkpoints, instead of the whole UNet


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]
    train_conv_in: bool  # a widened base always trains it

    @classmethod
    def from_config(cls, cfg) -> "LoraSettings":
        targets = tuple(t.strip() for t in cfg.lora_target_modules.split(",") if t.strip())
        return cls(cfg.lora_rank, cfg.lora_alpha or cfg.lora_rank, cfg.lora_dropout, targets, cfg.train_conv_in)

    def peft_config(self):
        from peft import LoraConfig

        # Gaussian A and zero B: the adapted UNet starts exactly at the base (diffusers' scripts do the same).
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          init_lora_weights="gaussian", target_modules=list(self.target_modules))


def attach_lora(unet, lora: LoraSettings, widened: bool) -> bool:
    """Freeze the UNet, add the adapters, unfreeze conv_in when it must or may train. Returns
    whether conv_in trains."""
    unet.requires_grad_(False)
    try:
        unet.add_adapter(lora.peft_config())
    except ValueError as e:  # peft: no module matched the targets
        raise UserError(f"--lora_target_modules {','.join(lora.target_modules)}: {str(e).splitlines()[0]}; "
                        "name modules of the UNet, e.g. to_q,to_k,to_v,to_out.0") from None
    train_conv_in = widened or lora.train_conv_in
    unet.conv_in.requires_grad_(train_conv_in)
    return train_conv_in


def cast_frozen(unet, dtype: torch.dtype) -> None:
    """The frozen weights in the mixed-precision dtype (half the memory of fp32), the trained ones
    in fp32 (the GradScaler and AdamW need fp32 master weights)."""
    for p in unet.parameters():
        p.data = p.data.to(torch.float32 if p.requires_grad else dtype)


def trainable_state(unet) -> dict[str, torch.Tensor]:
    """Every trained tensor by its parameter name: the adapters, and conv_in when it trains."""
    return {name: p.detach() for name, p in unet.named_parameters() if p.requires_grad}


def load_trainable_state(unet, state: dict[str, torch.Tensor]) -> None:
    params = dict(unet.named_parameters())
    expected = {name for name, p in params.items() if p.requires_grad}
    if set(state) != expected:
        raise UserError(f"the checkpoint's trained tensors ({len(state)}) are not this run's ({len(expected)}): "
                        "resume with the same --lora_rank, --lora_target_modules and --train_conv_in")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def register_checkpoint_hooks(accelerator, unet) -> None:
    """Checkpoints hold the trainable tensors only: megabytes where the whole UNet is gigabytes.
    The frozen base is the one the run starts from, so resuming rebuilds it and loads these."""
    from safetensors.torch import load_file, save_file

    def save(models, weights, output_dir):
        if weights:
            weights.pop()  # the whole-UNet state dict accelerate would write
        if accelerator.is_main_process:
            state = trainable_state(accelerator.unwrap_model(models[0]))
            save_file({k: v.contiguous().cpu() for k, v in state.items()}, str(Path(output_dir) / TRAINABLE_FILE))

    def load(models, input_dir):
        model = models.pop()
        load_trainable_state(accelerator.unwrap_model(model), load_file(str(Path(input_dir) / TRAINABLE_FILE)))

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def adapter_state(unet) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}


def save_adapter(output_dir: Path, family, unet, lora: LoraSettings, conv_in_trained: bool) -> list[str]:
    """The adapter as diffusers' `load_lora_weights` reads it (its LoraConfig in the file's
    metadata, so alpha survives), and conv_in when it trained. Returns the files written."""
    import diffusers
    from safetensors.torch import save_file

    pipeline_class = getattr(diffusers, family.pipeline_class)
    pipeline_class.save_lora_weights(output_dir, unet_lora_layers=adapter_state(unet),
                                     unet_lora_adapter_metadata=lora.peft_config().to_dict())
    written = [ADAPTER_FILE]
    if conv_in_trained:
        conv = {k: v.detach().float().cpu().contiguous() for k, v in unet.conv_in.state_dict().items()}
        save_file(conv, str(output_dir / CONV_IN_FILE))
        written.append(CONV_IN_FILE)
    return written


def merged_unet(base_unet, trained_unet, lora: LoraSettings, conv_in_trained: bool):
    """`base_unet` (freshly loaded, fp32, 8 channels) with the trained conv_in and the adapter fused
    in: the weights a plain UNet needs, computed from the base's own fp32 weights rather than the
    mixed-precision copy the run trained against."""
    if conv_in_trained:
        base_unet.conv_in.load_state_dict({k: v.float() for k, v in trained_unet.conv_in.state_dict().items()})
    from peft.utils import set_peft_model_state_dict

    base_unet.add_adapter(lora.peft_config())
    set_peft_model_state_dict(base_unet, adapter_state(trained_unet))
    base_unet.fuse_lora()
    base_unet.unload_lora()
    return base_unet


def apply_adapter(pipe, folder: Path, scale: float) -> None:
    """inference.py --lora: conv_in (widening a 4-channel base first) and the adapter at `scale`.
    conv_in is loaded as trained, whatever the scale: it is a whole weight, not a low-rank update."""
    from safetensors.torch import load_file

    from ip2p.method import expand_conv_in

    conv_in = folder / CONV_IN_FILE
    if conv_in.is_file():
        state = load_file(str(conv_in))
        expand_conv_in(pipe.unet, state["weight"].shape[1])
        pipe.unet.conv_in.load_state_dict({k: v.to(pipe.unet.dtype) for k, v in state.items()})
    pipe.load_lora_weights(str(folder), adapter_name="edit")
    pipe.set_adapters(["edit"], adapter_weights=[scale])
