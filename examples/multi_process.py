"""Multi-process training with `accelerate launch` (DDP; FSDP or DeepSpeed with another config).

The same script runs as one process (`python examples/multi_process.py`) or many:

    accelerate launch --config_file configs/accelerate/ddp_cpu.yaml examples/multi_process.py --tiny
    accelerate launch --config_file configs/accelerate/ddp_gpu.yaml examples/multi_process.py

What to mind:
  * every process builds the model from the same seed; the Trainer's seeded sampler gives each process
    its own share of every global batch (per_device_train_batch_size x processes x accumulation steps);
  * memory lives inside each forward call, one state per example, so processes never share or
    synchronise memory; only gradients are averaged;
  * data is the same in every process (seeded); only the main process prints and saves.
"""

from __future__ import annotations

import argparse


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs/multi_process")
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--per-device-batch-size", type=int, default=8)
    parser.add_argument("--tiny", action="store_true", help="a few steps of a tiny model")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch
    from accelerate import PartialState
    from transformers import default_data_collator

    from hf_memlm import MemLMConfig, MemLMForCausalLM
    from hf_memlm.data import build_tokenizer, make_passkey_dataset
    from hf_memlm.recipes.defaults import tiny_llama_config
    from hf_memlm.training import MemLMTrainer, MemLMTrainingArguments

    if args.tiny:
        args.max_steps, args.per_device_batch_size = 4, 2
    # TrainingArguments sets up the processes (DDP over NCCL on GPUs, gloo on CPU)
    training_args = MemLMTrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.per_device_batch_size,
        learning_rate=2e-3,
        memory_learning_rate=1e-2,
        logging_steps=1 if args.tiny else 20,
        save_strategy="no",
        report_to="none",
        seed=0,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=args.tiny,
    )
    state = PartialState()
    tokenizer = build_tokenizer("byte")
    segment_length, num_segments = (64, 3) if args.tiny else (128, 8)
    # Seeded, so every process builds the same examples. With a file corpus (load_text_corpus +
    # pack_documents), main_process_first lets the main process fill the datasets cache for the others.
    with state.main_process_first():
        examples = make_passkey_dataset(
            tokenizer, 64 if args.tiny else 4096, segment_length, num_segments, filler="synthetic", seed=0
        )
    examples = examples.select_columns(["input_ids", "labels"])

    torch.manual_seed(0)  # the same initial weights in every process
    config = MemLMConfig(
        text_config=tiny_llama_config(vocab_size=len(tokenizer)),
        memory_type="kv",
        memory_layers=[0],
        segment_length=segment_length,
        memory_size=1024,
        memory_topk=None,
    )
    model = MemLMForCausalLM(config)

    trainer = MemLMTrainer(model=model, args=training_args, train_dataset=examples, data_collator=default_data_collator)
    result = trainer.train()
    global_batch = args.per_device_batch_size * state.num_processes * training_args.gradient_accumulation_steps
    if state.is_main_process:
        print(
            f"{state.num_processes} process(es) on {state.device.type}, global batch {global_batch}: "
            f"mean loss {result.training_loss:.4f} over {trainer.state.global_step} steps"
        )
    trainer.save_model(args.output_dir)  # writes on the main process only (gathers shards under FSDP/DeepSpeed)
    return {"processes": state.num_processes, "loss": result.training_loss, "output_dir": args.output_dir}


if __name__ == "__main__":
    main()
