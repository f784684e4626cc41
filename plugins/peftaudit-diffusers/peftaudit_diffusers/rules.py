"""Architecture rules for diffusers attention and feed-forward modules.

Module paths as diffusers names them (0.30+): ``attn1``/``attn2`` (UNet self-
and cross-attention) or ``attn`` (SD3/Flux joint attention) hold ``to_q``,
``to_k``, ``to_v``, ``to_out.0``; joint attention adds the text stream's
``add_q_proj``, ``add_k_proj``, ``add_v_proj`` and ``to_add_out``. Feed-forward
blocks are ``ff.net.0.proj`` (up, or fused gate+up for the UNet's GEGLU) and
``ff.net.2`` (down); ``ff_context`` is the text stream's copy.
"""

from __future__ import annotations

from peftaudit.plugin_api import ArchitectureRule, ModuleRole
from peftaudit_diffusers.kinds import FLUX, SD3, UNET

ALL = (UNET, SD3, FLUX)
TRANSFORMERS = (SD3, FLUX)

_ATTENTION: tuple[tuple[str, ModuleRole], ...] = (
    (r"\.to_q$", ModuleRole.ATTENTION_Q),
    (r"\.to_k$", ModuleRole.ATTENTION_K),
    (r"\.to_v$", ModuleRole.ATTENTION_V),
    (r"\.to_out\.0$", ModuleRole.ATTENTION_O),
)

# Joint attention (SD3, Flux): the text stream's own q/k/v/out projections.
_JOINT: tuple[tuple[str, ModuleRole], ...] = (
    (r"\.add_q_proj$", ModuleRole.ATTENTION_Q),
    (r"\.add_k_proj$", ModuleRole.ATTENTION_K),
    (r"\.add_v_proj$", ModuleRole.ATTENTION_V),
    (r"\.to_add_out$", ModuleRole.ATTENTION_O),
)


def rules() -> tuple[ArchitectureRule, ...]:
    """Every rule this plugin registers, each limited to the diffusers model types."""
    found: list[ArchitectureRule] = []
    found += [ArchitectureRule(p, role, model_types=ALL) for p, role in _ATTENTION]
    found += [ArchitectureRule(p, role, model_types=TRANSFORMERS) for p, role in _JOINT]
    # The UNet's feed-forward is GEGLU: net.0.proj emits gate and up together.
    found.append(ArchitectureRule(r"\.ff\.net\.0\.proj$", ModuleRole.MLP_GATE_UP, model_types=(UNET,)))
    # SD3/Flux use plain GELU: net.0.proj is the up projection (image and text streams alike).
    found.append(ArchitectureRule(r"\.ff(_context)?\.net\.0\.proj$", ModuleRole.MLP_UP, model_types=TRANSFORMERS))
    found.append(ArchitectureRule(r"\.ff(_context)?\.net\.2$", ModuleRole.MLP_DOWN, model_types=ALL))
    # Flux single-stream blocks: proj_mlp is the MLP's up projection; proj_out fuses the
    # attention output with the MLP's down projection, so it is neither role alone.
    found.append(ArchitectureRule(r"single_transformer_blocks\.\d+\.proj_mlp$", ModuleRole.MLP_UP, model_types=(FLUX,)))
    found.append(
        ArchitectureRule(r"single_transformer_blocks\.\d+\.proj_out$", ModuleRole.ATTENTION_OTHER, model_types=(FLUX,))
    )
    # The UNet's Transformer2DModel wrappers project channels into and out of attention.
    found.append(ArchitectureRule(r"attentions\.\d+\.proj_(in|out)$", ModuleRole.ATTENTION_OTHER, model_types=(UNET,)))
    return tuple(found)
