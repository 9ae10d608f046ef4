"""DeepSpeed config, lr schedule, LoRA wiring and the export round trip, in one process (no Ray)."""

from __future__ import annotations

import os

import pytest
import torch

from helpers import free_port, loop_config
from rayft.training.config import LoraConfig, TrainingConfig
from rayft.training.ds_config import build_ds_config, lr_lambda, resolve_precision


def test_ds_config_follows_the_job_file():
    t = TrainingConfig(
        zero_stage=3,
        offload_optimizer=True,
        offload_params=True,
        grad_clip=0.5,
        lr=1e-4,
        weight_decay=0.1,
        ds_config={"zero_optimization": {"reduce_bucket_size": 123}, "x": 1},
    )
    c = build_ds_config(t, micro_batch_size=4, grad_accum=3, use_gpu=False)
    assert c["train_micro_batch_size_per_gpu"] == 4 and c["gradient_accumulation_steps"] == 3
    assert c["gradient_clipping"] == 0.5
    z = c["zero_optimization"]
    assert z["stage"] == 3 and z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    assert z["stage3_gather_16bit_weights_on_model_save"] is True
    assert z["reduce_bucket_size"] == 123 and c["x"] == 1  # passthrough wins, merged deeply
    assert c["optimizer"]["params"]["lr"] == 1e-4 and c["optimizer"]["params"]["weight_decay"] == 0.1
    assert not c["bf16"]["enabled"] and not c["fp16"]["enabled"]  # fp32 on CPU by default


def test_runs_use_torch_fused_adamw_unless_the_optimizer_is_offloaded():
    for use_gpu in (True, False):  # no nvcc build of DeepSpeed's FusedAdam on GPU nodes, no C++ op load on CPU
        params = build_ds_config(TrainingConfig(), 1, 1, use_gpu=use_gpu)["optimizer"]["params"]
        assert params["torch_adam"] is True and params["fused"] is True
    offloaded = build_ds_config(TrainingConfig(offload_optimizer=True), 1, 1, use_gpu=True)["optimizer"]["params"]
    assert "torch_adam" not in offloaded  # DeepSpeed's CPU Adam


def test_precision_defaults_to_bf16_on_gpu_and_fp32_on_cpu():
    assert resolve_precision(TrainingConfig(), use_gpu=True) == "bf16"
    assert resolve_precision(TrainingConfig(), use_gpu=False) == "fp32"
    assert build_ds_config(TrainingConfig(precision="bf16"), 1, 1, False)["bf16"]["enabled"]


def test_fast_precision_is_bf16_only_where_the_hardware_computes_it():
    import torch

    from rayft.training.models import resolve_dtype

    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    fast = TrainingConfig(precision="fast")
    assert resolve_precision(fast, use_gpu=True) == "bf16"
    assert resolve_precision(fast, use_gpu=False) == ("bf16" if native else "fp32")
    assert resolve_dtype("fast", "cuda") == "bfloat16"
    assert resolve_dtype("fast", "cpu") == ("bfloat16" if native else "float32")
    assert resolve_dtype("auto", "cpu") == "float32" and resolve_dtype("bfloat16", "cpu") == "bfloat16"


def test_lr_schedule_warms_up_then_decays():
    total = 100
    cos = [lr_lambda(s, total, 0.1, "cosine") for s in range(total)]
    assert cos[0] < cos[5] < cos[9] <= 1.0  # warm-up over 10 steps
    assert max(cos) == pytest.approx(1.0, abs=0.02)
    assert cos[-1] == pytest.approx(0.1, abs=0.01) and all(a >= b for a, b in zip(cos[10:], cos[11:], strict=False))
    lin = [lr_lambda(s, total, 0.0, "linear") for s in range(total)]
    assert lin[0] == 1.0 and lin[50] == pytest.approx(0.55, abs=0.01)
    assert {lr_lambda(s, total, 0.0, "constant") for s in range(total)} == {1.0}


