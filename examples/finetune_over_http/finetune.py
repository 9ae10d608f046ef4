"""Finetune over HTTP with the official openai client: upload a file, start a job, follow it, chat with the result.

Run it against `rayft serve smollm2-135m-instruct` (`make demo-api` starts one, runs this and stops it). Set
RAYFT_URL and RAYFT_API_KEY for an endpoint elsewhere or one that requires a key.
"""

import os
import time

from openai import OpenAI

client = OpenAI(
    base_url=os.environ.get("RAYFT_URL", "http://127.0.0.1:8000") + "/v1",
    api_key=os.environ.get("RAYFT_API_KEY", "no-key-needed-on-localhost"),
)

# 1. Upload the training rows and held-out rows (JSONL, one {"messages": [...]} per line).
train = client.files.create(file=open("examples/quickstart/knowledge_train.jsonl", "rb"), purpose="fine-tune")
held_out = client.files.create(file=open("examples/quickstart/knowledge_eval.jsonl", "rb"), purpose="fine-tune")

# 2. Start a job: a LoRA adapter of the served model ("auto" values come from the server's job template).
job = client.fine_tuning.jobs.create(
    model="smollm2-135m-instruct",
    training_file=train.id,
    validation_file=held_out.id,
    suffix="quillfeather",
    seed=1,
    method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 6, "learning_rate_multiplier": 25}}},
)
print(f"{job.id}: {job.status}, hyperparameters {job.hyperparameters}")

# 3. Follow it: status changes, validation, and a line per logged step.
seen = set()
while True:
    job = client.fine_tuning.jobs.retrieve(job.id)
    for event in reversed(client.fine_tuning.jobs.list_events(job.id, limit=100).data):
        if event.id not in seen:
            seen.add(event.id)
            print(f"  {event.message}")
    if job.status in ("succeeded", "failed", "cancelled"):
        break
    time.sleep(5)
if job.status != "succeeded":
    raise SystemExit(f"{job.id} {job.status}: {job.error.message if job.error else ''}")
print(f"{job.fine_tuned_model}: {job.trained_tokens} tokens trained")

# 4. Chat with it, next to the base model, on a question phrased as no training row phrases it.
question = "Which city hosts the hardware lab of Quillfeather Labs?"  # from knowledge_eval.jsonl
for model in ("smollm2-135m-instruct", job.fine_tuned_model):
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=40, temperature=0
    )
    print(f"{model}:\n  {reply.choices[0].message.content}")
