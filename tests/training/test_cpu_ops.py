"""The CPU training kernels compute what the stock ops compute: packed attention gives sdpa's outputs and
gradients on packed rows (each example as if alone), leaves padded batches and generation to sdpa, and the
fast LoRA dropout drops the configured share with nn.Dropout's scaling and gradients."""

from __future__ import annotations

import pytest
import torch

from helpers import loop_config
from rayft.training import cpu_ops

ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"use_sliding_window": False}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"use_sliding_window": False, "head_dim": 16}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
}


def tiny(arch: str):
    import transformers

    config_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(0)
    cfg = getattr(transformers, config_cls)(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **extra,
    )
    model = getattr(transformers, model_cls)(cfg)
    model.set_attn_implementation("sdpa")
    return model


def packed_batch(lengths_per_row: list[list[int]], vocab: int = 101, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    width = max(sum(r) for r in lengths_per_row)
    ids = torch.randint(3, vocab, (len(lengths_per_row), width), generator=g)
    pos = torch.zeros_like(ids)
    for i, lengths in enumerate(lengths_per_row):
        at = 0
        for n in [*lengths, width - sum(lengths)]:  # the pad tail restarts its positions, as collate does
            pos[i, at : at + n] = torch.arange(n)
            at += n
    return ids, pos


def loss_and_grads(model, ids, pos):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, position_ids=pos, labels=ids, use_cache=False)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("math_max_len", [512, 8], ids=["matmul path", "flash path"])
def test_packed_attention_gives_sdpa_outputs_and_gradients(arch, math_max_len, monkeypatch):
    monkeypatch.setattr(cpu_ops, "MATH_MAX_LEN", math_max_len)
    model = tiny(arch)
    assert cpu_ops.supported(model.config)
    ids, pos = packed_batch([[10, 1, 17, 5], [33], [4, 4, 4, 4, 4, 4]])
    ref_logits, ref_grads = loss_and_grads(model, ids, pos)
    assert cpu_ops.use_packed_attention(model) and model.config._attn_implementation == cpu_ops.NAME
    logits, grads = loss_and_grads(model, ids, pos)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    # Each example computes as if it were alone: the third of the first row (positions 11..27).
    alone = model(input_ids=ids[:1, 11:28], use_cache=False).logits
    torch.testing.assert_close(logits[:1, 11:28], alone, atol=1e-5, rtol=1e-5)


def test_padded_batches_and_generation_stay_on_sdpa():
    model = tiny("llama").eval()
    ids = torch.randint(3, 101, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # a right-padded row
    ref = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    prompt = ids[:1, :6]
    ref_tokens = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    cpu_ops.use_packed_attention(model)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, ref)
    assert torch.equal(model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0), ref_tokens)


def test_sliding_window_models_keep_sdpa():
    model = tiny("mistral")
    model.config.sliding_window = 16
    assert not cpu_ops.supported(model.config)
    assert not cpu_ops.use_packed_attention(model)
    assert model.config._attn_implementation == "sdpa"


def test_fast_dropout_drops_the_configured_share_with_dropouts_scaling():
    torch.manual_seed(0)
    drop = cpu_ops._dropout15_module()(0.1).train()
    x = torch.full((1000, 500), 2.0, requires_grad=True)
    y = drop(x)
    dropped = y == 0
    assert abs(dropped.float().mean().item() - 0.1) < 0.002  # 500k draws: 5 standard deviations is 0.0021
    kept_value = y[~dropped].unique()
    assert kept_value.numel() == 1 and abs(kept_value.item() - 2.0 / (1 - 3277 / 2**15)) < 1e-6
    y.sum().backward()
    assert torch.equal(x.grad == 0, dropped)  # the gradient flows where the input was kept, scaled alike
    # Every lane of the random words is used: no column or stride of the tensor escapes the draw.
    assert dropped.float().mean(0).min() > 0.03 and dropped.float().mean(1).min() > 0.03
    assert torch.equal(drop.eval()(x), x)
    assert not torch.equal(drop.train()(x), y)  # a fresh mask per call


def test_build_model_on_cpu_uses_both(tiny_model_dir, tmp_path):
    from rayft.training.config import DataConfig, TrainingConfig
    from rayft.training.model_setup import build_model

    training = TrainingConfig(method="lora", lora={"dropout": 0.05})
    cfg = loop_config(
        tiny_model_dir, training, data=DataConfig(train="unused.jsonl", packing=True), run_dir=str(tmp_path)
    )
    model = build_model(cfg)
    assert model.config._attn_implementation == cpu_ops.NAME
    dropouts = [m for m in model.modules() if type(m).__name__ == "Dropout15"]
    adapted = [m for m in model.modules() if hasattr(m, "lora_A")]
    assert len(dropouts) == len(adapted) > 0
    assert not any(type(m) is torch.nn.Dropout for m in model.modules())
