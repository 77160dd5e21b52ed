"""One adapter's pipeline: plan (headers only) -> score (the kernel) -> assemble (decide, merge, write bytes).

    plan           which model weight each adapter module scores against, from headers
    score          the scoring kernel: rho of N adapters' layers against one module's V, and the repair's effect
    assemble       decisions, merged layers and the PEFT adapter's bytes
    merge_command  `merge`: the whole pipeline for one adapter, committed atomically
"""

from .assemble import AssembledAdapter, assemble_adapter, first_non_finite, output_config
from .merge_command import Inputs, merge_to_dir, open_inputs, repair_adapter
from .plan import ModulePlan, plan_adapter
from .score import (
    ModuleScore,
    RepairInputs,
    SafetyProjection,
    WeightLayout,
    delta_from_pair,
    read_weight_pair,
    resolve_device,
    score_module,
)

__all__ = [
    "AssembledAdapter", "Inputs", "ModulePlan", "ModuleScore", "RepairInputs", "SafetyProjection", "WeightLayout",
    "assemble_adapter",
    "delta_from_pair", "first_non_finite", "merge_to_dir", "open_inputs", "output_config", "plan_adapter",
    "read_weight_pair", "repair_adapter", "resolve_device", "score_module",
]
