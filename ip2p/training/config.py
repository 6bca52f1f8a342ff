"""The training configuration: one typed dataclass whose field names are the diffusers flags.

Users paste flags from the diffusers example's docs, so every flag of
`examples/instruct_pix2pix/train_instruct_pix2pix_sdxl.py` exists here with the same name and
meaning; the kit's additions are marked "(kit)" in their help. A YAML recipe (`--config FILE`)
sets defaults, the command line overrides it, unknown keys are an error, and the resolved
configuration (secrets removed) is written into the output folder. `ip2p.cli_args.FlagParser`
reads both, with the rules every script shares; each field's section decides where --help lists it.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import yaml

from ip2p.cli_args import FlagParser, flag
from ip2p.errors import UserError

SECRET_FIELDS = ("hub_token",)
RESOLVED_CONFIG_NAME = "training_config.yaml"
# Attention (self and cross) and feed-forward projections of every transformer block: where the
# text and the image meet. The resnets' convolutions are left to conv_in's full update.
LORA_TARGETS = "to_q,to_k,to_v,to_out.0,ff.net.0.proj,ff.net.2"
SHARD_SIZE = 256  # samples per latent-cache shard file, unless --latent_cache_shard_size says otherwise


def _section(title: str):
    """The field maker of one --help section; the sections are listed in the order they first appear."""
    return functools.partial(flag, group=title)


_model = _section("model")
_data = _section("data")
_augment = _section("resolution and augmentation")
_optim = _section("optimisation")
_memory = _section("precision and memory")
_cache = _section("latent cache")
_checkpoints = _section("checkpoints and resume")
_validation = _section("validation")
_lora = _section("LoRA")
_logging = _section("logging and hub")
_compat = _section("accepted for compatibility")


@dataclass
class TrainConfig:
    # --- recipe (kit)
    config: Optional[str] = flag(None, "(kit) YAML recipe in configs/; command-line flags override it", metavar="FILE")

    pretrained_model_name_or_path: Optional[str] = _model(
        None, "the model to start from, a local folder in the diffusers layout or a hub id (required): an SDXL or "
              "SD 1.x/2.x base, or an InstructPix2Pix pipeline of either; the family is read from its configs")
    pretrained_vae_model_name_or_path: Optional[str] = _model(
        None, "another VAE, e.g. madebyollin/sdxl-vae-fp16-fix (then cast to the mixed-precision dtype)")
    revision: Optional[str] = _model(None, "hub revision of the model files")
    variant: Optional[str] = _model(None, "weight file variant, e.g. fp16")

    data_dir: Optional[str] = _data(None, "(kit) a dataset written by convert_to_hf_dataset.py (load_from_disk)")
    dataset_name: Optional[str] = _data(None, "a hub dataset id or a local folder of parquet/arrow files")
    dataset_config_name: Optional[str] = _data(None, "the dataset's config name")
    train_data_dir: Optional[str] = _data(None, "an imagefolder with metadata.jsonl (diffusers behaviour)")
    cache_dir: Optional[str] = _data(None, "where datasets downloads and caches")
    original_image_column: str = _data("input_image", "column holding the input photo")
    edited_image_column: str = _data("edited_image", "column holding the edited photo")
    edit_prompt_column: str = _data("edit_prompt", "column holding the instruction")
    max_train_samples: Optional[int] = _data(None, "use only this many samples (shuffled with --seed)")
    dataloader_num_workers: int = _data(0, "DataLoader worker processes (any number works: no GPU work in workers)")

    resolution: int = _augment(256, "training resolution; images are resized keeping their aspect ratio, then "
                                    "cropped")
    center_crop: bool = _augment(False, "center crop instead of a random crop; the random crop is drawn once per "
                                        "sample from --seed and kept for the whole run (the latent cache stores "
                                        "it), not drawn again each epoch")
    random_flip: bool = _augment(False, "flip the input and edited images together, half of the time")
    aspect_ratio_buckets: bool = _augment(
        False, "(kit) train each pair whole at the aspect-ratio bucket nearest its input photo's (about "
               "--resolution² pixels, sides multiples of 64 at 1024), every batch from one bucket, instead of "
               "a square crop; logs/buckets.json counts them")
    bucket_list: Optional[str] = _augment(None, "(kit) with --aspect_ratio_buckets: a file of buckets, one "
                                                "WIDTHxHEIGHT per line, instead of the list around --resolution",
                                          metavar="FILE")

    train_batch_size: int = _optim(16, "batch size per device")
    num_train_epochs: int = _optim(100, "epochs (ignored when --max_train_steps is set)")
    max_train_steps: Optional[int] = _optim(None, "total optimizer steps; overrides --num_train_epochs")
    gradient_accumulation_steps: int = _optim(1, "micro-batches per optimizer step")
    learning_rate: float = _optim(1e-4, "initial learning rate (after warmup)")
    scale_lr: bool = _optim(False, "multiply the learning rate by the global batch size")
    lr_scheduler: str = _optim("constant", "linear, cosine, cosine_with_restarts, polynomial, constant, "
                                           "constant_with_warmup")
    lr_warmup_steps: int = _optim(500, "warmup length in optimizer steps (ignored by the constant schedule, with a "
                                       "warning: use constant_with_warmup)")
    conditioning_dropout_prob: Optional[float] = _optim(
        None, "InstructPix2Pix dropout p: p text only, p both, p image only (the paper uses 0.05, as every recipe "
              "here); unset, the unconditional branches that inference's guidance needs are never trained (a warning "
              "says so)")
    adam_beta1: float = _optim(0.9, "Adam beta1")
    adam_beta2: float = _optim(0.999, "Adam beta2")
    adam_weight_decay: float = _optim(1e-2, "AdamW weight decay")
    adam_epsilon: float = _optim(1e-8, "Adam epsilon")
    max_grad_norm: float = _optim(1.0, "gradient clipping norm")
    use_ema: bool = _optim(False, "keep an EMA of the UNet; used for validation and the final save")
    ema_decay: float = _optim(0.9999, "(kit) EMA decay (with the usual warm-up (1+s)/(10+s))")
    max_nonfinite_steps: int = _optim(
        10, "(kit) skip optimizer steps whose gradients are not finite; stop after this many in a row "
            "(0: no check, which saves one host synchronisation per optimizer step)")
    seed: Optional[int] = _optim(None, "seed for reproducible training (optional)")

    mixed_precision: Optional[Literal["no", "fp16", "bf16"]] = _memory(
        None, "no, fp16 or bf16; default: the accelerate config's")
    vae_precision: Literal["fp32", "fp16", "bf16"] = _memory(
        "fp32", "dtype of the base model's VAE when no other VAE is given (the SDXL VAE overflows in fp16)")
    save_dtype: Literal["fp32", "fp16", "bf16"] = _memory("fp32", "(kit) dtype of the saved UNet")
    allow_tf32: bool = _memory(False, "allow TF32 matmuls and convolutions on Ampere and newer")
    use_8bit_adam: bool = _memory(False, "bitsandbytes 8-bit AdamW (CUDA); the same as --optimizer adamw8bit")
    optimizer: Literal["adamw", "adamw8bit", "adamw8bit_torchao"] = _memory(
        "adamw", "(kit) adamw: torch's fused AdamW (fp32 states, 16 bytes per parameter with the weights); "
                 "adamw8bit: bitsandbytes' blockwise 8-bit AdamW (CUDA; 10 bytes); adamw8bit_torchao: torchao's "
                 "8-bit AdamW (its step is compiled on first use)")
    gradient_checkpointing: bool = _memory(False, "recompute UNet activations in the backward pass to save memory")
    enable_xformers_memory_efficient_attention: bool = _memory(
        False, "use xformers attention; falls back to PyTorch SDPA with a warning when unavailable")
    torch_compile: bool = _memory(False, "(kit) torch.compile the UNet (see --torch_compile_mode)")
    torch_compile_mode: Literal["regional", "full"] = _memory(
        "regional", "(kit) regional: compile the UNet's repeated transformer block once and reuse it (diffusers' "
                    "compile_repeated_blocks; seconds to compile); full: torch.compile the whole UNet (the first "
                    "compile of the SDXL UNet took over 4.5 minutes on an H200)")
    ddp_bucket_cap_mb: int = _memory(25, "(kit) DDP gradient bucket size in MB (torch's default 25)")
    ddp_static_graph: bool = _memory(True, "(kit) tell DDP the UNet's graph is the same every step (it is: every "
                                           "parameter gets a gradient every step), so it can plan the all-reduces; "
                                           "off under gradient accumulation, where torch's DDP fails with it",
                                    no_help="(kit) let DDP look for changes in the graph every step")

    cache_latents: bool = _cache(True, "(kit) encode every sample once into the latent cache and train from it",
                                 no_help="(kit) encode on the fly every step instead of using the latent cache")
    latent_cache_dir: Optional[str] = _cache(
        None, "(kit) where the latent cache lives (default: OUTPUT_DIR/latent_cache); share it between runs")
    latent_cache_shard_size: int = _cache(SHARD_SIZE, "(kit) samples per latent-cache shard file (the unit of work split "
                                               "across processes and of resuming a build)")

    lora_rank: int = _lora(0, "(kit) train LoRA adapters of this rank on a frozen UNet instead of the whole UNet "
                              "(0: full fine-tuning); see the README's LoRA section")
    lora_alpha: Optional[float] = _lora(None, "(kit) LoRA scale numerator: the update is (alpha / rank) B A; "
                                              "default: the rank (a scale of 1, as diffusers' LoRA scripts)")
    lora_dropout: float = _lora(0.0, "(kit) dropout on the adapters' input")
    lora_target_modules: str = _lora(
        LORA_TARGETS, "(kit) comma-separated UNet module names that get adapters: every attention projection "
                      "(self and cross) and both feed-forward projections of each transformer block")
    train_conv_in: bool = _lora(False, "(kit) with --lora_rank, also train conv_in in full when starting from an "
                                       "InstructPix2Pix pipeline (a widened 4-channel base always trains it)")
    save_merged: bool = _lora(True, "(kit) with --lora_rank, also save the merged InstructPix2Pix pipeline "
                                    "(inference.py and evaluate.py read it as any run's); false: only the adapter",
                              no_help="(kit) with --lora_rank, save only the adapter (and conv_in)")

    output_dir: str = _checkpoints("instruct-pix2pix-model", "checkpoints, logs, validation images and the final "
                                                             "pipeline")
    checkpointing_steps: int = _checkpoints(500, "save a resumable checkpoint every N optimizer steps")
    checkpoints_total_limit: Optional[int] = _checkpoints(None, "keep at most this many checkpoints")
    resume_from_checkpoint: Optional[str] = _checkpoints(None, "a checkpoint folder or 'latest'")

    validation_steps: int = _validation(100, "validate every N optimizer steps")
    val_image_url_or_path: Optional[str] = _validation(None, "validation input photo (path or URL)")
    validation_prompt: Optional[str] = _validation(None, "validation instruction")
    validation_file: Optional[str] = _validation(
        None, "(kit) JSONL of {\"image\": path, \"prompt\": text} validation pairs (paths relative to the file)")
    num_validation_images: int = _validation(4, "images per validation pair")
    validation_num_inference_steps: int = _validation(20, "(kit) sampling steps for validation images")
    validation_guidance_scale: float = _validation(7.0, "(kit) text guidance for validation images")
    validation_image_guidance_scale: float = _validation(1.5, "(kit) image guidance for validation images")
    validation_split: str = _validation("validation", "(kit) split of a DatasetDict whose pairs give the held-out "
                                                      "loss logged at each validation (see convert_to_hf_dataset.py "
                                                      "--val_fraction)")
    max_heldout_samples: int = _validation(64, "(kit) held-out pairs used for the held-out loss")

    report_to: str = _logging("tensorboard", "the tracker: any accelerate supports (tensorboard, wandb, comet_ml, "
                                             "mlflow, aim, clearml, dvclive, swanlab, trackio), several "
                                             "comma-separated, all (every installed one) or none; one not installed "
                                             "is an error at start")
    logging_dir: str = _logging("logs", "tracker folder, relative to --output_dir")
    tracker_project_name: str = _logging("instruct-pix2pix-xl", "(kit) tracker project / run group name")
    logging_steps: int = _logging(1, "(kit) log loss, lr and samples/s every N optimizer steps: the only moment the "
                                     "training loop waits for the GPU (the recipes for GPUs log every 10)")
    push_to_hub: bool = _logging(False, "upload the final pipeline (never the checkpoints) to the hub")
    hub_token: Optional[str] = _logging(None, "hub token; prefer the HF_TOKEN environment variable (never written "
                                              "anywhere)")
    hub_model_id: Optional[str] = _logging(None, "hub repository id (default: the output folder's name)")

    # diffusers' flags that change nothing here
    non_ema_revision: Optional[str] = _compat(None, "unused (as in diffusers)")
    crops_coords_top_left_h: int = _compat(0, "unused: the real crop is used instead")
    crops_coords_top_left_w: int = _compat(0, "unused: the real crop is used instead")
    local_rank: int = _compat(-1, "unused: accelerate sets the rank")


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(TrainConfig))


def load_recipe(path: str | Path) -> dict:
    """Read a YAML recipe; unknown keys are a UserError naming them and the closest flag names."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {e}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must be a mapping of flag names to values")
    keys = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")  # as on the command line: max-train-steps is max_train_steps
        if name in keys:
            raise UserError(f"config file {path} sets {name} twice; keep one")
        keys[name] = value
    unknown = sorted(set(keys) - set(FIELD_NAMES))
    if unknown:
        named = []
        for key in unknown:
            close = difflib.get_close_matches(key, FIELD_NAMES, n=1)
            named.append(f"{key} (did you mean {close[0]}?)" if close else key)
        raise UserError(f"unknown keys in {path}: {', '.join(named)}; keys are the trainer's flag names "
                        "(see --help)")
    return keys


