"""LoRA on the pretrained base plus fully trained memory blocks, with PEFT.

PEFT knows no LoRA targets for model_type "memlm", so they are derived from the base model's type and
restricted to the base (`hf_memlm.lora_target_modules(model)`, never the memory blocks). The memory blocks are
listed in `modules_to_save` by their leaf names, so PEFT trains them and saves them with the adapter.

    python examples/lora_memory.py --base Qwen/Qwen2.5-0.5B --data path/to/books/
    python examples/lora_memory.py --tiny
"""

from __future__ import annotations

import argparse
import tempfile


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="Qwen/Qwen2.5-0.5B", help="Hub id or folder of a causal LM")
    parser.add_argument("--data", default=None, help="text file or folder of .txt files (default: bundled text)")
    parser.add_argument("--output-dir", default="outputs/lora_memory")
    parser.add_argument("--segment-length", type=int, default=512)
    parser.add_argument("--num-segments", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=1000)
    parser.add_argument("--tiny", action="store_true", help="tiny local base model, bundled text, a few steps")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, default_data_collator

    from hf_memlm import MemLMForCausalLM
    from hf_memlm.data import default_text, load_text_corpus, pack_documents
    from hf_memlm.training import (
        MemLMTrainer,
        MemLMTrainingArguments,
        configure_trainable,
        memory_weights,
    )

    torch.manual_seed(0)
    if args.tiny:
        from finetune_pretrained import make_tiny_base  # the sibling example's local stand-in base

        args.base = make_tiny_base(tempfile.mkdtemp(prefix="hf_memlm_example_") + "/tiny-base")
        args.segment_length, args.num_segments, args.max_steps = 32, 4, 12
    memory = {"memory_type": "kv", "segment_length": args.segment_length, "memory_size": 4096}

    tokenizer = AutoTokenizer.from_pretrained(args.base)
    model = MemLMForCausalLM.from_base(args.base, **memory)
    model = configure_trainable(model, "lora", {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05})
    lora_config = model.peft_config["default"]
    print(
        f"LoRA targets (regex): {lora_config.target_modules}; trained and saved in full: {lora_config.modules_to_save}"
    )
    model.print_trainable_parameters()

    documents = load_text_corpus(args.data) if args.data else Dataset.from_dict({"text": [default_text()]})
    examples = pack_documents(documents, tokenizer, args.segment_length, args.num_segments)
    training_args = MemLMTrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=4,
        learning_rate=2e-4,
        memory_learning_rate=1e-3,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        disable_tqdm=args.tiny,
    )
    trainer = MemLMTrainer(
        model=model,
        args=training_args,
        data_collator=default_data_collator,
        train_dataset=examples.select_columns(["input_ids", "labels"]),
    )
    trainer.train()

    # The adapter folder holds the LoRA weights and the trained memory blocks.
    adapter_dir = f"{args.output_dir}/adapter"
    model.save_pretrained(adapter_dir)
    trained_memory = memory_weights(model)

    # Reload: wrap the same base again (its memory starts fresh) and load the adapter onto it ...
    fresh = MemLMForCausalLM.from_base(args.base, **memory)
    reloaded = PeftModel.from_pretrained(fresh, adapter_dir)
    same = all(torch.equal(w, trained_memory[n]) for n, w in memory_weights(reloaded).items())
    print(f"adapter reloaded from {adapter_dir}; memory weights identical: {same}")

    # ... or fold LoRA into the base and save one plain checkpoint for AutoModelForCausalLM.
    merged = reloaded.merge_and_unload()
    merged.save_pretrained(f"{args.output_dir}/merged")
    tokenizer.save_pretrained(f"{args.output_dir}/merged")
    print(
        f"merged model saved to {args.output_dir}/merged: "
        f"{type(AutoModelForCausalLM.from_pretrained(f'{args.output_dir}/merged')).__name__}"
    )
    return {"memory_reloaded": same, "adapter_dir": adapter_dir, "merged_dir": f"{args.output_dir}/merged"}


if __name__ == "__main__":
    main()
