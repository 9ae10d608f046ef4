"""TRL's SFTTrainer, set up like rayft's quickstart: the peer bench/train_throughput.py measures rayft against.

A throughput figure means little on its own; "faster than the usual way to do the same finetune" is the claim a
reader can check. The usual way to LoRA-finetune a chat model on one machine is TRL's SFTTrainer, so this module
runs it on the same model, rows and hyperparameters as configs/quickstart.yaml and times it the same way:

- the same rows: the quickstart's JSONL files, each repeated as data.repeat says, given to TRL as conversational
  prompt-completion rows (every message but the last is the prompt, the assistant's answer the completion), so
  completion-only loss trains the answer tokens, as rayft's chat rendering does;
- the same packing: rows of at most max_seq_len tokens, best-fit decreasing, padding-free (every token in a batch
  is a real one; position ids restart per example, from which transformers builds a block-diagonal causal mask for
  sdpa, so examples packed together do not attend to each other);
- the same LoRA (rank, alpha, dropout, every linear projection of the top `last_layers` layers, as rayft's
  training/model_setup.py apply_lora), optimizer (torch's fused AdamW, no weight decay, gradients clipped at 1.0), peak
  learning rate and schedule shape, bf16 weights on the CPU;
- the same per-step figures: the wall time of each optimizer step, its real and trained tokens and its loss. The
  dataset preparation (tokenizing, packing) runs in SFTTrainer's constructor and is timed apart from the steps, as
  rayft's data pipeline is.

Nothing here goes to the network: the model and tokenizer are local directories, no logger integration is on,
TRL's usage ping is switched off while the trainer is built, and PEFT is told not to look up the base model's
config when saving. The heavy imports (torch, transformers, trl, peft, datasets) happen inside the functions, so
importing this module is cheap.

Smoke run (a few steps, per-step lines):  python bench/trl_peer.py --model DIR --steps 3
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART_DIR = ROOT / "examples" / "quickstart"
# configs/quickstart.yaml's training files and data.repeat (knowledge_train.jsonl: 6), for the smoke run; the
# benchmark derives its own list from the config.
QUICKSTART_FILES = [(QUICKSTART_DIR / "train.jsonl", 1), (QUICKSTART_DIR / "knowledge_train.jsonl", 6)]
IGNORE_INDEX = -100  # the label transformers' losses skip
# rayft's schedules decay to this fraction of the peak lr (training/ds_config.py lr_lambda), not to zero.
RAYFT_FLOOR = 0.1


def quickstart_rows(paths_and_repeats: list[tuple[Path, int]]) -> list[dict]:
    """TRL conversational prompt-completion rows from chat JSONL files, each file's rows `repeat` times.

    A row {"messages": [system?, user, assistant]} becomes {"prompt": messages[:-1], "completion": [messages[-1]]}:
    the last message must be the assistant's answer, the only part completion-only loss trains (rayft trains the
    assistant turns of such rows). Copies follow the file's rows (file order kept): the trainer shuffles anyway.
    """
    rows: list[dict] = []
    for path, repeat in paths_and_repeats:
        converted = []
        for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            messages = json.loads(line)["messages"]
            if len(messages) < 2 or messages[-1].get("role") != "assistant":
                raise ValueError(f"{path}:{n}: the last message must be the assistant's answer")
            # Only role and content: TRL renders the messages with the tokenizer's chat template, and stray keys
            # (a per-message weight, say) would reach the template.
            chat = [{"role": m["role"], "content": m["content"]} for m in messages]
            converted.append({"prompt": chat[:-1], "completion": chat[-1:]})
        rows.extend(converted * repeat)
    return rows


def hf_lr_schedule(lr_schedule: str, lr: float) -> tuple[str, dict[str, Any]]:
    """transformers' scheduler (name, kwargs) for one of rayft's schedule names.

    After the warm-up rayft decays to 10% of the peak, not to 0 (training/ds_config.py lr_lambda), and
    transformers has exact matches for that: cosine_with_min_lr at min_lr_rate 0.1 is the same curve as rayft's
    cosine, and polynomial of power 1 ending at 0.1 x lr the same line as rayft's linear. rayft's constant warms up
    too, hence constant_with_warmup.
    """
    if lr_schedule == "cosine":
        return "cosine_with_min_lr", {"min_lr_rate": RAYFT_FLOOR}
    if lr_schedule == "linear":
        return "polynomial", {"lr_end": RAYFT_FLOOR * lr, "power": 1.0}
    if lr_schedule == "constant":
        return "constant_with_warmup", {}
    raise ValueError(f"unknown lr_schedule {lr_schedule!r}: rayft's are cosine, linear and constant")


def lora_targets(model, last_layers: int | None) -> tuple[list[str], list[int] | None]:
    """(target module names, layer indexes) for LoRA on every linear projection of the top `last_layers` decoder
    layers (all layers when None), as rayft's apply_lora picks them: peft accepts layer indexes only together
    with explicit module names, and the output head stays frozen (it may be tied to the embedding)."""
    import torch

    head = model.get_output_embeddings()
    targets = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not head and ".layers." in f".{name}"
        }
    )
    if last_layers is None:
        return targets, None
    n = model.config.num_hidden_layers
    if not 1 <= last_layers <= n:
        raise ValueError(f"last_layers is {last_layers} but the model has {n} layers")
    return targets, list(range(n - last_layers, n))


def load_lora_model(model_dir: str, lora_r: int, lora_alpha: int, lora_dropout: float, last_layers: int | None):
    """(model in bf16 with sdpa attention, tokenizer with a pad token, PEFT LoraConfig, target module names,
    layer indexes) for LoRA as rayft's apply_lora sets it up."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:  # as rayft's load_tokenizer; padding-free batches never pad anyway
        tokenizer.pad_token = tokenizer.eos_token
    targets, layers = lora_targets(model, last_layers)
    lora = LoraConfig(
        r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=targets,
        layers_to_transform=layers,
        task_type="CAUSAL_LM",
    )
    return model, tokenizer, lora, targets, layers


