"""Padding-free packing with prompt sharing: a microbatch's sequences in fewer, fuller rows.

Sequences with the same prompt (a pair's chosen and rejected, or every sequence the reference
pass scores on one prompt) form one *unit*: the prompt once, then each response as a *branch*.
Branch tokens see the prompt and the earlier tokens of their own branch, never another branch,
and their positions continue from the prompt's end — so each branch computes exactly what its
own padded row would (arXiv 2410.20305, "prompt sharing"). Units are then packed first-fit
decreasing into rows no longer than the longest unit, and attention never crosses a unit.

The attention pattern goes to the model as an additive 4D mask, which transformers' SDPA and
eager attention take as it is (flash-attention-2 cannot express branches, so it is refused).
After the decoder, `Packed.unpack` scatters the hidden states back onto the padded (N, T)
layout, where a shared prompt's states appear in both rows: every log-prob, value head and
mask downstream is the padded path's, unchanged, and no loss knows about packing.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from halos.config import ConfigError

Sequence = tuple[list[int], list[int]]  # (prompt ids, response ids)


@dataclass
class Unit:
    """One prompt and the responses that share it; `rows[k]` is response k's padded row."""

    prompt: list[int]
    responses: list[list[int]]
    rows: list[int]

    def __len__(self) -> int:
        return len(self.prompt) + sum(map(len, self.responses))


