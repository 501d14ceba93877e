"""Strings as torchmetrics state: NUL-separated utf-8 bytes in a uint8 tensor, so "cat" sync works."""

from __future__ import annotations

import torch


def encode_strings(strings: list[str], device: torch.device | str = "cpu") -> torch.Tensor:
    """One uint8 tensor holding every string followed by a NUL byte."""
    data = b"".join(s.replace("\0", "").encode("utf-8") + b"\0" for s in strings)
    return (
        torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
        if data
        else torch.zeros(0, dtype=torch.uint8, device=device)
    )


def decode_strings(state: torch.Tensor | list[torch.Tensor]) -> list[str]:
    """The strings of an encoded state (a tensor, or a list of them before sync)."""
    if isinstance(state, list):
        state = torch.cat(state) if state else torch.zeros(0, dtype=torch.uint8)
    data = bytes(state.cpu().numpy().tobytes())
    return [s.decode("utf-8") for s in data.split(b"\0")[:-1]]
