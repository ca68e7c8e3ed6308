from torch import nn


class PackedLinear(nn.Linear):
    """One matmul for several projections that read the same input (q/k/v, gate/up). The checkpoint keeps them
    apart; the loader writes each into its row range, named by `shard_names` (see loader.PACKED)."""

    def __init__(self, in_features: int, shard_sizes: list[int], shard_names: list[str], bias: bool):
        super().__init__(in_features, sum(shard_sizes), bias=bias)
        self.shard_sizes = list(shard_sizes)
        self.shard_names = list(shard_names)

    def shard_range(self, name: str) -> tuple[int, int]:
        i = self.shard_names.index(name)
        start = sum(self.shard_sizes[:i])
        return start, self.shard_sizes[i]

    def split(self, y):
        return y.split(self.shard_sizes, dim=-1)
