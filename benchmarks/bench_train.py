"""Training and scoring speed of adapterfuse against plain PEFT + transformers, in one process.

Usage (GLUE_DIR set)::

    python benchmarks/bench_train.py [--task sst2] [--examples 320] [--repeats 3]

Training: ``train_expert`` against a plain PEFT model trained by ``transformers.Trainer`` on the same
model, prompts, LoRA config (r=8, all linear layers), batch size, learning rate and precision (bf16
autocast where the device computes bf16 natively, else fp32);
the Trainer computes the usual causal-LM loss on the label token, through the full vocabulary head.
Both count the same real (non-pad) prompt tokens. Scoring: ``scoring.predict_proba`` against a plain
forward that computes the full logits and reads the label words off the last position. Runs alternate
and the medians are printed, with their ratio.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time

import torch

from adapterfuse import TrainConfig, load_base, load_task, train_expert
from adapterfuse.device import autocast_dtype
from adapterfuse.head import autocast_context, encode, iter_batches, label_token_ids, predict_proba
from adapterfuse.tasks.spec import TaskData


def ours_train(base, data: TaskData, config: TrainConfig) -> float:
    """Tokens/s of train_expert's training loop (evaluation excluded)."""
    with tempfile.TemporaryDirectory() as tmp:
        run = TaskData(data.task, data.train, [], data.test[:1])
        expert = train_expert(base, data.task, config, out=f"{tmp}/e", data=run, progress=False)
    return expert.meta["training"]["train_tokens_per_s"]


def trainer_train(base, data: TaskData, config: TrainConfig) -> float:
    """Tokens/s of a plain PEFT + Trainer run: causal-LM loss on the label token, full head."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    task, tok = data.task, base.tokenizer
    prompts = encode(task, data.train, tok, config.max_length)
    words = label_token_ids(task, tok)
    rows = []
    for ids, ex in zip(prompts, data.train, strict=False):
        label = words[round(ex.label)] if task.regression else words[int(ex.label)]
        rows.append(
            {"input_ids": [*ids, label], "attention_mask": [1] * (len(ids) + 1), "labels": [-100] * len(ids) + [label]}
        )
    model = get_peft_model(
        copy.deepcopy(base.model),
        LoraConfig(
            r=config.rank,
            lora_alpha=config.lora_alpha,
            target_modules=list(config.target_modules),
            lora_dropout=config.dropout,
            task_type="CAUSAL_LM",
        ),
    )
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=config.batch_size,
            num_train_epochs=1,
            learning_rate=config.lr,
            warmup_steps=config.warmup_ratio,
            # the precision train_expert picks on this device: bf16 only where it is computed natively
            bf16=config.autocast and autocast_dtype("cuda" if torch.cuda.is_available() else "cpu") is not None,
            use_cpu=not torch.cuda.is_available(),
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            seed=config.seed,
            train_sampling_strategy="group_by_length",
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(rows),
            data_collator=DataCollatorForSeq2Seq(tok, padding=True),
        )
        out = trainer.train()
    return sum(len(p) for p in prompts) / out.metrics["train_runtime"]


@torch.no_grad()
def full_logits_scoring(base, data: TaskData, batch_size: int) -> float:
    """Examples/s of a plain forward that computes the whole vocabulary's logits."""
    labels = torch.tensor(label_token_ids(data.task, base.tokenizer))
    t0 = time.perf_counter()
    for _, ids, mask in iter_batches(data.task, data.test, base.tokenizer, batch_size):
        with autocast_context(True):
            logits = base.model(input_ids=ids, attention_mask=mask).logits
        last = mask.sum(1) - 1
        torch.softmax(logits[torch.arange(len(ids)), last][:, labels].float(), -1)
    return len(data.test) / (time.perf_counter() - t0)


def ours_scoring(base, data: TaskData, batch_size: int) -> float:
    """Examples/s of scoring.predict_proba (label words only)."""
    t0 = time.perf_counter()
    predict_proba(base.model, base.tokenizer, data.task, data.test, batch_size=batch_size)
    return len(data.test) / (time.perf_counter() - t0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--base", default=None, help="base spec (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--examples", type=int, default=320, help="training examples per run")
    parser.add_argument("--eval-examples", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    base = load_base(args.base)
    config = TrainConfig(max_train_examples=args.examples, lr=3e-4, checkpoint_every=10_000)
    data = load_task(args.task, validation_size=0, max_train=args.examples, max_test=args.eval_examples)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, task {args.task}, "
        f"{len(data.train)} training examples, {len(data.test)} scored examples",
        flush=True,
    )
    ours_train(base, TaskData(data.task, data.train[:32], [], data.test), config)  # warm-up
    speeds: dict[str, list[float]] = {"ours": [], "trainer": [], "score_ours": [], "score_full": []}
    for r in range(args.repeats):
        speeds["ours"].append(ours_train(base, data, config))
        speeds["trainer"].append(trainer_train(base, data, config))
        speeds["score_ours"].append(ours_scoring(base, data, 32))
        speeds["score_full"].append(full_logits_scoring(base, data, 32))
        print(f"repeat {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in speeds.items()), flush=True)
    med = {k: statistics.median(v) for k, v in speeds.items()}
    print("\n| what | adapterfuse | plain PEFT/transformers | ratio |")
    print("|---|---|---|---|")
    print(
        f"| training tokens/s (train_expert vs PEFT + Trainer) | {med['ours']:.0f} | {med['trainer']:.0f} "
        f"| {med['ours'] / med['trainer']:.2f}x |"
    )
    print(
        f"| scoring examples/s (label words vs full logits) | {med['score_ours']:.1f} | {med['score_full']:.1f} "
        f"| {med['score_ours'] / med['score_full']:.2f}x |"
    )
    print(f"(medians of {args.repeats} alternating runs in one process)")
    return 0 if med["ours"] >= med["trainer"] else 1


if __name__ == "__main__":
    sys.exit(main())
