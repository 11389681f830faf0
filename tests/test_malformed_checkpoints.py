"""Malformed checkpoints fail at start, with a message naming the tensor, field, file or expert."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_serve.gateway.dispatch import StartupError
from moe_serve.model.checkpoint import Checkpoint, CheckpointError


def rewrite(src, dst, drop=(), replace=None, config=None):
    """A copy of checkpoint `src` in one file, without `drop`, with `replace` tensors and `config` fields."""
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(f))
    for name in drop:
        del tensors[name]
    tensors.update(replace or {})
    dst.mkdir()
    save_file(tensors, str(dst / "model.safetensors"))
    cfg = {**json.loads((src / "config.json").read_text()), **(config or {})}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_gateway_names_a_missing_dense_tensor(cluster, causal_checkpoints, tmp_path):
    bad = rewrite(causal_checkpoints["qwen2_moe"], tmp_path / "ck",
                  drop=["model.layers.2.mlp.shared_expert_gate.weight"])
    with pytest.raises(CheckpointError, match=r"missing tensor 'model.layers.2.mlp.shared_expert_gate.weight'"):
        cluster.gateway(bad, ["127.0.0.1:1"], connect_timeout=1.0)


def test_gateway_names_a_misshapen_tensor(cluster, causal_checkpoints, tmp_path):
    bad = rewrite(causal_checkpoints["olmoe"], tmp_path / "ck",
                  replace={"model.layers.1.self_attn.k_norm.weight": torch.ones(48)})
    with pytest.raises(CheckpointError, match=r"tensor 'model.layers.1.self_attn.k_norm.weight' has shape \[48\], "
                                              r"expected \[24\]"):
        cluster.gateway(bad, ["127.0.0.1:1"], connect_timeout=1.0)


def test_expert_server_names_a_missing_or_misshapen_expert(cluster, causal_checkpoints, tmp_path):
    src = causal_checkpoints["mixtral"]
    missing = rewrite(src, tmp_path / "a", drop=["model.layers.1.block_sparse_moe.experts.5.w3.weight"])
    with pytest.raises(CheckpointError, match=r"missing tensor 'model.layers.1.block_sparse_moe.experts.5.w3.weight'"):
        cluster.expert_server(missing, experts="4-7")
    cluster.expert_server(missing, experts="0-3")  # a server not owning expert 5 does not need it
    wrong = rewrite(src, tmp_path / "b",
                    replace={"model.layers.0.block_sparse_moe.experts.2.w2.weight": torch.ones(48, 31)})
    with pytest.raises(CheckpointError, match=r"experts.2.w2.weight' has shape \[48, 31\], expected \[48, 32\]"):
        cluster.expert_server(wrong, experts="all")


@pytest.mark.parametrize("change,message", [
    ({"model_type": "llama"}, "unsupported model_type 'llama'"),
    ({"num_experts_per_tok": None}, "missing field 'num_experts_per_tok'"),
    ({"n_routed_experts": 4, "num_experts_per_tok": 6}, "num_experts_per_tok 6 must be in 1..4"),
    ({"scoring_func": "sigmoid"}, "scoring_func 'sigmoid' unsupported"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' unsupported"),
    ({"rope_scaling": {"type": "yarn", "factor": 4}}, "rope type 'yarn' unsupported"),
])
def test_config_errors_name_the_field(causal_checkpoints, tmp_path, change, message):
    bad = tmp_path / "ck"
    shutil.copytree(causal_checkpoints["deepseek"], bad)
    config = {**json.loads((bad / "config.json").read_text()), **change}
    (bad / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    with pytest.raises(CheckpointError, match=message):
        Checkpoint(bad)


def test_missing_shard_is_named(causal_checkpoints, tmp_path):
    bad = tmp_path / "ck"
    shutil.copytree(causal_checkpoints["deepseek"], bad)
    (bad / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002.safetensors: listed in the index but missing"):
        Checkpoint(bad).load("model.layers.2.mlp.experts.0.up_proj.weight")


def test_gateway_names_experts_no_server_holds(cluster, causal_checkpoints):
    path = causal_checkpoints["deepseek"]
    servers = [cluster.expert_server(path, experts="0-5"), cluster.expert_server(path, experts=["2:6", "4:7"])]
    with pytest.raises(StartupError, match=r"no expert server owns layer 2: experts 7; layer 4: experts 6"):
        cluster.gateway(path, servers)