def _recipe_to_argv(recipe: dict) -> list[str]:
    # The recipe goes through the same parser as the command line, so its values get the same
    # type checks; flags given later on the command line win.
    argv = []
    for key, value in recipe.items():
        if value is None or key == "config":
            continue
        argv += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return argv


def build_parser() -> FlagParser:
    return FlagParser(TrainConfig, "train_instruct_pix2pix_sdxl.py",
                      usage="%(prog)s [--config FILE] [--FLAG VALUE ...]",
                      description="Train an InstructPix2Pix editor from SDXL or SD 1.x/2.x (see README.md).\nFlags override the --config "
                                  "recipe, whose keys are the flags' names.")


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    recipe = load_recipe(known.config) if known.config else {}
    parser = build_parser()
    if recipe:
        parser.parse(_recipe_to_argv(recipe), source=known.config)  # a bad value names the recipe
    return parser.parse(_recipe_to_argv(recipe) + argv)


def to_dict(cfg: TrainConfig, secrets: bool = False) -> dict:
    """The configuration as a plain dict; secrets are removed unless asked for."""
    d = dataclasses.asdict(cfg)
    if not secrets:
        for name in SECRET_FIELDS:
            d.pop(name, None)
    return d


def write_resolved(cfg: TrainConfig, folder: str | Path) -> Path:
    path = Path(folder) / RESOLVED_CONFIG_NAME
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


