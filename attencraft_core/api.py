"""The core's public API: what the command line, the ComfyUI nodes, the demo and the measuring world call.

Everything a caller outside `attencraft_core` needs is importable from here; the modules behind it may change.
"""

from .attention import AttentionStore, capture_attention, layer_factors
from .checkpoint import load_checkpoint, save_checkpoint
from .cli import run_command
from .concept_file import PLACEHOLDER_RE, ConceptSet, embedding_key
from .concept_tokens import ConceptTokens
from .concepts import Concept, add_concept_tokens, concepts_prompt, parse_concepts
from .demo import DemoResult, check_demo_settings, demo_prompts, run_demo
from .devices import PRECISIONS, default_device, resolve_device, resolve_dtype
from .distributed import Processes
from .encoding import decode_latents, encode_images, encode_prompts
from .errors import AttenCraftError
from .families import family_named, family_of
from .frozen_fp8 import FLOAT8, keep_float8_linears
from .generation import class_images, generate
from .images import contact_sheet, ensure_rgb, image_to_tensor, load_image, mask_to_image, overlay, tensor_to_image
from .joint_attention import record_joint_attention
from .lora import set_lora_strength
from .masks import MaskResult, extract_masks, masks_from_latents
from .model_loading import SDComponents, check_loading_info, load_components, sd_noise_scheduler
from .outputs import atomic_write, ensure_out_dir, safe_name, save_image, save_mask_outputs, write_json
from .options import settings_of, value_type
from .progress import Progress, ProgressBars, no_progress
from .run_folder import earlier_run_files, is_concept_set, is_snapshot
from .settings import MaskOptions, TrainOptions
from .training import Trainer, TrainingCancelled, TrainResult
from .validation import require_number, require_seed

__all__ = [
    "FLOAT8", "PRECISIONS", "keep_float8_linears", "record_joint_attention",
    "PLACEHOLDER_RE", "ConceptTokens", "family_named", "family_of", "AttenCraftError", "AttentionStore", "Concept", "ConceptSet", "DemoResult", "MaskOptions", "MaskResult",
    "Processes", "Progress", "ProgressBars", "SDComponents", "TrainOptions", "TrainResult", "Trainer", "TrainingCancelled",
    "add_concept_tokens", "earlier_run_files", "is_concept_set", "is_snapshot", "atomic_write", "capture_attention", "check_demo_settings", "check_loading_info", "class_images", "concepts_prompt", "contact_sheet",
    "decode_latents", "default_device", "demo_prompts", "embedding_key", "encode_images", "encode_prompts",
    "ensure_out_dir", "ensure_rgb", "extract_masks", "generate", "image_to_tensor", "layer_factors",
    "load_checkpoint", "load_components", "load_image", "mask_to_image", "masks_from_latents", "no_progress",
    "overlay", "parse_concepts", "require_number", "require_seed", "resolve_device", "resolve_dtype", "run_command", "run_demo",
    "safe_name", "save_checkpoint", "sd_noise_scheduler", "settings_of", "value_type", "save_image", "save_mask_outputs", "set_lora_strength", "tensor_to_image",
    "write_json",
]
