"""The trainer's flags: the diffusers names, YAML recipes, overrides, unknown keys, secrets."""

import pytest
import yaml

from ip2p.training.config import RESOLVED_CONFIG_NAME, TrainConfig, check_config, parse_config, write_resolved
from ip2p.errors import UserError

# Every flag of diffusers' examples/instruct_pix2pix/train_instruct_pix2pix_sdxl.py.
DIFFUSERS_FLAGS = """pretrained_model_name_or_path pretrained_vae_model_name_or_path vae_precision revision
variant dataset_name dataset_config_name train_data_dir original_image_column edited_image_column
edit_prompt_column val_image_url_or_path validation_prompt num_validation_images validation_steps
max_train_samples output_dir cache_dir seed resolution crops_coords_top_left_h crops_coords_top_left_w
center_crop random_flip train_batch_size num_train_epochs max_train_steps gradient_accumulation_steps
gradient_checkpointing learning_rate scale_lr lr_scheduler lr_warmup_steps conditioning_dropout_prob
use_8bit_adam allow_tf32 use_ema non_ema_revision dataloader_num_workers adam_beta1 adam_beta2
adam_weight_decay adam_epsilon max_grad_norm push_to_hub hub_token hub_model_id logging_dir
mixed_precision report_to local_rank checkpointing_steps checkpoints_total_limit resume_from_checkpoint
enable_xformers_memory_efficient_attention""".split()

BOOL_FLAGS = {"center_crop", "random_flip", "gradient_checkpointing", "scale_lr", "use_8bit_adam", "allow_tf32",
              "use_ema", "push_to_hub", "enable_xformers_memory_efficient_attention"}


def test_every_diffusers_flag_is_accepted_with_its_name():
    from ip2p.training.config import FIELD_NAMES

    assert set(DIFFUSERS_FLAGS) <= set(FIELD_NAMES)
    argv = []
    for flag in DIFFUSERS_FLAGS:
        if flag in BOOL_FLAGS:
            argv.append(f"--{flag}")
    cfg = parse_config(argv + ["--mixed_precision", "bf16", "--vae_precision", "fp16", "--seed", "7"])
    assert all(getattr(cfg, f) is True for f in BOOL_FLAGS)
    assert cfg.mixed_precision == "bf16" and cfg.vae_precision == "fp16" and cfg.seed == 7


def test_diffusers_defaults_are_kept():
    cfg = parse_config([])
    assert (cfg.resolution, cfg.train_batch_size, cfg.learning_rate, cfg.lr_scheduler) == (256, 16, 1e-4, "constant")
    assert (cfg.original_image_column, cfg.edit_prompt_column, cfg.edited_image_column) == (
        "input_image", "edit_prompt", "edited_image")
    assert cfg.seed is None and cfg.conditioning_dropout_prob is None and cfg.checkpointing_steps == 500


