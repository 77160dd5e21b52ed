"""The algorithm and the merge arithmetic: pure torch, no files, no Ray.

    subspace   V, rho = cos(vec(C dW), vec(dW)) without forming C, batched over adapters
    methods    merge methods (PEFT's arithmetic) behind one registry
    settings   MergeSettings: every merge setting declared once, with its help and check
    policy     which layers are repaired (selections) and how (policies), behind registries
    memory     what scoring a module costs, known before it is spent
"""

from .memory import PROCESS_BASELINE, ModuleCost, available_memory, check_fits, fmt
from .methods import LINEAR_IN_B, METHODS, Lora, kept_layer, kept_layers, merge_layer, module_seed, projected_layer
from .names import natural_key
from .policy import (
    POLICIES,
    SELECTIONS,
    LayerAction,
    Repair,
    below_tau,
    may_be_selected,
    merged_layer,
    needs_projection,
    selected,
)
from .settings import FIELD_CHECKS, SELECTION_FIELDS, MergeSettings, PolicyName, Selection
from .subspace import (
    PANEL,
    alignment_delta,
    check_same_shape,
    lora_rho,
    project,
    project_lora_b,
    rho_from_projections,
    rho_reference,
    safelora_b,
)

__all__ = [
    "FIELD_CHECKS", "LINEAR_IN_B", "PANEL", "METHODS", "POLICIES", "PROCESS_BASELINE", "SELECTIONS", "SELECTION_FIELDS",
    "LayerAction", "Lora", "MergeSettings", "ModuleCost", "PolicyName", "Repair", "Selection", "alignment_delta",
    "available_memory", "below_tau", "check_fits", "check_same_shape", "fmt", "kept_layer", "kept_layers",
    "lora_rho", "may_be_selected", "merge_layer", "merged_layer", "module_seed", "natural_key", "needs_projection",
    "project", "project_lora_b", "projected_layer", "rho_from_projections", "rho_reference", "safelora_b", "selected",
]
