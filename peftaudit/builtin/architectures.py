"""Built-in architecture rules for the families in the bundled catalog.

Generic rules cover the names most families share (``q_proj``, ``gate_proj``,
``lm_head``); model-type rules cover names whose meaning depends on the family
(GPT-2's ``c_proj`` is the attention output in ``attn`` and the MLP output in
``mlp``; BERT's ``dense`` is four different things).
"""

from __future__ import annotations

from collections.abc import Callable

from peftaudit import hookimpl
from peftaudit.architecture import ArchitectureRule as Rule
from peftaudit.architecture import ModuleRole as R

_END = r"$"

GENERIC: tuple[Rule, ...] = (
    # Mixture of experts first: per-expert modules reuse MLP names (w1, gate_proj).
    Rule(r"(^|\.)experts(\.\d+(\..*)?)?" + _END, R.EXPERTS),
    # Attention projections (Llama, Mistral, Qwen, Gemma, Phi-4 style, OPT).
    Rule(r"(^|\.)(q_proj|wq)" + _END, R.ATTENTION_Q),
    Rule(r"(^|\.)(k_proj|wk)" + _END, R.ATTENTION_K),
    Rule(r"(^|\.)(v_proj|wv)" + _END, R.ATTENTION_V),
    Rule(r"(^|\.)(o_proj|out_proj|wo_attn)" + _END, R.ATTENTION_O),
    Rule(r"(^|\.)(qkv_proj|Wqkv|query_key_value|c_attn|qkv)" + _END, R.ATTENTION_QKV),
    Rule(r"(^|\.)(q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj)" + _END, R.ATTENTION_OTHER),
    # MLP.
    Rule(r"(^|\.)shared_experts?\.", R.SHARED_EXPERT),
    # Qwen2-MoE's scalar gate on the shared expert routes like a router (a Linear to one output).
    Rule(r"(^|\.)shared_expert_gate" + _END, R.ROUTER),
    Rule(r"(^|\.)(router|block_sparse_moe\.gate|mlp\.gate|moe\.gate)" + _END, R.ROUTER),
    Rule(r"(^|\.)(gate_proj|w1)" + _END, R.MLP_GATE),
    Rule(r"(^|\.)(up_proj|w3)" + _END, R.MLP_UP),
    Rule(r"(^|\.)(gate_up_proj)" + _END, R.MLP_GATE_UP),
    Rule(r"(^|\.)(down_proj|w2)" + _END, R.MLP_DOWN),
    Rule(r"(^|\.)(fc1|dense_h_to_4h|c_fc)" + _END, R.MLP_UP),
    Rule(r"(^|\.)(fc2|dense_4h_to_h)" + _END, R.MLP_DOWN),
    # Heads.
    Rule(r"(^|\.)(lm_head|embed_out)$|^output$", R.OUTPUT_HEAD),
    # Masked-LM heads end in a "decoder" Linear tied to the input embedding (BERT, RoBERTa).
    Rule(r"(^|\.)(lm_head|predictions)\.decoder$", R.OUTPUT_HEAD),
    Rule(r"(^|\.)(classifier|score|qa_outputs)(\.out_proj|\.dense)?" + _END, R.CLASSIFIER),
    Rule(r"(^|\.)pooler(\.dense)?" + _END, R.POOLER),
)

FAMILY: tuple[Rule, ...] = (
    # GPT-2: Conv1D everywhere; c_proj means two things.
    Rule(r"\.attn\.c_proj$", R.ATTENTION_O, model_types=("gpt2",)),
    Rule(r"\.mlp\.c_proj$", R.MLP_DOWN, model_types=("gpt2",)),
    # BERT / RoBERTa: query/key/value, and "dense" by position.
    Rule(r"\.attention\.self\.query$", R.ATTENTION_Q, model_types=("bert", "roberta")),
    Rule(r"\.attention\.self\.key$", R.ATTENTION_K, model_types=("bert", "roberta")),
    Rule(r"\.attention\.self\.value$", R.ATTENTION_V, model_types=("bert", "roberta")),
    Rule(r"\.attention\.output\.dense$", R.ATTENTION_O, model_types=("bert", "roberta")),
    Rule(r"\.intermediate\.dense$", R.MLP_UP, model_types=("bert", "roberta")),
    Rule(r"\.layer\.\d+\.output\.dense$", R.MLP_DOWN, model_types=("bert", "roberta")),
    Rule(r"^cls\.predictions\.transform\.dense$", R.OUTPUT_HEAD, model_types=("bert",)),
    Rule(r"^lm_head\.dense$", R.OUTPUT_HEAD, model_types=("roberta",)),
    # T5: q, k, v, o and wi/wo (wi_0/wi_1 when gated).
    Rule(r"\.(SelfAttention|EncDecAttention)\.q$", R.ATTENTION_Q, model_types=("t5",)),
    Rule(r"\.(SelfAttention|EncDecAttention)\.k$", R.ATTENTION_K, model_types=("t5",)),
    Rule(r"\.(SelfAttention|EncDecAttention)\.v$", R.ATTENTION_V, model_types=("t5",)),
    Rule(r"\.(SelfAttention|EncDecAttention)\.o$", R.ATTENTION_O, model_types=("t5",)),
    Rule(r"\.DenseReluDense\.wi(_1)?$", R.MLP_UP, model_types=("t5",)),
    Rule(r"\.DenseReluDense\.wi_0$", R.MLP_GATE, model_types=("t5",)),
    Rule(r"\.DenseReluDense\.wo$", R.MLP_DOWN, model_types=("t5",)),
    # Falcon: fused QKV plus a "dense" output.
    Rule(r"\.self_attention\.dense$", R.ATTENTION_O, model_types=("falcon",)),
    # Phi-1/2: "dense" is the attention output.
    Rule(r"\.self_attn\.dense$", R.ATTENTION_O, model_types=("phi",)),
    # OPT: attention out_proj, MLP fc1/fc2 (generic rules), head lm_head.
    # gpt-oss: the router is "mlp.router" (generic), experts fused (generic).
)


@hookimpl
def peftaudit_register_architecture_rules(register: Callable[[Rule], None]) -> None:
    for rule in (*FAMILY, *GENERIC):
        register(rule)