@dataclass
class Packed:
    """The packed rows (R, L) of a microbatch of N sequences padded to T."""

    input_ids: torch.Tensor  # (R, L) long, pad id where empty
    position_ids: torch.Tensor  # (R, L) long: position inside the token's own sequence
    unit_ids: torch.Tensor  # (R, L) long: unit of each token, -1 where empty
    branch_ids: torch.Tensor  # (R, L) long: 0 for the prompt, k+1 for response k
    unpack_index: torch.Tensor  # (N, T) long: flat index into R·L of padded token (n, t)

    def to(self, device: torch.device | str) -> Packed:
        return Packed(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    @property
    def tokens(self) -> int:
        """Tokens the model computes (prompt sharing counts a shared prompt once)."""
        return int((self.unit_ids >= 0).sum())

    def attention_bias(self, dtype: torch.dtype) -> torch.Tensor:
        """(R, 1, L, L) additive mask: 0 where query i may attend key j, the dtype's minimum
        elsewhere. j ≤ i in the same unit, and j in the prompt or in i's own branch."""
        unit, branch = self.unit_ids, self.branch_ids
        length = unit.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=unit.device).tril()
        same_unit = (unit[:, :, None] == unit[:, None, :]) & (unit[:, :, None] >= 0)
        same_branch = (branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])
        # An empty slot attends to itself only: no query row is all-masked (NaN softmax).
        allowed = (same_unit & same_branch & causal) | torch.eye(length, dtype=torch.bool,
                                                                 device=unit.device)
        bias = torch.zeros(allowed.shape, dtype=dtype, device=unit.device)
        return bias.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]

    def unpack(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states (R, L, H) of the packed rows → (N, T, H) on the padded layout."""
        return hidden.flatten(0, 1)[self.unpack_index]


def shared_prompt_units(sequences: list[Sequence]) -> list[Unit]:
    """Group sequences by identical prompt, in first-seen order. Sequences without a prompt stay
    alone (grouping them would only make one long row)."""
    units: list[Unit] = []
    by_prompt: dict[tuple[int, ...], Unit] = {}
    for row, (prompt, response) in enumerate(sequences):
        unit = by_prompt.get(tuple(prompt)) if prompt else None
        if unit is None:
            unit = Unit(list(prompt), [], [])
            units.append(unit)
            if prompt:
                by_prompt[tuple(prompt)] = unit
        unit.responses.append(list(response))
        unit.rows.append(row)
    return units


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of item indices, longest item first, each into the first bin it fits."""
    bins: list[list[int]] = []
    room: list[int] = []
    for item in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, free in enumerate(room):
            if lengths[item] <= free:
                bins[b].append(item)
                room[b] -= lengths[item]
                break
        else:
            bins.append([item])
            room.append(capacity - lengths[item])
    return bins


# A batch is packed only where that removes at least this fraction of the padded positions:
# rows as long as the longest unit can hold more positions than the padded batch (similar
# lengths, nothing shared), and then the padded batch is the cheaper exact computation.
MIN_SAVING = 0.1


def pack_when_smaller(sequences: list[Sequence], pad_id: int, padded_length: int
                      ) -> Packed | None:
    """`pack`, or None where the packed rows would not save MIN_SAVING of the padded ones (decided
    from the layout, before any tensor is filled)."""
    units, rows, length = _layout(sequences)
    if len(rows) * length > (1 - MIN_SAVING) * len(sequences) * padded_length:
        return None
    return _fill(units, rows, length, pad_id, padded_length)


def pack(sequences: list[Sequence], pad_id: int, padded_length: int) -> Packed:
    """Share prompts and pack the `sequences` of a microbatch padded to `padded_length`."""
    return _fill(*_layout(sequences), pad_id, padded_length)


def _layout(sequences: list[Sequence]) -> tuple[list[Unit], list[list[int]], int]:
    """The units, the units of each packed row, and the rows' length."""
    units = shared_prompt_units(sequences)
    rows = first_fit_decreasing([len(u) for u in units], max(len(u) for u in units))
    return units, rows, max(sum(len(units[u]) for u in row) for row in rows)


def _fill(units: list[Unit], rows: list[list[int]], length: int, pad_id: int,
          padded_length: int) -> Packed:
    sequences = sum(len(u.rows) for u in units)
    shape = (len(rows), length)
    packed = Packed(torch.full(shape, pad_id, dtype=torch.long),
                    torch.zeros(shape, dtype=torch.long), torch.full(shape, -1, dtype=torch.long),
                    torch.zeros(shape, dtype=torch.long),
                    torch.zeros((sequences, padded_length), dtype=torch.long))
    for r, row in enumerate(rows):
        offset = 0
        for u in row:
            offset = _place(packed, units[u], u, r, offset, length)
    return packed


def _place(packed: Packed, unit: Unit, unit_id: int, row: int, offset: int, length: int) -> int:
    """Write `unit` into packed row `row` from column `offset`; return the next free column."""
    def put(ids: list[int], branch: int, first_position: int) -> torch.Tensor:
        nonlocal offset
        span = slice(offset, offset + len(ids))
        packed.input_ids[row, span] = torch.tensor(ids, dtype=torch.long)
        packed.position_ids[row, span] = torch.arange(first_position, first_position + len(ids))
        packed.unit_ids[row, span], packed.branch_ids[row, span] = unit_id, branch
        offset += len(ids)
        return row * length + torch.arange(span.start, span.stop)

    prompt_at = put(unit.prompt, 0, 0)
    for k, (response, padded_row) in enumerate(zip(unit.responses, unit.rows, strict=True)):
        response_at = put(response, k + 1, len(unit.prompt))
        flat = torch.cat([prompt_at, response_at])
        packed.unpack_index[padded_row, : len(flat)] = flat
    return offset


def check_packing(model_config, attn_implementation: str, max_length: int) -> None:
    """Refuse --packing where the 4D mask would not be what the model computes."""
    if attn_implementation == "flash_attention_2":
        raise ConfigError("--packing needs --attn-implementation sdpa or eager: flash-attention-2 "
                          "takes no attention mask, so prompt-shared branches cannot be expressed")
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    window = getattr(text, "sliding_window", None)
    if window and getattr(text, "use_sliding_window", True) and max_length > window:
        raise ConfigError(f"--packing: model type {text.model_type!r} uses sliding-window "
                          f"attention ({window} tokens) and --max-length is {max_length}; the "
                          f"packed mask would attend beyond the window: drop --packing")