def same_as_rayft(seed: int) -> dict[str, Any]:
    """The trainer settings both peers share with rayft's runs: torch's fused AdamW as rayft's DeepSpeed config
    asks for it (no weight decay, gradients clipped at 1.0), a log line per step, nothing saved, evaluated,
    reported or uploaded, and the data prepared in this process (the machine's cores belong to the timed run)."""
    return {
        "optim": "adamw_torch_fused",
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "adam_epsilon": 1e-8,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "logging_steps": 1,
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": [],
        "push_to_hub": False,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "dataset_num_proc": None,
        "seed": seed,
        "data_seed": seed,
    }


def build_trainer(trainer_cls, **kwargs):
    """(a TRL trainer built with no network call, the seconds its constructor took): TRL pings the Hub with
    usage telemetry when a trainer is built, unless told not to; huggingface_hub reads its switch from this
    constant (set from the environment at import time), so it is flipped for the build. transformers' console
    printers are removed (the per-step lines are the caller's)."""
    import huggingface_hub.constants
    from transformers import PrinterCallback, ProgressCallback

    telemetry_off = huggingface_hub.constants.HF_HUB_DISABLE_TELEMETRY
    huggingface_hub.constants.HF_HUB_DISABLE_TELEMETRY = True
    t_setup = time.perf_counter()
    try:
        trainer = trainer_cls(**kwargs)
    finally:
        huggingface_hub.constants.HF_HUB_DISABLE_TELEMETRY = telemetry_off
    for callback in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(callback)
    return trainer, time.perf_counter() - t_setup


