"""The command line of every script: a dataclass whose fields are the flags, and one parser for it.

A field's name is the flag's name; its type, default and `help` metadata are the flag's. The
parser is plain argparse, so that parsing and `--help` import nothing heavy (HfArgumentParser
pulls in transformers; inference.py and evaluate.py keep their flags here, away from torch). It
accepts the forms HfArgumentParser accepts, which the diffusers flags and the YAML recipes use,
and holds every script to the same rules:

- `--max-train-steps` is `--max_train_steps`; a flag is never abbreviated (`--max_train_step 5`
  is refused, not taken for `--max_train_steps`);
- a bool field is `--flag` (true), `--flag true|false`, and, where it defaults to true,
  `--no_flag`, which has its own help (metadata `no_help`);
- a mistyped flag, a bad value or a missing flag is a `UserError`: one line naming it (and the
  closest flag, for a mistyped one), exit code 2 through `ip2p.errors.cli`;
- each default is shown once, and fields with a `group` are listed under that heading, in the
  order the groups first appear.

Other metadata: `choices` (for a str field), `metavar`.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from ip2p.errors import UserError

FLAG_RULES = ("flag spelling: --a-flag and --a_flag are the same flag; flags are never abbreviated;\n"
              "a true/false flag given alone is true (--flag, --flag true, --flag false).")


def to_bool(text: str) -> bool:
    # HfArgumentParser's spellings, so that every command line and recipe that worked still works
    low = text.lower()
    if low in ("true", "yes", "y", "t", "1"):
        return True
    if low in ("false", "no", "n", "f", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expects true or false, not {text!r}")


def _number(kind: type, what: str):
    def convert(text: str):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expects {what}, not {text!r}") from None

    return convert


def _choice(choices: tuple):
    by_text = {str(c): c for c in choices}

    def convert(text: str):
        if text not in by_text:
            raise argparse.ArgumentTypeError(f"expects one of {', '.join(by_text)}, not {text!r}")
        return by_text[text]

    return convert


CONVERTERS = {bool: to_bool, int: _number(int, "a whole number"), float: _number(float, "a number"), str: str}


def _one_type(hint: Any) -> Any:
    """`X | None` -> X: a flag converts its text to one type."""
    if get_origin(hint) in (Union, types.UnionType):
        kinds = [a for a in get_args(hint) if a is not type(None)]
        if len(kinds) == 1:
            return kinds[0]
    return hint


def _metavar(name: str, kind: Any, choices) -> str:
    if choices:
        return "{" + ",".join(map(str, choices)) + "}"
    if kind is bool:
        return "true|false"
    if kind is int:
        return "N"
    if kind is float:
        return "X"
    if name.endswith("_column"):
        return "COLUMN"
    if name.endswith(("_dir", "_path", "_file", "_image")) or "path" in name:
        return "PATH"
    return "TEXT"


def _with_default(help: str, default: Any) -> str:
    # The default is stated once: by the help text where it explains one, else appended here.
    if default is None or default is False or "default" in help.lower():
        return help
    shown = "true" if default is True else default
    return f"{help} (default: {shown})"


class FlagParser(argparse.ArgumentParser):
    """An argparse parser built from a dataclass of flags; `parse(argv)` returns the dataclass."""

    def __init__(self, flags: type, script: str, usage: str | None = None, epilog: str | None = None,
                 **kwargs):
        self.flags, self.script, self.required, self.source = flags, script, [], None
        super().__init__(prog=script, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
                         epilog=f"{epilog}\n{FLAG_RULES}" if epilog else FLAG_RULES, **kwargs)
        groups: dict[str, argparse._ArgumentGroup] = {}
        hints = get_type_hints(flags)
        for f in dataclasses.fields(flags):
            if f.init:
                title = f.metadata.get("group")
                if title and title not in groups:
                    groups[title] = self.add_argument_group(title)
                self._add_flag(groups.get(title, self), f, hints[f.name])
        required = " ".join(f"--{name} {self._option_string_actions['--' + name].metavar}"
                            for name in self.required)
        self.usage = usage or " ".join(filter(None, ["%(prog)s", required, "[--FLAG VALUE ...]"]))

    def _add_flag(self, container, f: dataclasses.Field, hint: Any) -> None:
        meta = dict(f.metadata)
        help, no_help = meta.pop("help", ""), meta.pop("no_help", None)
        meta.pop("group", None)
        kind = _one_type(hint)
        choices = meta.pop("choices", None) or (get_args(kind) if get_origin(kind) is Literal else None)
        if choices is None and kind not in CONVERTERS:
            raise TypeError(f"flag --{f.name}: {hint} is not a flag type (bool, int, float, str, Literal)")
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        kw = {"dest": f.name, "type": _choice(choices) if choices else CONVERTERS[kind],
              "metavar": _metavar(f.name, kind, choices)}
        if kind is bool:
            kw.update(nargs="?", const=True)
        if default is dataclasses.MISSING:
            # checked after the unknown flags, so a mistyped required flag gets its suggestion
            self.required.append(f.name)
            kw["default"], help = argparse.SUPPRESS, f"{help} (required)"
        else:
            kw["default"], help = default, _with_default(help, default)
        container.add_argument(f"--{f.name}", help=help.replace("%", "%%"), **{**kw, **meta})
        if kind is bool and default is True:
            if not no_help:
                raise TypeError(f"flag --{f.name} defaults to true: give --no_{f.name} its own help (no_help)")
            container.add_argument(f"--no_{f.name}", dest=f.name, action="store_false", default=argparse.SUPPRESS,
                                   help=no_help.replace("%", "%%"))

    def normalize(self, argv: list[str]) -> list[str]:
        """`--a-flag[=v]` -> `--a_flag[=v]` where that is a flag; values and anything after `--` untouched."""
        out = list(argv)
        for i, arg in enumerate(out):
            if arg == "--":
                break
            if arg.startswith("--"):
                name, eq, value = arg.partition("=")
                spelled = "--" + name[2:].replace("-", "_")
                if spelled in self._option_string_actions:
                    out[i] = spelled + eq + value
        return out

    def parse(self, argv: list[str] | None = None, source: str | None = None):
        """The filled dataclass. `source` names where the arguments came from in error messages."""
        argv = list(sys.argv[1:] if argv is None else argv)
        self.source = source
        namespace, extra = self.parse_known_args(self.normalize(argv))
        flags = [a for a in extra if a.startswith("-") and not re.fullmatch(r"-[\d.]+(e-?\d+)?", a)]
        if flags:
            self.error(self.unknown(flags))
        if extra:
            self.error(f"{extra[0]!r} follows no flag (a value goes right after its flag: --seed 3)")
        missing = [f"--{name}" for name in self.required if name not in vars(namespace)]
        if missing:
            self.error(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required")
        return self.flags(**vars(namespace))

    def unknown(self, flags: list[str]) -> str:
        known = [s for s in self._option_string_actions if s.startswith("--")]
        named = []
        for flag in dict.fromkeys(a.partition("=")[0] for a in flags):
            close = difflib.get_close_matches("--" + flag.lstrip("-").replace("-", "_"), known, n=1)
            named.append((flag, close[0] if close else None))
        if len(named) == 1:
            flag, close = named[0]
            return f"unknown flag {flag}" + (f": did you mean {close}?" if close else "")
        return "unknown flags " + ", ".join(f"{f} (did you mean {c}?)" if c else f for f, c in named)

    def error(self, message: str):
        # argparse's "argument --seed: expected one argument" -> "--seed needs a value"
        m = re.fullmatch(r"argument ([^:]+): (.*)", message, flags=re.S)
        if m:
            flag, problem = m.group(1).split("/")[0], m.group(2)
            problem = {"expected one argument": "needs a value"}.get(problem, problem)
            problem = re.sub(r"^ignored explicit argument (.*)", r"takes no value (got \1)", problem)
            message = f"{flag} {problem}"
        where = f"in {self.source}: " if self.source else ""
        raise UserError(f"{where}{message} (see python {self.script} --help)")


# ---------------------------------------------------------------- the flags of inference.py and evaluate.py


def flag(default, help: str, **kw):
    """A dataclass field that is a flag: its default, its --help text, and FlagParser's options
    (`group`: the --help section; `no_help`: the help of --no_NAME; `metavar`)."""
    return field(default=default, metadata={"help": help, **kw})



@dataclass
class InferenceArgs:
    """Every flag of `inference.py` (the field name is the flag name); see its docstring."""

    model_path: str = field(metadata={"help": "trained pipeline folder (trainer's --output_dir)"})
    input_image: str | None = flag(None, "a photo, or a folder of photos (needs --output_dir)")
    instruction: str | None = flag(None, "the edit, e.g. 'turn the sky into sunset'")
    output_path: str | None = flag(None, "the edited photo (one input); its suffix picks the format")
    output_dir: str | None = flag(None, "folder for many outputs, each named after its input "
                                      "(photo.jpg -> photo.png; photo_1.png, ... on collisions)")
    prompts_file: str | None = flag(None, "JSONL of edits: {\"image\": ..., \"instruction\": ...[, "
                                        "\"output\": ...]}, images relative to the file")
    num_inference_steps: int = flag(30, "denoising steps")
    guidance_scale: float = flag(3.0, "text guidance: how strongly to follow the instruction "
                                    "(3.0 as on the public model card; 5-7.5 for stronger edits)")
    image_guidance_scale: float = flag(1.5, "image guidance: how closely to keep the input photo "
                                          "(higher = more faithful, weaker edit)")
    seed: int = flag(0, "noise seed (CPU generator: the same output on any device); every photo "
                      "and sweep cell starts from it")
    negative_prompt: str | None = flag(None, "what to steer away from (default: the zero "
                                           "embedding the model was trained with)")
    resolution: int | None = flag(None, "long side of the output in pixels (default: the model's "
                                      "training_config.yaml 'resolution', else the UNet's own)")
    sweep_image_guidance: str | None = flag(None, "e.g. 1.0,1.5,2.0: write a grid per photo, these "
                                                "image guidance values as rows")
    sweep_guidance: str | None = flag(None, "e.g. 3,5,7.5: the grid's text guidance columns")
    device: str | None = flag(None, "cuda, cuda:1, mps or cpu (default: the best available)")
    dtype: str | None = flag(None, "fp32, fp16 or bf16 (default: bf16 or fp16 on cuda, fp16 on "
                                 "mps, fp32 on cpu); see the fp16 note above")
    enable_model_cpu_offload: bool = flag(False, "keep only the running component on the GPU "
                                               "(small GPUs; slower)")
    vae_path: str | None = flag(None, "a VAE to use instead (a folder with config.json, or a "
                                    "pipeline folder with vae/), e.g. an fp16-safe one")
    lora: str | None = flag(None, "a LoRA run's output folder (pytorch_lora_weights.safetensors, and "
                                "conv_in.safetensors when it trained one): applied to --model_path, which "
                                "may then be the 4-channel base the adapter was trained on")
    lora_scale: float = flag(1.0, "strength of the --lora adapter (conv_in, a whole weight, is not scaled)")


DEFAULT_CLIP = "openai/clip-vit-large-patch14"  # InstructPix2Pix's ViT-L/14


@dataclass
class EvaluateArgs:
    """Every flag of `evaluate.py` (the field name is the flag name); see its docstring."""

    model_path: str = field(metadata={"help": "trained pipeline folder (trainer's --output_dir)"})
    data_dir: str = field(metadata={"help": "held-out pairs, a folder written by "
                                            "convert_to_hf_dataset.py (or a DatasetDict)"})
    output_dir: str = field(metadata={"help": "new folder for metrics, images, plot and grid"})
    clip_model_name_or_path: str = flag(DEFAULT_CLIP, "CLIP model: a local folder, or a hub id "
                                                    "already in the Hugging Face cache")
    split: str | None = flag(None, "split of a DatasetDict (default: validation, else test, else "
                                 "train)")
    max_samples: int | None = flag(None, "evaluate N pairs of the split, drawn at random with "
                                       "--seed and kept in row order (default: all)")
    image_guidance_scales: str = flag("1.0,1.2,1.5,1.8,2.2", "image guidance values to sweep")
    guidance_scale: float = flag(7.5, "text guidance, fixed over the sweep (the "
                                    "InstructPix2Pix paper's evaluation uses 7.5)")
    num_inference_steps: int = flag(30, "denoising steps")
    resolution: int | None = flag(None, "long side of the outputs (default: the model's "
                                      "training_config.yaml 'resolution', else the UNet's own)")
    seed: int = flag(0, "noise seed, the same for every sample and setting; also draws the "
                      "--max_samples subset")
    grid_samples: int = flag(4, "rows of grid.png (the first N samples)")
    device: str | None = flag(None, "cuda, cuda:1, mps or cpu (default: the best available)")
    dtype: str | None = flag(None, "fp32, fp16 or bf16 for the pipeline (CLIP runs in fp32)")
    overwrite: bool = flag(False, "replace an existing, non-empty --output_dir")
