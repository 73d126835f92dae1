"""Wrap a pretrained causal LM with memory and fine-tune it with transformers.Trainer.

The base model stays frozen; only the memory blocks train (their output projection starts at zero, so
before training the wrapped model computes exactly what the base computes). Afterwards the model is
saved with save_pretrained and loads back with AutoModelForCausalLM.

    python examples/finetune_pretrained.py --base HuggingFaceTB/SmolLM2-135M --data path/to/books/
    python examples/finetune_pretrained.py --tiny      # a tiny local base and the bundled text, seconds on CPU
"""

from __future__ import annotations

import argparse
import tempfile


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="HuggingFaceTB/SmolLM2-135M", help="Hub id or folder of a causal LM")
    parser.add_argument("--data", default=None, help="text file or folder of .txt files (default: bundled text)")
    parser.add_argument("--output-dir", default="outputs/finetune_pretrained")
    parser.add_argument("--segment-length", type=int, default=512)
    parser.add_argument("--num-segments", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=500)
    parser.add_argument("--tiny", action="store_true", help="tiny local base model, bundled text, a few steps")
    return parser.parse_args(argv)


def make_tiny_base(folder: str) -> str:
    """Stand-in for a downloaded model: a small random Llama saved with its tokenizer, like a Hub folder."""
    from transformers import AutoModelForCausalLM

    from hf_memlm.data import build_tokenizer
    from hf_memlm.recipes.defaults import tiny_llama_config

    tokenizer = build_tokenizer("byte")
    AutoModelForCausalLM.from_config(tiny_llama_config(vocab_size=len(tokenizer))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, default_data_collator

    from hf_memlm import MemLMForCausalLM
    from hf_memlm.data import default_text, load_text_corpus, pack_documents
    from hf_memlm.training import MemLMTrainer, MemLMTrainingArguments, configure_trainable

    torch.manual_seed(0)
    workdir = tempfile.mkdtemp(prefix="hf_memlm_example_")
    if args.tiny:
        args.base = make_tiny_base(f"{workdir}/tiny-base")
        args.segment_length, args.num_segments, args.max_steps = 32, 4, 12

    # 1. Wrap the pretrained model: its weights load unchanged, a kv memory goes beside the middle layer.
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    model = MemLMForCausalLM.from_base(
        args.base, memory_type="kv", segment_length=args.segment_length, memory_size=4096
    )
    model = configure_trainable(model, "memory_only")  # freeze the base, train the memory blocks
    print(
        f"wrapped {args.base}: memory beside layer {model.config.memory_layers}, "
        f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable parameters"
    )

    # 2. Long examples of whole segments, each from one document in order: memory carries across segments.
    documents = load_text_corpus(args.data) if args.data else Dataset.from_dict({"text": [default_text()]})
    examples = pack_documents(documents, tokenizer, args.segment_length, args.num_segments)
    held_out = 16 if args.tiny else 0.05
    examples = examples.select_columns(["input_ids", "labels"]).train_test_split(test_size=held_out, seed=0)

    # 3. A plain Trainer run; the memory blocks get their own (larger) learning rate.
    training_args = MemLMTrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        memory_learning_rate=1e-3,
        lr_scheduler_type="constant",
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        disable_tqdm=args.tiny,
        prediction_loss_only=True,
    )
    trainer = MemLMTrainer(
        model=model,
        args=training_args,
        train_dataset=examples["train"],
        eval_dataset=examples["test"],
        data_collator=default_data_collator,
    )
    trainer.train()
    eval_loss = trainer.evaluate()["eval_loss"]
    with model.disable_memory():
        base_loss = trainer.evaluate()["eval_loss"]  # same weights, memory off: the base model alone
    print(f"held-out loss: {eval_loss:.4f} with memory, {base_loss:.4f} without")

    # 4. Save and reload like any Hub model.
    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(args.output_dir)
    print(f"saved to {args.output_dir}; reloaded as {type(reloaded).__name__}")
    return {"eval_loss": eval_loss, "loss_without_memory": base_loss, "output_dir": args.output_dir}


if __name__ == "__main__":
    main()