def optimizer_name(cfg) -> str:
    """--optimizer, with diffusers' --use_8bit_adam as another name for adamw8bit."""
    if cfg.use_8bit_adam and cfg.optimizer not in ("adamw", "adamw8bit"):
        raise UserError(f"--use_8bit_adam and --optimizer {cfg.optimizer} name two optimizers; keep one")
    return "adamw8bit" if cfg.use_8bit_adam else cfg.optimizer


def check_optimizer(cfg: TrainConfig) -> None:
    """The optimizer's package and device, before anything is written (make_optimizer says the
    same, later, to callers that skip `check_config`)."""
    import importlib.util

    import torch

    name = optimizer_name(cfg)
    if name == "adamw8bit" and not torch.cuda.is_available():
        raise UserError("--use_8bit_adam (--optimizer adamw8bit) needs a CUDA GPU (bitsandbytes); use "
                        "--optimizer adamw on this machine")
    if name == "adamw8bit_torchao" and importlib.util.find_spec("torchao") is None:
        raise UserError("--optimizer adamw8bit_torchao needs torchao: pip install torchao")


def check_config(cfg: TrainConfig) -> None:
    """Checks that need no file access beyond existence; each failure is one UserError line."""
    if not cfg.pretrained_model_name_or_path:
        raise UserError("--pretrained_model_name_or_path is required (the base model folder or hub id)")
    if not (cfg.data_dir or cfg.dataset_name or cfg.train_data_dir):
        raise UserError("no training data: pass --data_dir (from convert_to_hf_dataset.py), "
                        "--dataset_name or --train_data_dir")
    if cfg.resolution <= 0 or cfg.resolution % 8:
        raise UserError(f"--resolution {cfg.resolution} must be a positive multiple of 8 (the VAE downsamples 8x)")
    p = cfg.conditioning_dropout_prob
    if p is not None and not 0 <= p <= 1 / 3:
        raise UserError(f"--conditioning_dropout_prob {p} must be between 0 and 1/3 (3p of the samples lose something)")
    for name in ("train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "checkpointing_steps",
                 "validation_steps", "logging_steps"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be at least 1")
    if cfg.max_train_steps is not None and cfg.max_train_steps < 1:
        raise UserError("--max_train_steps must be at least 1")
    if cfg.dataloader_num_workers < 0:
        raise UserError("--dataloader_num_workers must be 0 or more")
    if cfg.hub_token and ("wandb" in cfg.report_to or cfg.report_to == "all"):
        raise UserError("--hub_token with --report_to wandb would expose the token; use `hf auth login` "
                        "or the HF_TOKEN environment variable instead")
    check_lora(cfg)
    check_buckets(cfg)
    from ip2p.training.hub import check_trackers  # imports accelerate: after the cheap checks

    check_trackers(cfg.report_to)
    check_optimizer(cfg)


def check_buckets(cfg: TrainConfig) -> None:
    if cfg.bucket_list and not cfg.aspect_ratio_buckets:
        raise UserError("--bucket_list only applies with --aspect_ratio_buckets: add it or drop --bucket_list")
    if cfg.aspect_ratio_buckets and cfg.bucket_list:
        from ip2p.training.buckets import read_bucket_list

        read_bucket_list(cfg.bucket_list)


def check_lora(cfg: TrainConfig) -> None:
    import importlib.util

    if cfg.lora_rank < 0:
        raise UserError(f"--lora_rank {cfg.lora_rank} must be 0 (full fine-tuning) or a positive rank such as 16")
    if not cfg.lora_rank:
        if cfg.train_conv_in or not cfg.save_merged:
            flag = "--train_conv_in" if cfg.train_conv_in else "--save_merged false"
            raise UserError(f"{flag} only applies to LoRA runs: add --lora_rank R (e.g. 16) or drop it")
        return
    if cfg.lora_alpha is not None and cfg.lora_alpha <= 0:
        raise UserError(f"--lora_alpha {cfg.lora_alpha} must be positive")
    if not 0 <= cfg.lora_dropout < 1:
        raise UserError(f"--lora_dropout {cfg.lora_dropout} must be in [0, 1)")
    if not cfg.lora_target_modules.replace(",", "").strip():
        raise UserError("--lora_target_modules is empty; name UNet modules, e.g. to_q,to_k,to_v,to_out.0")
    if importlib.util.find_spec("peft") is None:
        raise UserError("--lora_rank needs peft: pip install peft")


def silent_default_warnings(cfg: TrainConfig) -> list[str]:
    """Settings that are valid but rarely what is meant, each as one warning line."""
    found = []
    if cfg.conditioning_dropout_prob is None:
        found.append("--conditioning_dropout_prob is not set, so the model never trains without the instruction or "
                     "without the photo; the classifier-free guidance inference uses (--guidance_scale > 1, "
                     "--image_guidance_scale >= 1) needs both unconditional branches: pass "
                     "--conditioning_dropout_prob 0.05 (the paper's value; every recipe in configs/ sets it)")
    if cfg.lr_scheduler == "constant" and cfg.lr_warmup_steps > 0:
        found.append(f"--lr_warmup_steps {cfg.lr_warmup_steps} is ignored by --lr_scheduler constant; pass "
                     "--lr_scheduler constant_with_warmup to warm up, or --lr_warmup_steps 0")
    why = {"non_ema_revision": "the EMA starts from the trained UNet, as in diffusers",
           "crops_coords_top_left_h": "the real crop of each image goes into the micro-conditioning",
           "crops_coords_top_left_w": "the real crop of each image goes into the micro-conditioning",
           "local_rank": "accelerate sets each process's rank"}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.metadata.get("group") == "accepted for compatibility" and value != f.default:
            found.append(f"--{f.name} {value} has no effect ({why[f.name]}); it is accepted so that diffusers "
                         "command lines run unchanged")
    return found