def run_trl(
    model_dir: str,
    rows: list[dict],
    out_dir: Path,
    *,
    steps: int | None,
    time_limit_s: float | None,
    rows_per_step: int = 4,
    max_seq_len: int = 512,
    lr: float,
    lora_r: int,
    lora_alpha: int,
    lora_dropout: float,
    last_layers: int,
    warmup_ratio: float,
    lr_schedule: str,
    threads: int = 2,
    seed: int = 42,
    save_adapter: bool,
    on_step: Callable[[dict], None] | None = None,
) -> dict:
    """Train a LoRA adapter with TRL's SFTTrainer on `rows` (quickstart_rows) and time every optimizer step.

    `steps` sets max_steps (and so the length of the lr schedule); without it the trainer runs one epoch.
    `time_limit_s` stops training once the summed step times reach it (pass `steps` too, sized so the schedule
    ends near the limit). `rows_per_step` packed rows of `max_seq_len` tokens make one optimizer step (no gradient
    accumulation). `on_step(step)` is called after each step with its figures, for live progress.

    Returns {"steps": [{step, seconds, tokens, batch_tokens, trained_tokens, examples, loss}], "prepare_s",
    "setup_s", "train_s", "wall_s", "adapter_dir", "rows_per_step", "packed_rows", "trl_version", "config"}:
    `tokens` are the real tokens of the step's packed rows and `batch_tokens` the tokens of the batch the model
    ran (equal with padding-free batches), `trained_tokens` those with a label (the answers), `examples` the
    examples packed into the step, `loss` TRL's logged loss (the mean over the trained tokens).
    """
    t_start = time.perf_counter()
    import datasets
    import peft
    import torch
    import transformers
    import trl
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # An absolute path, so that the adapter's base_model_name_or_path still resolves from another directory.
    if Path(model_dir).is_dir():
        model_dir = str(Path(model_dir).resolve())

    model, tokenizer, lora, targets, layers = load_lora_model(model_dir, lora_r, lora_alpha, lora_dropout, last_layers)
    scheduler, scheduler_kwargs = hf_lr_schedule(lr_schedule, lr)
    # rayft warms up for round(total x ratio) steps; transformers would take the ceiling of a ratio, so give it
    # the count when the total is known.
    warmup = int(round(steps * warmup_ratio)) if steps else warmup_ratio
    # transformers 5.x renamed gradient_checkpointing to activation_checkpointing (the old name, still TRL's, is a
    # deprecated alias that warns when set).
    fields = SFTConfig.__dataclass_fields__
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    args = SFTConfig(
        output_dir=str(out_dir / "trainer"),
        max_length=max_seq_len,
        packing=True,
        packing_strategy="bfd",
        padding_free=True,
        completion_only_loss=True,
        # TRL turns checkpointing on by default; rayft does not recompute activations.
        **{checkpointing: False},
        bf16=True,
        use_cpu=True,
        per_device_train_batch_size=rows_per_step,
        gradient_accumulation_steps=1,
        learning_rate=lr,
        lr_scheduler_type=scheduler,
        lr_scheduler_kwargs=scheduler_kwargs,
        warmup_steps=warmup,
        max_steps=steps if steps else -1,
        num_train_epochs=1,
        **same_as_rayft(seed),
    )

    prepared: dict[str, float] = {}
    counts: deque[dict] = deque()

    class TimedSFTTrainer(SFTTrainer):
        """SFTTrainer that times its dataset preparation and counts the tokens of every batch it trains."""

        # _prepare_dataset (tokenize, build labels, pack) is TRL's private step of its constructor; wrapping it
        # is the one way to time the data preparation apart from loading the model and building the trainer.
        def _prepare_dataset(self, dataset, *a, **kw):
            t0 = time.perf_counter()
            try:
                return super()._prepare_dataset(dataset, *a, **kw)
            finally:
                prepared["prepare_s"] = prepared.get("prepare_s", 0.0) + time.perf_counter() - t0

        def training_step(self, model, inputs, num_items_in_batch=None):
            ids, labels = inputs["input_ids"], inputs["labels"]
            positions = inputs.get("position_ids")
            if real_tokens:
                real = real_tokens.popleft()
            else:  # not collated by CountingCollator: a padded batch's mask, else every position
                real = int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else int(ids.numel())
            counts.append(
                {
                    "tokens": real,
                    "batch_tokens": int(ids.numel()),  # what the model computes on, padding included
                    "trained_tokens": int((labels != IGNORE_INDEX).sum()),
                    # each packed example's position ids start at 0
                    "examples": int((positions == 0).sum()) if positions is not None else int(ids.shape[0]),
                }
            )
            return super().training_step(model, inputs, num_items_in_batch)

    # The collator sees the packed rows before they are flattened into one padding-free sequence: their summed
    # lengths are the real tokens, whatever padding the batch might get. The data loader may collate a batch
    # ahead of the step that trains it, so the counts queue up in order.
    real_tokens: deque[int] = deque()

    class CountingCollator:
        def __init__(self, collate: Callable[[list[dict]], dict]):
            self.collate = collate

        def __call__(self, examples: list[dict]) -> dict:
            real_tokens.append(sum(len(e["input_ids"]) for e in examples))
            return self.collate(examples)

    records: list[dict] = []
    stop = {"seconds": 0.0}

    class StepTimer(TrainerCallback):
        """Wall time of every optimizer step (the batch is already collated when on_step_begin runs), its token
        counts and its logged loss; stops training once the steps have used `time_limit_s`."""

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            seconds = time.perf_counter() - self.t0
            step = {"step": state.global_step, "seconds": seconds, **(counts.popleft() if counts else {}), "loss": None}
            records.append(step)
            stop["seconds"] += seconds
            if time_limit_s is not None and stop["seconds"] >= time_limit_s:
                control.should_training_stop = True
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            # With logging_steps=1 each step logs its own loss right after on_step_end.
            if logs and "loss" in logs and records and records[-1]["step"] == state.global_step:
                records[-1]["loss"] = float(logs["loss"])
                if on_step:
                    on_step(records[-1])

    trainer, setup_s = build_trainer(
        TimedSFTTrainer,
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[StepTimer()],
    )
    # SFTTrainer refuses a custom collator with padding-free batches, so the counting one wraps its own.
    trainer.data_collator = CountingCollator(trainer.data_collator)

    t_train = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t_train

    adapter_dir = None
    if save_adapter:
        adapter_dir = out_dir / "adapter"
        # save_embedding_layers=False: LoRA leaves the embedding alone, and "auto" may ask the Hub about the base.
        trainer.model.save_pretrained(str(adapter_dir), save_embedding_layers=False)
        tokenizer.save_pretrained(str(adapter_dir))
        # rayft eval finds the base of an adapter dir in base_model_name_or_path (training/inference.py)
        config_path = adapter_dir / "adapter_config.json"
        adapter_config = json.loads(config_path.read_text())
        if adapter_config.get("base_model_name_or_path") != model_dir:
            adapter_config["base_model_name_or_path"] = model_dir
            config_path.write_text(json.dumps(adapter_config, indent=2) + "\n")

    a = trainer.args
    config = {
        "max_length": a.max_length,
        "packing": a.packing,
        "packing_strategy": a.packing_strategy,
        "padding_free": trainer.padding_free,  # as the trainer resolved it
        "completion_only_loss": trainer.completion_only_loss,
        "activation_checkpointing": getattr(a, checkpointing),
        "bf16": a.bf16,
        "use_cpu": a.use_cpu,
        "per_device_train_batch_size": a.per_device_train_batch_size,
        "gradient_accumulation_steps": a.gradient_accumulation_steps,
        "learning_rate": a.learning_rate,
        "lr_scheduler_type": getattr(a.lr_scheduler_type, "value", a.lr_scheduler_type),
        "lr_scheduler_kwargs": a.lr_scheduler_kwargs,
        "warmup_steps": a.warmup_steps,
        "max_steps": a.max_steps,
        "optim": getattr(a.optim, "value", a.optim),
        "weight_decay": a.weight_decay,
        "max_grad_norm": a.max_grad_norm,
        "seed": a.seed,
        "data_seed": a.data_seed,
        "lora": {
            "r": lora_r,
            "alpha": lora_alpha,
            "dropout": lora_dropout,
            "target_modules": targets,
            "layers": [layers[0], layers[-1]] if layers else None,
        },
        "dtype": "bfloat16",
        "attn_implementation": "sdpa",
        "threads": threads,
        "versions": {
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "torch": torch.__version__,
        },
    }
    return {
        "steps": records,
        "prepare_s": prepared.get("prepare_s", 0.0),
        "setup_s": setup_s,
        "train_s": train_s,
        "wall_s": time.perf_counter() - t_start,
        "adapter_dir": str(adapter_dir) if adapter_dir else None,
        "rows_per_step": rows_per_step,
        "packed_rows": len(trainer.train_dataset),
        "trl_version": trl.__version__,
        "config": config,
    }