def test_lora_trains_only_adapters_with_the_expected_parameter_count(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from rayft.training.model_setup import apply_lora

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    r = 4
    peft_model = apply_lora(model, TrainingConfig(lora=LoraConfig(r=r, target_modules="all-linear")))
    trainable = {n: p.numel() for n, p in peft_model.named_parameters() if p.requires_grad}
    assert all("lora_" in n for n in trainable)
    assert sum(trainable.values()) == sum(r * (m.in_features + m.out_features) for m in linears)

    top = apply_lora(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), TrainingConfig(lora=LoraConfig(r=r, last_layers=1))
    )
    adapted = {n for n, p in top.named_parameters() if p.requires_grad}
    assert adapted and all(".layers.1." in n for n in adapted)  # the tiny model has layers 0 and 1


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_trained_position_logits_give_the_same_loss_and_gradients(tiny_model_dir, smol_tokenizer, packed):
    """The training forward that projects to the vocabulary only at trained positions must be a pure
    speed-up: same loss and same gradients as the model's own forward, and generation untouched."""
    from transformers import AutoModelForCausalLM

    from rayft.training.formats import collate
    from rayft.training.model_setup import use_trained_position_logits

    gen = torch.Generator().manual_seed(1)
    rows = []
    for n, answer in ((40, 12), (23, 5), (31, 9)):
        ids = torch.randint(5, 1000, (n,), generator=gen)
        labels = torch.full((n,), -100)
        labels[n - answer :] = ids[n - answer :]
        rows.append({"input_ids": ids.numpy(), "labels": labels.numpy()})
    if packed:  # one packed row: position ids restart at each example, no attention mask
        rows = [
            {
                "input_ids": torch.cat([torch.as_tensor(r["input_ids"]) for r in rows]).numpy(),
                "labels": torch.cat([torch.as_tensor(r["labels"]) for r in rows]).numpy(),
                "position_ids": torch.cat([torch.arange(len(r["input_ids"])) for r in rows]).numpy(),
            }
        ]
    batch = collate(rows, smol_tokenizer.pad_token_id)
    assert ("attention_mask" in batch) is not packed

    def loss_and_grads(model):
        model.zero_grad()
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    ref_loss, ref_grads = loss_and_grads(model)
    prompt = torch.tensor([[1, 42, 77, 9]])
    ref_text = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert use_trained_position_logits(model)
    loss, grads = loss_and_grads(model)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False), ref_text)


@pytest.fixture(scope="module")
def process_group():
    """A world of one (gloo), as DeepSpeed expects, for tests that run the engine in-process.
    One per module: DeepSpeed keeps a handle on the group, so it must outlive every engine."""
    import torch.distributed as dist

    env = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.mark.parametrize("method", ["lora", "full"])
