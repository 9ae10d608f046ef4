"""TRL's GRPOTrainer set up like configs/quickstart-rl.yaml, and the one held-out evaluator both GRPO runs are scored
by: the peer that `bench/train_throughput.py --part grpo` measures rayft's reinforcement finetuning against.

The usual way to GRPO-finetune a chat model with LoRA on one machine is TRL's GRPOTrainer, so this module runs it on
the same model, prompts, reward and hyperparameters as rayft's quickstart and times each optimizer step:

- the same prompts: the quickstart's JSONL rows as TRL conversational prompts ({"prompt": messages, "answer"}); TRL
  renders them with the tokenizer's chat template and add_generation_prompt, which gives the token ids rayft's
  renderer gives (the benchmark checks this for every row, `same_prompt_tokens`);
- the same reward: the job's training.rl.grader object scored by rayft's own grading code
  (rayft.training.rewards.score_batch, the body of rayft's grading task), each completion against item={"answer"};
- the same sampling and step: a group of training.rl.samples_per_prompt completions per prompt, max_new_tokens,
  temperature and top_p (top-k off), global_batch_size prompts per optimizer step accumulated over micro-batches of
  micro_batch_size prompts (TRL counts completions: micro_batch_size x group per device batch), one generation per
  optimizer step (steps_per_generation = the accumulation), one update per generation (no importance ratio);
- the same objective: rayft's training.rl.loss (grpo, dr_grpo, dapo are TRL loss types of the same name and
  normalisation), advantage_scale as TRL's scale_rewards (group std with Bessel's correction and 1e-4 in both),
  beta and clip ranges, truncated completions kept in the loss;
- the same LoRA, optimizer (torch's fused AdamW, no weight decay, gradients clipped at 1.0), peak learning rate and
  schedule shape, bf16 weights on the CPU, no activation checkpointing, LoRA dropout on in the training forward;
- sampling with the model in eval mode (LoRA dropout off), as rayft samples; TRL would otherwise sample with the
  dropout of training on. This is the one place this module changes what TRL does (`_generate_single_turn`).

TRL runs for the same training time as rayft's steps took (time_limit_s), so its number of steps is not known in
advance: its learning rate follows rayft's schedule (training/ds_config.py lr_lambda) over that time instead of
over a step count, ending at rayft's floor when the time is up.

`heldout_rewards` is the evaluator: plain transformers generate, greedy, on prompts rendered by rayft's renderer, one
prompt at a time (no padding), the model in bf16 with the adapter loaded by PEFT, scored by the same grader. It does
not know which trainer made the adapter, so both runs (and the base model) are measured the same way.

Nothing goes to the network: the model is a local directory, no logger integration is on, TRL's usage ping is off
while the trainer is built, and heavy imports happen inside the functions.

Smoke run (a few steps, per-step lines):  python bench/trl_grpo_peer.py --steps 3
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/trl_grpo_peer.py` imports bench.trl_peer; PYTHONPATH still wins
    sys.path.append(str(ROOT))

QUICKSTART_RL = ROOT / "configs" / "quickstart-rl.yaml"


def prompt_rows(path: Path) -> list[dict]:
    """TRL conversational prompt rows ({"prompt": messages, "answer": str}) from a JSONL file of rayft prompt rows
    (`messages` ending in a user turn, and the `answer` the grader reads)."""
    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages or messages[-1].get("role") != "user":
            raise ValueError(f"{path}:{n}: expected `messages` ending in a user turn (a prompt row)")
        if not isinstance(row.get("answer"), str):
            raise ValueError(f"{path}:{n}: expected an `answer` string (the grader's {{{{item.answer}}}})")
        rows.append(
            {"prompt": [{"role": m["role"], "content": m["content"]} for m in messages], "answer": row["answer"]}
        )
    return rows


def rayft_prompt_ids(tokenizer, path: Path) -> list[list[int]]:
    """The token ids rayft samples from for each prompt row of a JSONL file: its renderer's rollout prompt (the chat
    template with add_generation_prompt), tokenized as its data pipeline does."""
    from rayft.training.formats import Renderer, normalize, parse_json_line, tokenize_rendered

    renderer = Renderer(tokenizer, None, False)
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    rendered = [renderer.render(normalize(parse_json_line(line), "prompt")) for line in lines]
    return [ids.tolist() for ids, _ in tokenize_rendered(tokenizer, [t for t, _ in rendered], [s for _, s in rendered])]


def same_prompt_tokens(tokenizer, path: Path) -> tuple[int, int]:
    """(rows whose prompt tokens TRL renders exactly as rayft does, rows): TRL applies the tokenizer's chat template
    to each conversational prompt with add_generation_prompt (GRPOTrainer._tokenize_prompts)."""
    ours = rayft_prompt_ids(tokenizer, path)
    theirs = [
        list(
            tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True)[
                "input_ids"
            ]
        )
        for r in prompt_rows(path)
    ]
    return sum(a == b for a, b in zip(ours, theirs, strict=True)), len(ours)


def grader_reward(rl: dict, log: list[dict]) -> Callable[..., list[float]]:
    """A TRL reward function scoring each completion with rayft's grading of training.rl (`rl`: RlConfig.model_dump()),
    item={"answer": ...}; each call appends its completions' figures to `log` (for the per-step records)."""
    from rayft.training.rewards import score_batch

    def grader(completions, answer, completion_ids=None, **_) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        ids = [list(c) for c in completion_ids] if completion_ids is not None else [[] for _ in texts]
        scores = score_batch(rl, texts, ids, [{"answer": a} for a in answer], {})
        log.append(
            {
                "completions": len(texts),
                "completion_tokens": sum(len(i) for i in ids),
                "reward_sum": float(scores.rewards.sum()),
                "exact_sum": float(scores.parts["exact"].sum()) if "exact" in scores.parts else math.nan,
                "failures": scores.failures,
            }
        )
        return scores.rewards.tolist()

    grader.__name__ = (rl.get("grader") or {}).get("name") or "grader"
    return grader