def preference_rows(path: Path) -> list[dict]:
    """TRL conversational preference rows ({"prompt", "chosen", "rejected"}, message lists) from a JSONL file in
    that format, such as examples/quickstart/preference_train.jsonl; other keys of a row (the quickstart's
    product, task and rule) are dropped, as they would reach the chat template."""
    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not all(isinstance(row.get(k), list) for k in ("prompt", "chosen", "rejected")):
            raise ValueError(f"{path}:{n}: expected prompt, chosen and rejected as message lists")
        rows.append(
            {
                k: [{"role": m["role"], "content": m["content"]} for m in row[k]]
                for k in ("prompt", "chosen", "rejected")
            }
        )
    return rows


def run_trl_dpo(
    model_dir: str,
    rows: list[dict],
    out_dir: Path,
    *,
    steps: int,
    pairs_per_micro_batch: int,
    pairs_per_step: int,
    max_seq_len: int,
    lr: float,
    beta: float,
    sft_weight: float,
    lora_r: int,
    lora_alpha: int,
    lora_dropout: float,
    last_layers: int,
    warmup_ratio: float,
    lr_schedule: str,
    threads: int = 2,
    seed: int = 42,
    on_step: Callable[[dict], None] | None = None,
) -> dict:
    """Train a LoRA adapter with TRL's DPOTrainer on preference `rows` (preference_rows) for `steps` optimizer
    steps of `pairs_per_step` pairs (micro-batches of `pairs_per_micro_batch`, accumulated), timing each step.

    Set up like a rayft DPO run: the reference is the model with the adapter switched off (TRL's default for a
    PEFT model without ref_model), the sigmoid loss plus `sft_weight` x the chosen answer's NLL (TRL's
    loss_type ["sigmoid", "sft"]), the same LoRA, optimizer, clipping, schedule and bf16 weights.

    Returns {"steps": [{step, seconds, tokens, batch_tokens, pairs, loss, reward_accuracy}], "setup_s",
    "train_s", "wall_s", "trl_version", "config"}: `tokens` are the real (non-pad) tokens of the step's
    sequences, `batch_tokens` the padded ones the model ran.
    """
    t_start = time.perf_counter()
    import datasets
    import torch
    import trl
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if pairs_per_step % pairs_per_micro_batch:
        raise ValueError("pairs_per_step must be a multiple of pairs_per_micro_batch")
    model, tokenizer, lora, _, _ = load_lora_model(model_dir, lora_r, lora_alpha, lora_dropout, last_layers)
    scheduler, scheduler_kwargs = hf_lr_schedule(lr_schedule, lr)
    fields = DPOConfig.__dataclass_fields__
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    losses = ["sigmoid", "sft"] if sft_weight else ["sigmoid"]
    args = DPOConfig(
        output_dir=str(out_dir / "trainer"),
        max_length=max_seq_len,
        beta=beta,
        loss_type=losses,
        loss_weights=[1.0, sft_weight] if sft_weight else None,
        # rayft keeps LoRA's dropout on in DPO as in SFT; TRL would switch every dropout off by default.
        disable_dropout=False,
        # TRL turns checkpointing on by default; rayft does not recompute activations.
        **{checkpointing: False},
        bf16=True,
        use_cpu=True,
        per_device_train_batch_size=pairs_per_micro_batch,
        gradient_accumulation_steps=pairs_per_step // pairs_per_micro_batch,
        learning_rate=lr,
        lr_scheduler_type=scheduler,
        lr_scheduler_kwargs=scheduler_kwargs,
        warmup_steps=int(round(steps * warmup_ratio)),
        max_steps=steps,
        **same_as_rayft(seed),
    )

    counts: deque[dict] = deque()

    class TimedDPOTrainer(DPOTrainer):
        """DPOTrainer that counts the sequences and tokens of every micro-batch it trains."""

        def training_step(self, model, inputs, num_items_in_batch=None):
            mask = inputs["attention_mask"]
            counts.append({"tokens": int(mask.sum()), "batch_tokens": int(mask.numel()), "pairs": mask.shape[0] // 2})
            return super().training_step(model, inputs, num_items_in_batch)

    records: list[dict] = []

    class StepTimer(TrainerCallback):
        """Wall time of every optimizer step, the token counts of its micro-batches, its loss and reward accuracy."""

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            seconds = time.perf_counter() - self.t0
            micro = [counts.popleft() for _ in range(len(counts))]
            step = {
                "step": state.global_step,
                "seconds": seconds,
                **{k: sum(m[k] for m in micro) for k in ("tokens", "batch_tokens", "pairs")},
                "loss": None,
                "reward_accuracy": None,
            }
            records.append(step)
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and records and records[-1]["step"] == state.global_step:
                records[-1]["loss"] = float(logs["loss"])
                if "rewards/accuracies" in logs:
                    records[-1]["reward_accuracy"] = float(logs["rewards/accuracies"])
                if on_step:
                    on_step(records[-1])

    trainer, setup_s = build_trainer(
        TimedDPOTrainer,
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[StepTimer()],
    )
    t_train = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t_train
    a = trainer.args
    config = {
        "max_length": a.max_length,
        "beta": a.beta,
        "loss_type": list(a.loss_type),
        "loss_weights": a.loss_weights,
        "precompute_ref_log_probs": a.precompute_ref_log_probs,
        "padding_free": trainer.padding_free,
        "activation_checkpointing": getattr(a, checkpointing),
        "per_device_train_batch_size": a.per_device_train_batch_size,
        "gradient_accumulation_steps": a.gradient_accumulation_steps,
        "learning_rate": a.learning_rate,
        "max_steps": a.max_steps,
        "threads": threads,
    }
    return {
        "steps": records,
        "setup_s": setup_s,
        "train_s": train_s,
        "wall_s": time.perf_counter() - t_start,
        "trl_version": trl.__version__,
        "config": config,
    }


def main(argv: list[str] | None = None) -> None:
    """Smoke run: TRL on the quickstart's rows for a few steps, one line per step."""
    from rayft.training.config import LoraConfig, TrainingConfig

    # rayft's defaults where configs/quickstart.yaml keeps them, its values where it sets them.
    lora, training = LoraConfig(), TrainingConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model directory (config.json, weights, tokenizer)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--time-limit", type=float, default=None, help="stop once the steps have taken this many seconds")
    p.add_argument("--last-layers", type=int, default=12, help="LoRA on the top N layers (the quickstart: 12)")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--rows-per-step", type=int, default=4)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="output directory (default: a temporary one)")
    p.add_argument("--save-adapter", action="store_true", help="save the adapter to OUT/adapter (needs --out)")
    args = p.parse_args(argv)
    if args.save_adapter and args.out is None:
        p.error("--save-adapter needs --out")

    rows = quickstart_rows(QUICKSTART_FILES)

    def show(s: dict) -> None:
        loss = "n/a" if s["loss"] is None or not math.isfinite(s["loss"]) else f"{s['loss']:.4f}"
        print(
            f"step {s['step']:>4}  {s['seconds']:6.2f} s  tokens {s.get('tokens', 0):>5}  "
            f"trained {s.get('trained_tokens', 0):>5}  examples {s.get('examples', 0):>3}  loss {loss}",
            flush=True,
        )

    with tempfile.TemporaryDirectory(prefix="trl-peer-") as tmp:
        result = run_trl(
            args.model,
            rows,
            args.out or Path(tmp),
            steps=args.steps,
            time_limit_s=args.time_limit,
            rows_per_step=args.rows_per_step,
            max_seq_len=args.max_seq_len,
            lr=args.lr,
            lora_r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            last_layers=args.last_layers,
            warmup_ratio=training.warmup_ratio,
            lr_schedule=training.lr_schedule,
            threads=args.threads,
            seed=training.seed,
            save_adapter=args.save_adapter,
            on_step=show,
        )
    n = len(result["steps"])
    mean = sum(s["seconds"] for s in result["steps"]) / max(n, 1)
    print(
        f"TRL {result['trl_version']}: {len(rows)} rows -> {result['packed_rows']} packed rows "
        f"(prepared in {result['prepare_s']:.1f} s); {n} steps, {mean:.2f} s/step; wall {result['wall_s']:.1f} s"
    )
    if result["adapter_dir"]:
        print(f"adapter: {result['adapter_dir']}")


if __name__ == "__main__":
    main()
