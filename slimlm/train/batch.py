"""Sample and collate: the one data type the data pipeline hands the trainer.

A Sample is a tokenized training example: `labels[i]` is the token to predict at position i (already shifted, so
input_ids[i] -> labels[i]) or IGNORE where no loss is taken (prompt tokens, padding, the last position). Packed
samples carry `segment_ids` so the model keeps packed examples from attending to each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100  # label of positions that take no loss (torch's cross_entropy default ignore_index)


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]  # same length as input_ids; the *next*-token target of each position, or IGNORE
    segment_ids: list[int] | None = None  # set by packing: one id per packed example

    def __post_init__(self):
        if len(self.input_ids) != len(self.labels):
            raise ValueError(f"input_ids ({len(self.input_ids)}) and labels ({len(self.labels)}) differ in length")

    @property
    def num_trained(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


def collate(samples: list[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of samples into tensors: input_ids, labels [B, T] (+ segment_ids [B, T] if packed).

    Right padding needs no attention mask: causal attention never lets a real token see the pads after it, and pad
    positions take no loss. Padding of packed rows gets a segment id of its own.
    """
    T = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), T), IGNORE, dtype=torch.long)
    for b, s in enumerate(samples):
        ids[b, : len(s.input_ids)] = torch.tensor(s.input_ids, dtype=torch.long)
        labels[b, : len(s.labels)] = torch.tensor(s.labels, dtype=torch.long)
    batch = {"input_ids": ids, "labels": labels}
    if any(s.segment_ids is not None for s in samples):
        seg = torch.full((len(samples), T), -1, dtype=torch.long)
        for b, s in enumerate(samples):
            seg[b, : len(s.input_ids)] = torch.tensor(s.segment_ids or [0] * len(s.input_ids), dtype=torch.long)
        batch["segment_ids"] = seg
    return batch