def run_trl_grpo(
    model_dir: str,
    rows: list[dict],
    out_dir: Path,
    *,
    rl: dict,
    prompts_per_step: int,
    prompts_per_micro_batch: int,
    time_limit_s: float,
    max_steps: int,
    lr: float,
    lora_r: int,
    lora_alpha: int,
    lora_dropout: float,
    last_layers: int | None,
    warmup_ratio: float,
    lr_schedule: str,
    threads: int = 2,
    seed: int = 42,
    on_step: Callable[[dict], None] | None = None,
) -> dict:
    """Train a LoRA adapter with TRL's GRPOTrainer on prompt `rows` (prompt_rows) until its summed step times reach
    `time_limit_s` to the nearest step (or `max_steps`), timing every optimizer step, and save the adapter.

    `rl` is the job's training.rl (RlConfig.model_dump()). Returns {"steps": [{step, seconds, generate_s,
    completions, completion_tokens, reward, exact, failures, lr, loss}], "setup_s", "train_s", "wall_s",
    "adapter_dir", "trl_version", "config"}: `generate_s` is the step's sampling time, `reward` and `exact` the mean
    reward and exact-answer share of its completions.
    """
    t_start = time.perf_counter()
    import datasets
    import peft
    import torch
    import transformers
    import trl
    from torch.optim.lr_scheduler import LambdaLR
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from bench.trl_peer import build_trainer, load_lora_model, same_as_rayft
    from rayft.training.ds_config import lr_lambda

    torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if Path(model_dir).is_dir():  # absolute, so the adapter's base_model_name_or_path resolves from anywhere
        model_dir = str(Path(model_dir).resolve())
    if prompts_per_step % prompts_per_micro_batch:
        raise ValueError("prompts_per_step must be a multiple of prompts_per_micro_batch")
    group = rl["samples_per_prompt"]
    accumulation = prompts_per_step // prompts_per_micro_batch

    model, tokenizer, lora, targets, layers = load_lora_model(model_dir, lora_r, lora_alpha, lora_dropout, last_layers)
    fields = GRPOConfig.__dataclass_fields__
    shared = {k: v for k, v in same_as_rayft(seed).items() if k in fields}  # GRPO prepares no dataset
    args = GRPOConfig(
        output_dir=str(out_dir / "trainer"),
        per_device_train_batch_size=prompts_per_micro_batch * group,  # TRL's batches count completions
        gradient_accumulation_steps=accumulation,
        steps_per_generation=accumulation,  # one generation per optimizer step, as rayft samples per step
        num_generations=group,
        max_completion_length=rl["max_new_tokens"],
        temperature=rl["temperature"],
        top_p=rl["top_p"],
        top_k=0,  # off, as in rayft's sampler
        beta=rl["beta"],  # TRL's default is 0.0 too; set so a change of default cannot slip in
        num_iterations=rl["iterations"],
        epsilon=rl["clip_eps"],
        epsilon_high=rl["clip_eps_high"] or rl["clip_eps"],
        loss_type=rl["loss"],
        scale_rewards=rl["advantage_scale"],
        mask_truncated_completions=False,  # rayft trains on completions cut at max_new_tokens too
        disable_dropout=False,  # rayft keeps LoRA's dropout on in the training forward
        use_vllm=False,
        log_completions=False,
        activation_checkpointing=False,  # GRPOConfig turns checkpointing on by default; rayft does not recompute
        bf16=True,
        use_cpu=True,
        learning_rate=lr,
        lr_scheduler_type="constant",  # replaced by the time-based schedule below
        warmup_steps=0,
        max_steps=max_steps,
        **shared,
    )

    state = {"done_s": 0.0, "t0": None}

    def elapsed() -> float:
        """Training time so far: the finished steps, plus the running step up to now."""
        running = time.perf_counter() - state["t0"] if state["t0"] is not None else 0.0
        return state["done_s"] + running

    def lr_factor(_step: int) -> float:
        # rayft's multiplier at the same fraction of the training time (1000 points: smooth enough for 40 steps).
        progress = min(1.0, elapsed() / time_limit_s)
        return lr_lambda(int(round(1000 * progress)), 1000, warmup_ratio, lr_schedule)

    reward_log: list[dict] = []
    timing = {"generate_s": 0.0}

    class TimedGRPOTrainer(GRPOTrainer):
        """GRPOTrainer that samples in eval mode (as rayft does), times its sampling, and follows rayft's learning
        rate schedule over the training time."""

        def _generate_single_turn(self, *a, **kw):
            t0 = time.perf_counter()
            was_training = self.model.training
            self.model.eval()
            try:
                return super()._generate_single_turn(*a, **kw)
            finally:
                self.model.train(was_training)
                timing["generate_s"] += time.perf_counter() - t0

        def create_scheduler(self, num_training_steps: int, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = LambdaLR(optimizer or self.optimizer, lr_factor)
            return self.lr_scheduler

    records: list[dict] = []

    class StepTimer(TrainerCallback):
        """Wall time of every optimizer step (sampling, grading, forward, backward, optimizer), its completions and
        rewards; stops training when the steps have used `time_limit_s` (to the nearest step)."""

        def on_step_begin(self, args, state_, control, **kwargs):
            state["t0"] = time.perf_counter()
            timing["generate_s"] = 0.0

        def on_step_end(self, args, state_, control, **kwargs):
            seconds = time.perf_counter() - state["t0"]
            state["done_s"] += seconds
            state["t0"] = None
            calls = [reward_log.pop(0) for _ in range(len(reward_log))]
            n = sum(c["completions"] for c in calls)
            records.append(
                {
                    "step": state_.global_step,
                    "seconds": seconds,
                    "generate_s": timing["generate_s"],
                    "completions": n,
                    "completion_tokens": sum(c["completion_tokens"] for c in calls),
                    "reward": sum(c["reward_sum"] for c in calls) / max(n, 1),
                    "exact": sum(c["exact_sum"] for c in calls) / max(n, 1),
                    "failures": sum(c["failures"] for c in calls),
                    "lr": None,
                    "loss": None,
                }
            )
            # Stop when less than half a step's time is left: the training time lands within half a step of the
            # limit, on either side, rather than always past it.
            if time_limit_s - state["done_s"] < seconds / 2:
                control.should_training_stop = True
            return control

        def on_log(self, args, state_, control, logs=None, **kwargs):
            # With logging_steps=1 each step logs its own loss and learning rate right after on_step_end.
            if logs and "loss" in logs and records and records[-1]["step"] == state_.global_step:
                records[-1]["loss"] = float(logs["loss"])
                records[-1]["lr"] = logs.get("learning_rate")
                if on_step:
                    on_step(records[-1])

    trainer, setup_s = build_trainer(
        TimedGRPOTrainer,
        model=model,
        reward_funcs=[grader_reward(rl, reward_log)],
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[StepTimer()],
    )
    t_train = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t_train

    adapter_dir = out_dir / "adapter"
    # save_embedding_layers=False: LoRA leaves the embedding alone, and "auto" may ask the Hub about the base.
    trainer.model.save_pretrained(str(adapter_dir), save_embedding_layers=False)
    tokenizer.save_pretrained(str(adapter_dir))
    config_path = adapter_dir / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text())
    if adapter_config.get("base_model_name_or_path") != model_dir:
        adapter_config["base_model_name_or_path"] = model_dir
        config_path.write_text(json.dumps(adapter_config, indent=2) + "\n")

    a = trainer.args
    config = {
        "per_device_train_batch_size": a.per_device_train_batch_size,
        "gradient_accumulation_steps": a.gradient_accumulation_steps,
        "steps_per_generation": a.steps_per_generation,
        "generation_batch_size": a.generation_batch_size,
        "num_generations": a.num_generations,
        "max_completion_length": a.max_completion_length,
        "temperature": a.temperature,
        "top_p": a.top_p,
        "top_k": a.top_k,
        "beta": a.beta,
        "num_iterations": a.num_iterations,
        "epsilon": a.epsilon,
        "loss_type": a.loss_type,
        "scale_rewards": a.scale_rewards,
        "mask_truncated_completions": a.mask_truncated_completions,
        "disable_dropout": a.disable_dropout,
        "use_vllm": a.use_vllm,
        "use_transformers_continuous_batching": a.use_transformers_continuous_batching,
        "activation_checkpointing": a.activation_checkpointing,
        "bf16": a.bf16,
        "learning_rate": a.learning_rate,
        "optim": getattr(a.optim, "value", a.optim),
        "max_grad_norm": a.max_grad_norm,
        "weight_decay": a.weight_decay,
        "seed": a.seed,
        "lora": {
            "r": lora_r,
            "alpha": lora_alpha,
            "dropout": lora_dropout,
            "target_modules": targets,
            "layers": [layers[0], layers[-1]] if layers else None,
        },
        "threads": threads,
        "versions": {"transformers": transformers.__version__, "peft": peft.__version__, "torch": torch.__version__},
    }
    del trainer, model
    return {
        "steps": records,
        "setup_s": setup_s,
        "train_s": train_s,
        "wall_s": time.perf_counter() - t_start,
        "adapter_dir": str(adapter_dir),
        "trl_version": trl.__version__,
        "config": config,
    }


