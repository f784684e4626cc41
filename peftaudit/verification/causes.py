"""Named causes: why a tensor changed that should not have, or did not change that should."""

from __future__ import annotations

from enum import Enum


class Cause(Enum):
    """A likely cause the verdict names for a finding."""

    # Something changed that should not have.
    MERGE_ROUNDING = "merge-rounding"
    ROUNDING = "rounding"
    ADAPTER_INIT = "adapter-init"
    DTYPE_EQUAL_VALUES = "dtype-equal-values"
    TRAINED_BIAS = "trained-bias"
    LEFT_TRAINABLE = "left-trainable"
    MODIFIED_IN_PLACE = "modified-in-place"
    TIED_ONE_SIDE = "tied-one-side"
    # Something did not change that should have.
    LORA_B_ZERO = "lora-b-zero"
    ONE_STEP = "one-step"
    EMPTY_TENSOR = "empty-tensor"
    NOT_TRAINABLE = "not-trainable"
    NOT_IN_OPTIMIZER = "not-in-optimizer"
    NO_UPDATE = "no-update"
    NO_GRADIENT = "no-gradient"
    NOT_MERGED = "not-merged"

    @property
    def explanation(self) -> str:
        """One sentence a user reads next to the finding."""
        return EXPLANATIONS[self]


EXPLANATIONS: dict[Cause, str] = {
    Cause.MERGE_ROUNDING: (
        "merge/unmerge rounding: a weight of an adapted module moved by at most a rounding step, "
        "as merge_adapter() then unmerge_adapter() does"
    ),
    Cause.ROUNDING: (
        "rounding only: every change is a rounding step of this or a narrower dtype (a cast round-trip, "
        "e.g. saving in bf16 and loading back)"
    ),
    Cause.ADAPTER_INIT: (
        "adapter initialisation: PiSSA/OLoRA/CorDA/LoftQ-style init rewrites the base weight of each target module"
    ),
    Cause.DTYPE_EQUAL_VALUES: (
        "dtype change with equal values (e.g. prepare_model_for_kbit_training upcasting norms to fp32)"
    ),
    Cause.TRAINED_BIAS: (
        "a bias was trained though not expected (bias='none' in the adapter config, or a script left it trainable)"
    ),
    Cause.LEFT_TRAINABLE: "trained although expected frozen: a module left trainable by the training script",
    Cause.MODIFIED_IN_PLACE: (
        "changed although requires_grad=False: written in place by a script, not by the optimizer"
    ),
    Cause.TIED_ONE_SIDE: ("only one of a tied pair was trained (in modules_to_save without ensure_weight_tying=True)"),
    Cause.LORA_B_ZERO: (
        "lora_B is still zero: no gradient reached this adapter (reentrant gradient checkpointing "
        "without enable_input_require_grads, a bypassed layer), or the optimizer never stepped"
    ),
    Cause.ONE_STEP: (
        "only lora_B moved: expected after a single optimizer step, since lora_A gets no gradient while lora_B is zero"
    ),
    Cause.EMPTY_TENSOR: "empty adapter tensor (shape [0]): saved under ZeRO-3 without gathering",
    Cause.NOT_TRAINABLE: ("requires_grad=False: the adapter was loaded with is_trainable=False or frozen by a script"),
    Cause.NOT_IN_OPTIMIZER: (
        "the optimizer does not hold this parameter (built before get_peft_model, or from another model)"
    ),
    Cause.NO_UPDATE: (
        "it received gradients but never changed: the optimizer never stepped it (learning rate 0, "
        "step() skipped, or an optimizer built over other parameters)"
    ),
    Cause.NO_GRADIENT: "no gradient ever reached it during training",
    Cause.NOT_MERGED: "the adapter's delta is non-zero but the merged weight equals the base: not merged",
}
