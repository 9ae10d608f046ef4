"""The model a worker trains: the base model loaded (partitioned across the ranks as it loads under ZeRO-3),
its trained-position logits, LoRA adapters, and the DeepSpeed engine around it."""

from __future__ import annotations

import types

from rayft.training.config import LoopConfig, TrainingConfig


def build_model(cfg: LoopConfig):
    """The causal LM to train: the base model, wrapped with LoRA adapters for method: lora."""
    import torch
    from transformers import AutoModelForCausalLM

    from rayft.training.cpu_ops import use_fast_dropout, use_packed_attention
    from rayft.training.ds_config import resolve_precision
    from rayft.training.models import resolve_model

    precision = resolve_precision(cfg.training, cfg.use_gpu)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    sharded_from_the_start(cfg)
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model(cfg.model.name),
        dtype=dtype,
        attn_implementation="sdpa",
        trust_remote_code=cfg.model.trust_remote_code,
        revision=cfg.model.revision,
    )
    model.config.use_cache = False
    if not cfg.use_gpu:  # each packed example's own causal attention instead of sdpa's full masked square
        use_packed_attention(model)
    if cfg.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.training.skip_untrained_logits:
        use_trained_position_logits(model)
    if cfg.training.method == "lora":
        model = apply_lora(model, cfg.training)
        if not cfg.use_gpu:
            use_fast_dropout(model)
        if cfg.training.gradient_checkpointing:
            model.enable_input_require_grads()
    return model


_ZERO3: list = []  # the live HfDeepSpeedConfigs of this worker's ZeRO-3 run (transformers holds them weakly)


def sharded_from_the_start(cfg: LoopConfig) -> None:
    """With ZeRO-3, make from_pretrained partition each parameter across the ranks as it loads (DeepSpeed's
    zero.Init, which transformers enters while an HfDeepSpeedConfig is alive): no rank ever holds the whole
    model, in host memory or on its GPU. The config is the run's own DeepSpeed config, concrete values only."""
    if cfg.training.zero_stage != 3:
        return
    from rayft.training.ds_config import build_ds_config

    load_partitioned(build_ds_config(cfg.training, cfg.training.micro_batch_size, cfg.grad_accum, cfg.use_gpu))


def load_partitioned(ds_config: dict, *, keep_earlier: bool = False) -> None:
    """From now on in this process, from_pretrained partitions each parameter across the ranks as it loads, under
    `ds_config` (a ZeRO-3 DeepSpeed config). The config is kept alive for the worker's life, since transformers
    only holds it weakly; keep_earlier keeps the ones set before alive too (a DPO run's policy, when its reference
    model loads), else they are let go (a worker function run again in the same process)."""
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    live = HfDeepSpeedConfig(ds_config)
    _ZERO3[:] = [*_ZERO3, live] if keep_earlier else [live]


# Causal LMs whose forward is exactly decoder -> lm_head -> shifted cross-entropy (no logit scaling,
# soft-capping or auxiliary losses), so the loss can be computed from the decoder's hidden states.
PLAIN_LM_HEAD_TYPES = {"llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3", "olmo2", "starcoder2"}


def use_trained_position_logits(model) -> bool:
    """Make the model's training forward project to the vocabulary only where the labels carry loss.

    Instruction data trains on the answers only (often a third of the tokens or less), yet a causal
    LM computes logits, a (tokens x vocabulary) matrix, at every position. For small and mid-sized
    models that projection and its backward are a large share of a step. With labels, the patched
    forward runs the decoder, gathers the hidden states at trained positions, and applies lm_head and
    cross-entropy there: the loss and gradients are the same. Without labels (generation) it is the
    model's own forward. Returns False, leaving the model alone, for architectures not known to be plain.
    """
    if getattr(model.config, "model_type", None) not in PLAIN_LM_HEAD_TYPES or model.get_output_embeddings() is None:
        return False
    model.forward = types.MethodType(_trained_positions_forward, model)
    return True


