"""Batches of examples whose labels sit at their end (a question after a document), for `Trainer`.

Examples may differ in length: they are padded on the right (`attention_mask` 0, labels ignored). The batch also
says `logits_to_keep`: the columns from the one before the first label on, so the model computes logits only
there and runs the document's segments before them only up to its last memory layer (see
`MemLMForCausalLM.forward`). The loss and its gradients are those of a full forward. With `read_targets=True`
the examples' `read_targets` (a target column per column, for `MemLMTrainer`'s read loss) are padded with -100 and
passed on too; otherwise they are left out (the model's forward takes no such argument).
"""

from __future__ import annotations

import torch

from hf_memlm.data import IGNORE_INDEX


class LabelledTailCollator:
    """Right-pads `input_ids` / `labels` and adds `attention_mask` and `logits_to_keep`."""

    def __init__(self, pad_token_id: int, read_targets: bool = False):
        if pad_token_id is None:
            raise ValueError("LabelledTailCollator needs a pad token id (any id: padded columns are masked out).")
        self.pad_token_id = int(pad_token_id)
        self.read_targets = read_targets

    def __call__(self, features: list[dict]) -> dict:
        length = max(len(feature["input_ids"]) for feature in features)
        batch = len(features)
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros(batch, length, dtype=torch.long)
        targeted = self.read_targets
        if targeted and "read_targets" not in features[0]:
            raise ValueError(
                "LabelledTailCollator(read_targets=True) needs examples with a read_targets column (chat_passkey's, chat_suite's); "
                "these have none. Leave training.read_loss_weight at 0 for this task."
            )
        read_targets = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long) if targeted else None
        for row, feature in enumerate(features):
            ids = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            input_ids[row, : len(ids)] = ids
            labels[row, : len(ids)] = torch.as_tensor(feature["labels"], dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
            if targeted:
                read_targets[row, : len(ids)] = torch.as_tensor(feature["read_targets"], dtype=torch.long)
        labelled = (labels != IGNORE_INDEX).any(0).nonzero()
        first = int(labelled[0]) if len(labelled) else 0
        # the logit of the column before a label predicts it
        logits_to_keep = length - max(first - 1, 0)
        batch_inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "logits_to_keep": logits_to_keep,
        }
        return batch_inputs if read_targets is None else {**batch_inputs, "read_targets": read_targets}


__all__ = ["LabelledTailCollator"]
