"""Train a small memory LM from scratch on a folder of text files, with its own BPE tokenizer.

Each .txt file is one document; training examples are consecutive windows of whole segments from one
document, so memory written in early segments is what later segments can use.

    python examples/train_from_scratch.py --data path/to/texts/ --memory-type slot
    python examples/train_from_scratch.py --tiny      # a folder made from the bundled text, seconds on CPU
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="folder of .txt files (one document each)")
    parser.add_argument("--output-dir", default="outputs/from_scratch")
    parser.add_argument("--memory-type", choices=["kv", "slot"], default="kv")
    parser.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary to train")
    parser.add_argument("--segment-length", type=int, default=128)
    parser.add_argument("--num-segments", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=2000)
    parser.add_argument("--tiny", action="store_true", help="a folder of chapters of the bundled text, a few steps")
    return parser.parse_args(argv)


def write_chapters(folder: Path) -> Path:
    """A folder of text files: the bundled excerpt split at its chapter headings."""
    from hf_memlm.data import default_text

    folder.mkdir(parents=True, exist_ok=True)
    chapters = [part for part in default_text().split("Chapter ") if len(part) > 2000]
    for number, text in enumerate(chapters, start=1):
        (folder / f"chapter_{number:02d}.txt").write_text("Chapter " + text, encoding="utf-8")
    return folder


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, default_data_collator

    from hf_memlm import MemLMConfig, MemLMForCausalLM
    from hf_memlm.data import build_tokenizer, load_text_corpus, pack_documents
    from hf_memlm.training import MemLMTrainer, MemLMTrainingArguments

    if args.tiny:
        args.data = str(write_chapters(Path(tempfile.mkdtemp(prefix="hf_memlm_example_")) / "texts"))
        args.vocab_size, args.segment_length, args.num_segments, args.max_steps = 512, 32, 4, 10
    if args.data is None:
        raise SystemExit("--data FOLDER is required (or --tiny)")

    documents = load_text_corpus(args.data)  # one row per file
    tokenizer = build_tokenizer("bpe", texts=documents["text"], vocab_size=args.vocab_size)
    examples = pack_documents(documents, tokenizer, args.segment_length, args.num_segments)
    print(
        f"{len(documents)} documents -> {len(examples)} examples of {args.num_segments} x {args.segment_length} "
        f"tokens (BPE vocabulary {len(tokenizer)})"
    )

    torch.manual_seed(0)
    hidden, layers = (64, 2) if args.tiny else (256, 6)
    base = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=args.segment_length,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = MemLMConfig(
        text_config=base,
        memory_type=args.memory_type,
        memory_layers=[layers // 2],
        segment_length=args.segment_length,
        # each kind has settings of its own: kv keeps up to memory_size entries, slot has num_slots slots
        **{"kv": {"memory_size": 4096}, "slot": {"num_slots": 64}}[args.memory_type],
    )
    model = MemLMForCausalLM(config)

    training_args = MemLMTrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        memory_learning_rate=3e-3,
        weight_decay=0.1,
        warmup_steps=min(100, args.max_steps // 10),
        lr_scheduler_type="cosine",
        logging_steps=10 if not args.tiny else 5,
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
    result = trainer.train()

    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(args.output_dir).eval()
    prompt = tokenizer("It is a truth", return_tensors="pt")
    sample = reloaded.generate(**prompt, max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    print(
        f"loss {result.training_loss:.4f}; saved to {args.output_dir}; sample: "
        f"{tokenizer.decode(sample[0], skip_special_tokens=True)!r}"
    )
    return {"loss": result.training_loss, "output_dir": args.output_dir}


if __name__ == "__main__":
    main()