def test_recipe_sets_defaults_and_the_command_line_wins(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("resolution: 512\ntrain_batch_size: 4\nlearning_rate: 5e-6\nuse_ema: true\n")
    cfg = parse_config(["--config", str(recipe), "--train_batch_size", "3"])
    assert cfg.resolution == 512 and cfg.train_batch_size == 3 and cfg.learning_rate == 5e-6 and cfg.use_ema


RECIPES = ("configs/sdxl_1024_8xa100.yaml", "configs/sd15_512_8xa100.yaml", "configs/continue_ip2p_512.yaml",
           "configs/sdxl_1024_lora_24gb.yaml", "configs/sd15_512_lora_24gb.yaml", "configs/tiny_cpu.yaml")


def test_shipped_recipes_parse():
    for name in RECIPES:
        parse_config(["--config", name])
    sd15 = parse_config(["--config", "configs/sd15_512_8xa100.yaml"])
    # the InstructPix2Pix paper: total batch 1024 on 8 GPUs, lr 1e-4 without warmup, 10k steps
    assert sd15.train_batch_size * 8 * sd15.gradient_accumulation_steps == 1024 and sd15.resolution == 512
    assert (sd15.learning_rate, sd15.lr_warmup_steps, sd15.max_train_steps, sd15.scale_lr) == (1e-4, 0, 10000, False)
    more = parse_config(["--config", "configs/continue_ip2p_512.yaml"])
    assert more.pretrained_model_name_or_path == "timbrooks/instruct-pix2pix" and more.learning_rate < sd15.learning_rate
    cfg = parse_config(["--config", "configs/sdxl_1024_8xa100.yaml"])
    assert (cfg.train_batch_size, cfg.gradient_accumulation_steps) == (4, 2)  # 64 per optimizer step on 8 GPUs
    # no gradient checkpointing: 52 GiB per GPU measured at batch 4 (see the recipe's comment)
    assert (cfg.resolution, cfg.mixed_precision, cfg.use_8bit_adam, cfg.gradient_checkpointing) == (1024, "bf16", True, False)
    assert cfg.logging_steps == 10 and not cfg.torch_compile and cfg.torch_compile_mode == "regional"
    for name in ("configs/sdxl_1024_lora_24gb.yaml", "configs/sd15_512_lora_24gb.yaml"):
        lora = parse_config(["--config", name])
        assert lora.lora_rank == 16 and lora.gradient_checkpointing and lora.mixed_precision == "bf16"
        assert lora.save_merged and lora.lora_target_modules == TrainConfig().lora_target_modules
        # SDXL was trained on aspect-ratio buckets; the SD 1.5 recipes keep the paper's square crops
        assert lora.aspect_ratio_buckets == name.startswith("configs/sdxl") and not lora.bucket_list
    assert cfg.aspect_ratio_buckets and not sd15.aspect_ratio_buckets and not TrainConfig().aspect_ratio_buckets
    assert (cfg.use_ema, cfg.conditioning_dropout_prob, cfg.learning_rate, cfg.lr_scheduler) == (False, 0.05, 5e-6, "constant")


def test_unknown_recipe_keys_are_an_error(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("resolution: 512\nlearning_rat: 1e-5\n")
    with pytest.raises(UserError, match="unknown keys.*learning_rat"):
        parse_config(["--config", str(recipe)])


def test_resolved_config_has_no_secrets(tmp_path):
    cfg = parse_config(["--hub_token", "hf_secret_value", "--resolution", "512"])
    text = write_resolved(cfg, tmp_path).read_text()
    assert "hf_secret_value" not in text and "hub_token" not in text
    assert yaml.safe_load((tmp_path / RESOLVED_CONFIG_NAME).read_text())["resolution"] == 512


@pytest.mark.parametrize("argv, message", [
    ([], "pretrained_model_name_or_path is required"),
    (["--pretrained_model_name_or_path", "m"], "no training data"),
    (["--pretrained_model_name_or_path", "m", "--data_dir", "d", "--resolution", "100"], "multiple of 8"),
    (["--pretrained_model_name_or_path", "m", "--data_dir", "d", "--conditioning_dropout_prob", "0.5"], "1/3"),
    (["--pretrained_model_name_or_path", "m", "--data_dir", "d", "--hub_token", "x", "--report_to", "wandb"], "HF_TOKEN"),
])
def test_bad_flag_values_are_user_errors(argv, message):
    with pytest.raises(UserError, match=message):
        check_config(parse_config(argv))


def test_push_to_hub_uploads_the_pipeline_but_no_checkpoint_log_or_cache(tmp_path):
    from huggingface_hub.utils import filter_repo_objects

    from ip2p.training.hub import hub_ignore_patterns

    files = ["model_index.json", "unet/diffusion_pytorch_model.safetensors", "README.md", "validation/step-6.png",
             "training_config.yaml", "checkpoint-500/optimizer.bin", "checkpoint-500/model.safetensors",
             "checkpoint-10.tmp/random_states_0.pkl", "logs/metrics.jsonl", "logs/instruct-pix2pix-xl/events.out",
             "latent_cache/abc/shard-00000.safetensors", "my_cache/abc/index.json"]
    kept = ["model_index.json", "unet/diffusion_pytorch_model.safetensors", "README.md", "validation/step-6.png",
            "training_config.yaml"]
    cfg = parse_config(["--output_dir", str(tmp_path)])
    assert list(filter_repo_objects(files, ignore_patterns=hub_ignore_patterns(cfg, tmp_path))) == kept + [
        "my_cache/abc/index.json"]
    cfg = parse_config(["--output_dir", str(tmp_path), "--latent_cache_dir", str(tmp_path / "my_cache")])
    assert list(filter_repo_objects(files, ignore_patterns=hub_ignore_patterns(cfg, tmp_path))) == kept + [
        "latent_cache/abc/shard-00000.safetensors"]


def test_silent_defaults_get_a_warning_and_the_recipes_have_none():
    from ip2p.training.config import silent_default_warnings

    bare = silent_default_warnings(parse_config([]))
    assert len(bare) == 2
    assert "--conditioning_dropout_prob is not set" in bare[0] and "guidance" in bare[0]
    assert "--lr_warmup_steps 500 is ignored by --lr_scheduler constant" in bare[1]
    assert silent_default_warnings(parse_config(["--conditioning_dropout_prob", "0.05", "--lr_scheduler",
                                                 "constant_with_warmup"])) == []
    for recipe in RECIPES:
        assert silent_default_warnings(parse_config(["--config", recipe])) == []


def test_help_states_the_crop_policy():
    from ip2p.training.config import build_parser

    text = " ".join(build_parser().format_help().split())
    assert "drawn once per sample from --seed and kept for the whole run" in text


def test_flags_accepted_for_compatibility_warn_when_set():
    from ip2p.training.config import silent_default_warnings

    base = ["--conditioning_dropout_prob", "0.05", "--lr_warmup_steps", "0"]
    assert silent_default_warnings(parse_config(base)) == []
    found = silent_default_warnings(parse_config([*base, "--non_ema_revision", "main", "--crops_coords_top_left_h",
                                                  "16", "--local_rank", "0"]))
    assert len(found) == 3 and all("has no effect" in w for w in found)
    assert found[0].startswith("--non_ema_revision main") and "--crops_coords_top_left_h 16" in found[1]
    assert "the real crop of each image" in found[1] and "accelerate" in found[2]
