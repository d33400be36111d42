"""Where each token may attend: layouts of padded batches and of packed cells, and unpadding one into the other.

Packed (THD) layouts come from `cu_seqlens`; with `max_seqlen` given, nothing is read back from the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.device import host_to_device
from common.packing import filler_cell_sizes


@dataclass
class AttentionLayout:
    """How tokens may attend: padded batch (key mask or none) or packed cells (pad/unpad indices)."""

    key_mask: torch.Tensor | None = None  # [B, 1, 1, S] bool, True = attend; None = attend everywhere
    packed_index: torch.Tensor | None = None  # [T] slot of each packed token in a [n * max_seqlen] grid
    packed_mask: torch.Tensor | None = None  # [n, 1, 1, max_seqlen] bool key mask of that grid
    max_seqlen: int = 0
    cu_seqlens: torch.Tensor | None = None


def padded_layout(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
) -> tuple[AttentionLayout, torch.Tensor]:
    """Attention layout and position ids of a right-padded [B, S] batch."""
    layout = AttentionLayout()
    # No mask when nothing is padded lets SDPA pick its fastest kernel.
    if attention_mask is not None and not bool(attention_mask.all()):
        layout.key_mask = attention_mask.to(device=input_ids.device, dtype=torch.bool)[:, None, None, :]
    return layout, torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)


def _check_cu_seqlens(cu: torch.Tensor, total: int, max_seqlen: int | None) -> None:
    """Cell boundaries checked where they live: raised now for host tensors, on the device without a wait else."""
    lengths = cu[1:] - cu[:-1]
    nonempty = lengths > 0
    # Empty cells may only trail the real ones: static-shape batches pad cu_seqlens to a fixed cell count so.
    checks = {
        f"cu_seqlens must start at 0 and end at the packed length {total}": (cu[0] == 0) & (cu[-1] == total),
        "cu_seqlens must be non-decreasing, with empty cells only at the end": (lengths >= 0).all()
        & nonempty[0]
        & (nonempty[1:] <= nonempty[:-1]).all(),
    }
    if max_seqlen is not None:
        checks[f"max_seqlen {max_seqlen} is shorter than the longest packed cell"] = (
            lengths.max() <= max_seqlen
        )
    for message, ok in checks.items():
        if cu.device.type == "cpu":
            if not bool(ok):
                raise ValueError(f"{message}; got cu_seqlens {cu.tolist()}")
        else:
            torch._assert_async(ok, message)


def packed_layout(
    cu_seqlens: torch.Tensor,
    max_seqlen: int | None,
    total: int,
    device: torch.device,
    token_multiple: int = 1,
) -> tuple[AttentionLayout, torch.Tensor]:
    """Pad/unpad indices and per-cell positions for packed (THD) input. With `token_multiple` > 1, filler cells
    (each no longer than `max_seqlen`) round the token count up to that multiple: the layout and positions then
    cover `total` plus the filler tokens, which the caller appends to its ids.

    Given `max_seqlen`, device-side `cu_seqlens` are not read back, so the host never waits for the GPU here;
    host-side ones give the exact longest cell for free."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens must be 1-D with at least 2 entries; got shape {tuple(cu_seqlens.shape)}"
        )
    given = cu_seqlens.detach().to(torch.long)
    _check_cu_seqlens(given, total, max_seqlen)
    if max_seqlen is None or given.device.type == "cpu":
        longest = int((given[1:] - given[:-1]).max())  # free on the host; on the device, the one wait
    else:
        longest = int(max_seqlen)
    cu = host_to_device(given, device)
    filler = -total % token_multiple
    if filler:
        # Cells of at most `longest` tokens keep max_seqlen, and so the attention kernels' shapes, unchanged.
        sizes = filler_cell_sizes(filler, longest)
        ends = total + torch.tensor(sizes, dtype=torch.long).cumsum(0)
        cu = torch.cat([cu, host_to_device(ends, device)])
        total += filler
    lengths = cu[1:] - cu[:-1]
    n = lengths.numel()
    cell_of_token = torch.repeat_interleave(torch.arange(n, device=device), lengths, output_size=total)
    positions = torch.arange(total, device=device) - cu[:-1][cell_of_token]
    packed_index = cell_of_token * longest + positions
    grid_mask = torch.arange(longest, device=device)[None, :] < lengths[:, None]
    layout = AttentionLayout(
        packed_index=packed_index,
        packed_mask=grid_mask[:, None, None, :],
        max_seqlen=longest,
        cu_seqlens=cu.to(torch.int32),
    )
    return layout, positions.unsqueeze(0)


def unpad(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> tuple | None:
    """Right-padded batch -> packed (ids [1,T], labels [1,T], cu_seqlens, max_seqlen, token_index); None when the
    padding is not at the right end, a cell is empty, or a pad position carries a label (then the padded path runs)."""
    s = input_ids.shape[1]
    mask = attention_mask.to(input_ids.device).bool()
    lengths = mask.sum(1)
    right_padded = torch.arange(s, device=mask.device)[None, :] < lengths[:, None]
    if (
        bool(mask.all())
        or not torch.equal(right_padded, mask)
        or bool((lengths == 0).any())
        or bool((labels[~mask] != -100).any())
    ):
        return None
    token_index = torch.nonzero(mask.reshape(-1), as_tuple=False).squeeze(1)
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    return (
        input_ids.reshape(-1)[token_index].unsqueeze(0),
        labels.reshape(-1)[token_index].unsqueeze(0),
        cu_seqlens,
        int(lengths.max()),
        token_index,
    )
