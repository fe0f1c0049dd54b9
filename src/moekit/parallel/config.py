"""`ParallelConfig`: how many ranks replicate the model (dp) and how many share its experts (ep).

The trainer nests it as `parallel` in its run config (`--set parallel.ep=4`). World size must
equal dp * ep; with `dp=None` the data-parallel size is whatever is left, world_size // ep.
Whether `num_experts` divides by `ep` is checked when the model is parallelized (the model is
not known here); see `moekit.parallel.parallelize`.
"""

from __future__ import annotations

from dataclasses import dataclass

from moekit.validate import check_choice, check_float, check_int

BACKENDS = ("auto", "gloo", "nccl")


@dataclass
class ParallelConfig:
    dp: int | None = None  # data-parallel replicas; None = world_size // ep
    ep: int = 1  # expert-parallel ranks sharing one copy of the experts
    backend: str = "auto"  # "auto": nccl when CUDA is available, else gloo
    # Seconds a collective may wait for its peers before the process group raises; a hang
    # becomes an error instead of a stuck job.
    timeout_s: float = 600.0

    def __post_init__(self):
        if self.dp is not None:
            check_int("parallel", "dp", self.dp, 1)
        check_int("parallel", "ep", self.ep, 1)
        check_choice("parallel", "backend", self.backend, BACKENDS)
        check_float("parallel", "timeout_s", self.timeout_s, error=ValueError)

    def resolve_dp(self, world_size: int) -> int:
        """The data-parallel size for this world; raises naming the field when dp * ep != world."""
        if world_size % self.ep:
            raise ValueError(
                f"parallel.ep={self.ep} must divide the world size {world_size} "
                f"(torchrun --nproc-per-node x nodes); world = parallel.dp x parallel.ep"
            )
        dp = world_size // self.ep if self.dp is None else self.dp
        if dp * self.ep != world_size:
            raise ValueError(
                f"world size {world_size} must equal parallel.dp x parallel.ep = {dp} x {self.ep} = {dp * self.ep}; "
                f"set parallel.dp={world_size // self.ep} (or leave it unset) or change parallel.ep"
            )
        return dp

    def resolve_backend(self) -> str:
        if self.backend != "auto":
            return self.backend
        import torch

        return "nccl" if torch.cuda.is_available() else "gloo"