def heldout_rewards(
    model_dir: str,
    adapter_dir: str | None,
    prompt_ids: list[list[int]],
    answers: list[str],
    rl: dict,
    *,
    threads: int = 2,
) -> dict[str, Any]:
    """The held-out reward of a model (the base in `model_dir`, with the LoRA adapter in `adapter_dir` if given): one
    greedy completion of at most training.rl.max_new_tokens per prompt (token ids as rayft renders them), one prompt
    at a time, bf16 weights, stopped at the model's end tokens, decoded without special tokens and scored by rayft's
    grading of `rl` against item={"answer": ...}.

    Returns {"reward", "exact", "similar" (the multi grader's parts, when it has them), "length" (completion tokens,
    the stop token included, as rayft counts them), "prompts", "seconds", "completions" (the texts)}."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from rayft.training.rewards import score_batch

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa")
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    gen_eos = model.generation_config.eos_token_id
    stops = {tokenizer.eos_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])} - {None}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = GenerationConfig(
        max_new_tokens=rl["max_new_tokens"], do_sample=False, eos_token_id=sorted(stops), pad_token_id=pad
    )
    texts, ids_out = [], []
    with torch.inference_mode():
        for ids in prompt_ids:
            inputs = torch.tensor([ids], dtype=torch.long)
            out = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), generation_config=config)
            new = out[0, len(ids) :].tolist()
            cut = next((i for i, t in enumerate(new) if t in stops), None)
            kept = new if cut is None else new[: cut + 1]  # the stop token counts, as in rayft's completions
            ids_out.append(kept)
            texts.append(tokenizer.decode(kept if cut is None else kept[:-1], skip_special_tokens=True))
    scores = score_batch(rl, texts, ids_out, [{"answer": a} for a in answers], {})
    out: dict[str, Any] = {
        "reward": float(np.mean(scores.rewards)),
        "length": float(np.mean([len(i) for i in ids_out])),
        "prompts": len(prompt_ids),
        "failures": scores.failures,
        "seconds": time.perf_counter() - t0,
        "completions": texts,
    }
    for part, values in scores.parts.items():
        out[part] = float(np.nanmean(values))
    return out


def main(argv: list[str] | None = None) -> None:
    """Smoke run: TRL on the RL quickstart's prompts for a few steps, one line per step, then the held-out reward of
    the adapter on a few prompts."""
    from rayft.cluster.config import load_config
    from rayft.training.models import load_tokenizer, resolve_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--time-limit", type=float, default=600.0, help="stop once the steps have taken this many seconds")
    p.add_argument("--eval-prompts", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    cfg = load_config(QUICKSTART_RL)
    t, lora = cfg.training, cfg.training.lora
    assert t.rl is not None
    rl = t.rl.model_dump()
    model_dir = resolve_model(cfg.model.name)
    rows = prompt_rows(Path(str(cfg.data.train)))

    def show(s: dict) -> None:
        print(
            f"step {s['step']:>3}  {s['seconds']:6.2f} s (sampling {s['generate_s']:.2f})  completions "
            f"{s['completions']}  reward {s['reward']:.3f}  exact {s['exact']:.2f}  lr {s['lr']}",
            flush=True,
        )

    with tempfile.TemporaryDirectory(prefix="trl-grpo-") as tmp:
        result = run_trl_grpo(
            model_dir,
            rows,
            Path(tmp),
            rl=rl,
            prompts_per_step=t.global_batch_size,
            prompts_per_micro_batch=t.micro_batch_size,
            time_limit_s=args.time_limit,
            max_steps=args.steps,
            lr=t.lr,
            lora_r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            last_layers=lora.last_layers,
            warmup_ratio=t.warmup_ratio,
            lr_schedule=t.lr_schedule,
            threads=args.threads,
            seed=t.seed,
            on_step=show,
        )
        eval_path = Path(str(cfg.data.eval))
        tokenizer = load_tokenizer(cfg.model.name)
        ids = rayft_prompt_ids(tokenizer, eval_path)[: args.eval_prompts]
        answers = [r["answer"] for r in prompt_rows(eval_path)][: args.eval_prompts]
        scores = heldout_rewards(model_dir, result["adapter_dir"], ids, answers, rl, threads=args.threads)
    print(f"TRL {result['trl_version']}: {len(result['steps'])} steps, wall {result['wall_s']:.1f} s")
    print(f"held-out reward {scores['reward']:.3f} on {scores['prompts']} prompts: {scores['completions']}")


if __name__ == "__main__":
    main()
