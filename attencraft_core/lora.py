"""LoRA adapters on the UNet (PEFT) and their kohya-format export, which ComfyUI and A1111 load.

peft and diffusers are imported where used: the ComfyUI pack imports the core's API when ComfyUI starts, and a
missing package must then be a node error, not a pack that fails to load (tests/unit/test_repository.py checks it).
"""

from __future__ import annotations

import re

import torch

from .errors import AttenCraftError

ADAPTER = "attencraft"
# Regexes over UNet module names (PEFT matches them in full).
TARGETS = {
    "kv": r".*attn2\.(to_k|to_v)",
    "qkvo": r".*attn2\.(to_q|to_k|to_v|to_out\.0)",
    "attn": r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)",
    "all": r".*(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2)",
}


def add_lora(unet, rank: int = 16, alpha: float | None = None, targets: str = "kv", seed: int = 0,
             patterns: dict[str, str] = TARGETS) -> None:
    """Wrap the target layers (`patterns[targets]`, the family's regex; a UNet's by default) with trainable LoRA
    (base weights stay frozen); alpha defaults to the rank."""
    from peft import LoraConfig  # on use (see the module docstring)

    if targets not in patterns:
        raise AttenCraftError(f"Unknown LoRA targets {targets!r}: use one of {', '.join(patterns)}.")
    if rank < 1:
        raise AttenCraftError(f"LoRA rank must be at least 1, got {rank}.")
    pattern = re.compile(patterns[targets])
    widths = [min(m.in_features, m.out_features) for n, m in unet.named_modules()
              if isinstance(m, torch.nn.Linear) and pattern.fullmatch(n)]
    if widths and rank > min(widths):
        raise AttenCraftError(f"LoRA rank {rank} is larger than the narrowest layer it adapts ({min(widths)} "
                              f"features): a rank above that adds nothing but memory. Use {min(widths)} or less "
                              "(16 is the default).")
    config = LoraConfig(r=rank, lora_alpha=float(alpha if alpha is not None else rank),
                        target_modules=patterns[targets], init_lora_weights=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(config, adapter_name=ADAPTER)
    for name, param in unet.named_parameters():
        param.requires_grad_("lora_" in name)


def lora_parameters(unet) -> list[torch.nn.Parameter]:
    return [p for n, p in unet.named_parameters() if "lora_" in n]


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """{"<module path>.lora_A.weight"|"...lora_B.weight": float32 CPU tensor}, PEFT's own state dict of the adapter."""
    from peft import get_peft_model_state_dict  # on use, as every diffusers/peft import reachable from api.py

    state = get_peft_model_state_dict(unet, adapter_name=ADAPTER)
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}


def copy_lora_weights(unet, state: dict[str, torch.Tensor]) -> None:
    """Load a lora_state_dict into the UNet's existing adapter (PEFT's set_peft_model_state_dict); every key and
    shape must match the adapter, or nothing is loaded."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict  # on use (see lora_state_dict)

    current = get_peft_model_state_dict(unet, adapter_name=ADAPTER)
    for key, value in state.items():
        if key not in current or current[key].shape != value.shape:
            raise AttenCraftError(f"LoRA weight {key} does not fit this model (another base model or rank?).")
    missing = sorted(set(current) - set(state))
    if missing:
        raise AttenCraftError(f"The LoRA weights lack {len(missing)} of this adapter's tensors (e.g. {missing[0]}).")
    with torch.no_grad():
        set_peft_model_state_dict(unet, state, adapter_name=ADAPTER)


def load_lora_state_dict(unet, state: dict[str, torch.Tensor], rank: int, alpha: float, targets: str,
                         patterns: dict[str, str] = TARGETS) -> None:
    """Add the adapter (if missing), copy weights from a lora_state_dict and freeze everything."""
    if not any("lora_" in n for n, _ in unet.named_parameters()):
        add_lora(unet, rank, alpha, targets, patterns=patterns)
    copy_lora_weights(unet, state)
    for param in unet.parameters():
        param.requires_grad_(False)


def set_lora_strength(unet, strength: float) -> None:
    """Scale the adapter's weight change by `strength` (1 = as trained), what ComfyUI's LoRA strength does."""
    from peft.tuners.lora import LoraLayer  # on use (see the module docstring)

    layers = [m for m in unet.modules() if isinstance(m, LoraLayer)]
    if not layers:
        raise AttenCraftError("This UNet has no AttenCraft LoRA to set the strength of: apply a concept set first.")
    for layer in layers:
        layer.set_scale(ADAPTER, strength)


def kohya_name(module_path: str) -> str:
    return "lora_unet_" + module_path.replace(".", "_")


def to_kohya(state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """PEFT keys -> `lora_unet_<path>.lora_down.weight / .lora_up.weight / .alpha` with diffusers'
    convert_state_dict_to_kohya, then the real lora_alpha (that function writes the rank as alpha)."""
    from diffusers.utils import convert_state_dict_to_kohya  # on use (see lora_state_dict)

    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in state.items()})
    return {k: torch.tensor(float(alpha)) if k.endswith(".alpha") else v for k, v in kohya.items()}


def from_kohya(kohya: dict[str, torch.Tensor], module_paths: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """Inverse of to_kohya given the UNet's module paths. Returns the PEFT state and alpha per module path."""
    by_name = {kohya_name(p): p for p in module_paths}
    state, alphas = {}, {}
    for key, value in kohya.items():
        base, _, suffix = key.partition(".")
        if base not in by_name:
            raise AttenCraftError(f"kohya key {key} names no layer of this UNet.")
        path = by_name[base]
        if suffix == "alpha":
            alphas[path] = float(value)
        else:
            state[f"{path}.lora_{'A' if suffix == 'lora_down.weight' else 'B'}.weight"] = value
    return state, alphas


def lora_deltas(state: dict[str, torch.Tensor], alphas: dict[str, float]) -> dict[str, torch.Tensor]:
    """Weight change of each wrapped layer: up @ down * alpha / rank."""
    out = {}
    for key, down in state.items():
        if ".lora_A." in key:
            path = key.split(".lora_A.")[0]
            up = state[f"{path}.lora_B.weight"]
            out[path] = up @ down * (alphas[path] / down.shape[0])
    return out
