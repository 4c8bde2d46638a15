"""Conversations -> token samples (ids + next-token labels) -> packed rows.

Labels are shifted inside each sample (label[t] = ids[t+1] where that token is an assistant token, else -100),
so a sample never predicts its neighbour's first token once packed. A packed row lays samples end to end with
`seq_ids` (which sample each token is in) and `position_ids` restarting at 0; the decoder turns seq_ids into
block-diagonal causal attention. Packing therefore changes speed, not the math.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tunesmith.text.template import ChatTemplate

IGNORE = -100


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]  # already shifted: labels[t] is the target for position t, IGNORE where unsupervised
    kl: bool = False  # trained towards the base model's next-token distributions (--retain_kl), not its labels

    @property
    def n_supervised(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


@dataclass
class Row:
    """One packed micro-batch row (B=1), ready for the model."""

    input_ids: torch.Tensor  # (1, T)
    labels: torch.Tensor  # (1, T)
    position_ids: torch.Tensor  # (1, T)
    seq_ids: torch.Tensor | None  # (1, T); None when the row holds a single sample
    n_samples: int
    kl: bool = False  # its samples are Sample.kl ones (a row never mixes the two kinds)

    def to(self, device) -> "Row":
        mv = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Row(mv(self.input_ids), mv(self.labels), mv(self.position_ids), mv(self.seq_ids), self.n_samples,
                   self.kl)

    def padded(self, multiple: int) -> "Row":
        """The row lengthened to a multiple of `multiple` tokens, so a compiled model sees few distinct shapes.
        The padding is a sample of its own (it attends only to itself) with no labels: the loss is unchanged."""
        T = self.input_ids.shape[1]
        n = -T % multiple
        if n == 0:
            return self
        seq = self.seq_ids if self.seq_ids is not None else torch.zeros_like(self.input_ids)
        pad = lambda t, v: torch.cat([t, torch.full((1, n), v, dtype=t.dtype, device=t.device)], 1)  # noqa: E731
        return Row(pad(self.input_ids, 0), pad(self.labels, IGNORE),
                   torch.cat([self.position_ids, torch.arange(n, device=seq.device)[None]], 1),
                   pad(seq, self.n_samples), self.n_samples, self.kl)


def with_system(messages: list[dict], system: str | None) -> list[dict]:
    """`--system` applies to conversations that carry no system message of their own."""
    if system is None or any(m["role"] == "system" for m in messages):
        return messages
    return [{"role": "system", "content": system}] + list(messages)


def encode_sample(messages: list[dict], template: ChatTemplate, system: str | None, max_length: int,
                  truncation: str = "delete") -> Sample | None:
    """Tokenize one conversation; None when it is longer than max_length and truncation is 'delete'."""
    enc = template.encode(with_system(messages, system))
    return fit_sample(enc.input_ids, enc.labels_mask, max_length, truncation)


def fit_sample(ids: list[int], mask: list[bool], max_length: int, truncation: str = "delete") -> Sample | None:
    """A tokenized conversation (ids, which of them the model must learn) as a Sample of at most max_length
    tokens; None when it is longer and truncation is 'delete', or when nothing is left to learn."""
    if len(ids) > max_length:
        if truncation == "delete":
            return None
        if truncation == "left":
            ids, mask = ids[-max_length:], mask[-max_length:]
        else:
            ids, mask = ids[:max_length], mask[:max_length]
    labels = [ids[t + 1] if mask[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]
    if all(x == IGNORE for x in labels):
        return None
    return Sample(ids, labels)


def encode_dataset(convs: list[list[dict]], template: ChatTemplate, system: str | None, max_length: int,
                   truncation: str = "delete") -> tuple[list[Sample], int]:
    """All conversations -> samples; returns (samples, number dropped for length or no assistant tokens)."""
    out = []
    for c in convs:
        s = encode_sample(c, template, system, max_length, truncation)
        if s is not None:
            out.append(s)
    return out, len(convs) - len(out)


def make_row(samples: list[Sample]) -> Row:
    ids, labels, pos, seq = [], [], [], []
    for i, s in enumerate(samples):
        ids += s.input_ids
        labels += s.labels
        pos += range(len(s.input_ids))
        seq += [i] * len(s.input_ids)
    t = lambda x: torch.tensor([x], dtype=torch.long)  # noqa: E731
    return Row(t(ids), t(labels), t(pos), t(seq) if len(samples) > 1 else None, len(samples), samples[0].kl)


def pack_samples(samples: list[Sample], max_length: int, packing: bool = True) -> list[Row]:
    """Rows for one optimizer step's samples: first-fit-decreasing into rows of at most max_length tokens,
    or one row per sample without packing. The set of samples, hence the loss, is the same either way.
    Sample.kl samples are packed into rows of their own (their loss is another one)."""
    if not packing:
        return [make_row([s]) for s in samples]
    if any(s.kl for s in samples) and not all(s.kl for s in samples):
        return (pack_samples([s for s in samples if not s.kl], max_length)
                + pack_samples([s for s in samples if s.kl], max_length))
    bins: list[list[Sample]] = []
    room: list[int] = []
    for s in sorted(samples, key=lambda s: -len(s.input_ids)):
        n = len(s.input_ids)
        for b in range(len(bins)):
            if room[b] >= n:
                bins[b].append(s)
                room[b] -= n
                break
        else:
            bins.append([s])
            room.append(max_length - n)
    return [make_row(b) for b in bins]