def test_engine_steps_lower_the_loss_and_the_export_generates_like_the_trained_model(
    method, tiny_model_dir, smol_tokenizer, tmp_path, process_group
):
    """Real DeepSpeed (ZeRO-2) in one process: loss falls on a repeated batch, LoRA leaves the base
    untouched, and the model exported from the checkpoint generates exactly what the trained model does."""
    from rayft.cluster.config import load_config
    from rayft.training.checkpoints import DS_TAG
    from rayft.training.export import export_checkpoint
    from rayft.training.formats import Renderer, normalize, tokenize_rendered
    from rayft.training.model_setup import build_engine, build_model
    from rayft.training.objectives import Sft, StepContext
    from rayft.training.step_metrics import StepClock

    job_file = tmp_path / "job.yaml"
    job_file.write_text(
        f"model: {{name: {tiny_model_dir}}}\ndata: {{train: x.jsonl}}\nscaling: {{num_workers: 1}}\n"
        f"training: {{method: {method}, lr: 0.01, warmup_ratio: 0, micro_batch_size: 2, global_batch_size: 2,"
        f" zero_stage: 2, lora: {{r: 8, alpha: 16, dropout: 0.0}}}}\n"
    )
    job = load_config(job_file)
    cfg = loop_config(job.model, job.training, data=job.data, total_steps=30, run_dir=str(tmp_path / "run"))
    docs = [
        normalize(
            {
                "messages": [
                    {"role": "user", "content": f"Ticket {i}?"},
                    {"role": "assistant", "content": f'{{"id": {i}, "ok": true}}'},
                ]
            }
        )
        for i in range(2)
    ]
    renderer = Renderer(smol_tokenizer, None)
    rendered = [renderer.render(d) for d in docs]
    rows = [
        {"input_ids": i, "labels": lab}
        for i, lab in tokenize_rendered(smol_tokenizer, [t for t, _ in rendered], [s for _, s in rendered])
    ]
    torch.manual_seed(0)
    model = build_model(cfg)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    engine = build_engine(model, cfg)
    inner = engine.optimizer.optimizer  # under ZeRO's wrapper: PyTorch's fused AdamW, not a DeepSpeed C++ op
    assert type(inner) is torch.optim.AdamW and inner.defaults["fused"]
    losses, cpu = [], torch.device("cpu")
    pad_id = smol_tokenizer.pad_token_id
    ctx = StepContext(engine=engine, device=cpu, pad_id=pad_id, world=1, grad_accum=1, clock=StepClock(cpu))
    for _ in range(12):  # the loop's own optimizer step: one micro-batch, one rank
        out = Sft(cfg).step(ctx, [(rows, [])])
        losses.append(out.loss_sum / out.loss_count)
    assert losses[-1] < losses[0] - 0.5, losses
    after = dict(engine.module.named_parameters())
    if method == "lora":
        assert all(torch.equal(after[n], v) for n, v in base_before.items())
        assert any(n.endswith("lora_B.default.weight") and after[n].abs().sum() > 0 for n in after)
    else:
        assert not all(torch.equal(after[n], v) for n, v in base_before.items())
    ckpt = tmp_path / "ckpt"
    engine.save_checkpoint(str(ckpt), tag=DS_TAG, exclude_frozen_parameters=(method == "lora"))
    prompt = smol_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Ticket 1?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    engine.module.eval()
    with torch.no_grad():
        expected = engine.module.generate(**prompt, max_new_tokens=12, do_sample=False)
    final = export_checkpoint(str(ckpt), job, str(tmp_path / "final"))

    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(final)
    with torch.no_grad():
        got = exported.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert got.tolist() == expected.tolist()
    names = set(os.listdir(final))
    assert {"config.json", "model.safetensors", "tokenizer.json", "rayft_export.json"} <= names
    if method == "lora":
        adapter = set(os.listdir(os.path.join(final, "adapter")))
        assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= adapter
        # The checkpoint of a LoRA run holds the adapter only, not the frozen base.
        from safetensors.torch import load_file

        weights = load_file(os.path.join(final, "adapter", "adapter_model.safetensors"))
        assert weights and all("lora_" in k for k in weights)
        assert all(t.abs().sum() > 0 for k, t in weights.items() if "lora_B" in k)


def test_a_split_is_tokenized_once_up_front_only_when_the_run_reads_it_again():
    from rayft.training.config import TrainJob
    from rayft.training.trainer import read_again

    def job(**t):
        return TrainJob.model_validate({"data": {"train": "x.jsonl"}, "training": {"global_batch_size": 8, **t}})

    assert read_again(job(epochs=1), "train", 3400)  # an epoch-based run counts its rows, then trains
    assert read_again(job(max_steps=100), "train", 16)  # past one epoch
    assert not read_again(job(max_steps=6), "train", 3400)  # stops within the first epoch: streams
    assert read_again(job(max_steps=6, eval_every_steps=3), "eval", 40)  # steps 3 and 6, and the end
    assert not read_again(job(max_steps=6), "eval", 40)  # only at the end
    assert not read_again(job(max_steps=6, eval_every_steps=10, eval_at_end=False), "eval", 40)
