"""Fixed position encodings: the MAE-style 2-D sin-cos table and the 2-D axial RoPE tables."""
import torch


def sincos_1d(dim, positions):
    """(M,) positions -> (M, dim): sin half then cos half, frequencies 1/10000^(2i/dim)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.reshape(-1, 1).double() * omega
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim, grid_size):
    """(grid², dim) table, tokens row-major: first half encodes the column, second half the row."""
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    table = torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)
    return table.float()


def rope_2d(head_dim, grid_size, num_prefix_tokens=0, theta=10000.0):
    """cos/sin tables (num_prefix + grid², head_dim) for 2-D axial RoPE on interleaved pairs.

    The first half of the head dim rotates with the token's row, the second with its column;
    each frequency is repeated for the two members of its pair. Prefix (in-context) tokens get
    the identity rotation (cos 1, sin 0).
    """
    half = head_dim // 2
    freqs = 1.0 / theta ** (torch.arange(0, half, 2)[: half // 2].float() / half)
    freqs = freqs.repeat_interleave(2)
    pos = torch.arange(grid_size).float()
    angle_rows = (pos[:, None] * freqs)[:, None, :].expand(grid_size, grid_size, half)
    angle_cols = (pos[:, None] * freqs)[None, :, :].expand(grid_size, grid_size, half)
    angles = torch.cat([angle_rows, angle_cols], dim=-1).reshape(grid_size * grid_size, head_dim)
    cos, sin = angles.cos(), angles.sin()
    if num_prefix_tokens:
        cos = torch.cat([torch.ones(num_prefix_tokens, head_dim), cos])
        sin = torch.cat([torch.zeros(num_prefix_tokens, head_dim), sin])
    return cos, sin
