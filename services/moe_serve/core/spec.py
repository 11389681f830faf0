"""What a model is, normalised across checkpoint formats: the one description core, model and services share.

One frozen `ModelSpec` per checkpoint: dimensions, which layers are MoE, routing semantics and the tensor
names of experts and routers. It never touches tensors; `moe_serve.model.config` builds it from config.json.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of one checkpoint, normalised across model types."""

    model_type: str
    hidden_size: int
    num_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    expert_width: int
    # Renormalise the top-k gate weights to sum to 1.
    norm_topk_prob: bool
    # DeepSeek runs the router softmax in the model dtype; the others in float32.
    router_softmax_fp32: bool = True
    rms_norm_eps: float = 1e-6
    torch_dtype: str = "float32"
    # Decoder (absent for simple_moe, which is a stack of norm + MoE blocks).
    has_attention: bool = False
    vocab_size: int = 0
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    rope_theta: float = 10000.0
    # Linear RoPE scaling divides the frequencies by this factor (1.0 = none).
    rope_scaling_factor: float = 1.0
    # Bias on q/k/v projections, and separately on o_proj (qwen2_moe biases q/k/v only).
    attention_bias: bool = False
    o_proj_bias: bool = False
    # None, "head" (qwen3_moe: RMSNorm over each head's dims) or "full" (olmoe: over all heads at once).
    qk_norm: str | None = None
    # olmoe: clamp q, k, v to [-clip_qkv, clip_qkv] (None = off).
    clip_qkv: float | None = None
    # Width of the dense MLP of non-MoE layers.
    dense_width: int = 0
    # Shared experts: total width (0 for none) and whether a sigmoid gate scales them (qwen2_moe).
    shared_expert_width: int = 0
    shared_expert_gated: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    eos_token_ids: tuple[int, ...] = ()

    def is_moe_layer(self, layer: int) -> bool:
        """True if `layer` has routed experts."""
        return layer in self.moe_layers

    @property
    def _moe_prefix(self) -> str:
        return "block_sparse_moe" if self.model_type == "mixtral" else "mlp"

    def router_name(self, layer: int) -> str:
        """Tensor name of the router (gate) weight [E, H] of a MoE layer."""
        return f"model.layers.{layer}.{self._moe_prefix}.gate.weight"

    def expert_names(self, layer: int, expert: int) -> tuple[str, str, str]:
        """Tensor names of one routed expert: (gate [I, H], up [I, H], down [H, I])."""
        base = f"model.layers.{layer}.{self._moe_prefix}.experts.{expert}"
        if self.model_type == "mixtral":
            return f"{base}.w1.weight", f"{base}.w3.weight", f"{base}.w2.weight"
        return f"{base}.gate_proj.weight", f"{base}.up_proj.weight", f"{base}.down_proj.weight"

    def shared_expert_prefix(self, layer: int) -> str:
        """Name prefix of a MoE layer's shared expert(s): qwen2_moe `shared_expert`, deepseek `shared_experts`."""
        return f"model.layers.{layer}.mlp.{'shared_expert' if self.model_type == 'qwen2_moe' else 'shared_experts'}"

    def is_expert_tensor(self, name: str) -> bool:
        """True for the tensors of routed experts, which only expert servers load."""
        return f".{self._moe_prefix}.experts." in name