def has_trained_position_logits(model) -> bool:
    """Whether `model` (or the model inside its DeepSpeed engine and PEFT wrapper) has the trained-position
    forward, which also answers `return_token_logps=True`."""
    model = getattr(model, "module", model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return getattr(model.forward, "__func__", None) is _trained_positions_forward


def _trained_positions_forward(
    self,
    input_ids=None,
    attention_mask=None,
    position_ids=None,
    labels=None,
    return_token_logps=False,
    return_entropy=False,
    **kwargs,
):
    """With labels: the mean cross-entropy over trained positions as `loss`; with return_token_logps, instead
    {"token_logps": the log-probability of each trained target token}, in row-major order of the positions, and
    with return_entropy also "token_entropy", the entropy of the model's distribution at each of them."""
    import torch
    import torch.nn.functional as F
    from transformers.modeling_outputs import CausalLMOutputWithPast

    if labels is None or kwargs.get("past_key_values") is not None:
        return type(self).forward(
            self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, labels=labels, **kwargs
        )
    kwargs.pop("use_cache", None)
    kwargs.pop("logits_to_keep", None)
    targets = labels[:, 1:]
    trained = targets != -100
    logits = next_token_logits_at(self, trained, input_ids, attention_mask, position_ids, **kwargs)
    if return_token_logps:
        out = {"token_logps": -F.cross_entropy(logits.float(), targets[trained].to(torch.long), reduction="none")}
        if return_entropy:
            out["token_entropy"] = token_entropy(logits)
        return out
    if not bool(trained.any()):
        return CausalLMOutputWithPast(loss=logits.sum() * 0.0)
    loss = F.cross_entropy(logits.float(), targets[trained].to(torch.long))
    return CausalLMOutputWithPast(loss=loss)


def token_entropy(logits):
    """The entropy of each row's distribution (logits: tokens x vocabulary), without gradients."""
    import torch

    with torch.no_grad():
        logp = torch.log_softmax(logits.float(), dim=-1)
        return -(logp.exp() * logp).sum(-1)


def next_token_logits_at(model, where, input_ids, attention_mask=None, position_ids=None, **kwargs):
    """Logits predicting token t+1 only at the positions t where `where` (batch x seq-1) is true: the
    decoder runs over every token, the vocabulary projection only where it is needed. For the model
    types in PLAIN_LM_HEAD_TYPES; used by the training forward and by reference scoring in eval."""
    hidden = model.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **kwargs
    ).last_hidden_state
    return model.get_output_embeddings()(hidden[:, :-1][where])


def apply_lora(model, training: TrainingConfig):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    lora = training.lora
    layers, targets = None, lora.target_modules
    if lora.last_layers is not None:
        n = model.config.num_hidden_layers
        if lora.last_layers > n:
            raise ValueError(f"training.lora.last_layers is {lora.last_layers} but the model has {n} layers")
        layers = list(range(n - lora.last_layers, n))
        if targets == "all-linear":  # peft takes layer indexes only with explicit module names
            head = model.get_output_embeddings()
            targets = sorted(
                {
                    name.rsplit(".", 1)[-1]
                    for name, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and m is not head and ".layers." in f".{name}"
                }
            )
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=targets,
            layers_to_transform=layers,
            task_type="CAUSAL_LM",
        ),
    )
    assert isinstance(peft_model, PeftModel)  # a mixed model only with mixed=True
    return peft_model


def build_engine(model, cfg: LoopConfig):
    import deepspeed
    from torch.optim.lr_scheduler import LambdaLR

    from rayft.training.ds_config import build_ds_config, lr_lambda

    t = cfg.training
    ds_config = build_ds_config(t, t.micro_batch_size, cfg.grad_accum, cfg.use_gpu)
    params = [p for p in model.parameters() if p.requires_grad]
    updates = cfg.total_steps * (t.rl.iterations if t.objective == "grpo" and t.rl else 1)  # optimizer updates
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=params,  # pyright: ignore[reportArgumentType] - DeepSpeed annotates it as a Module
        config=ds_config,
        # DeepSpeed's annotation wants a scheduler factory returning the deprecated _LRScheduler
        lr_scheduler=lambda opt: LambdaLR(opt, lambda s: lr_lambda(s, updates, t.warmup_ratio, t.lr_schedule)),  # pyright: ignore[reportArgumentType]
    )
    if t.method == "lora":
        engine.module_state_dict = types.MethodType(_trainable_module_state_dict, engine)
    return engine


def _trainable_module_state_dict(engine, destination=None, prefix="", keep_vars=False, exclude_frozen_parameters=False):
    """DeepSpeed's module_state_dict, but frozen *tied* weights (lm_head = embed_tokens) are dropped too:
    its filter walks de-duplicated parameter names, so the tied alias of the frozen embedding stayed in
    every LoRA checkpoint (the largest single tensor of a small model)."""
    sd = engine.module.state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
    if exclude_frozen_parameters:
        for name, param in engine.module.named_parameters(remove_duplicate=False):
            if not param.requires_grad:
                sd.pop(prefix + name, None)
    return sd
