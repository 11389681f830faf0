"""The model shapes the GPU benchmarks run at, as config.json dicts (random weights are drawn for them)."""

DEEPSEEK_MOE_16B = {
    "model_type": "deepseek", "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
    "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 16, "n_routed_experts": 64,
    "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1, "moe_layer_freq": 1,
    "norm_topk_prob": False, "scoring_func": "softmax", "vocab_size": 102400, "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0, "max_position_embeddings": 4096, "torch_dtype": "bfloat16", "hidden_act": "silu",
    "attention_bias": False, "tie_word_embeddings": False,
}
QWEN15_MOE_A27B = {
    "hidden_size": 2048, "intermediate_size": 5632, "moe_intermediate_size": 1408,
    "shared_expert_intermediate_size": 5632, "num_experts": 60, "num_experts_per_tok": 4, "num_hidden_layers": 24,
    "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 151936, "max_position_embeddings": 8192,
    "rope_theta": 1000000.0, "norm_topk_prob": False, "decoder_sparse_step": 1,
}
