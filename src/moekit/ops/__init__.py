"""Autograd-aware kernels: grouped GEMM, permutation helpers and their slow references."""

from moekit.ops.grouped import grouped_mm, native_grouped_mm_ok
from moekit.ops.permute import expert_counts, positions_in_bucket, sort_by_expert

__all__ = ["grouped_mm", "native_grouped_mm_ok", "expert_counts", "positions_in_bucket", "sort_by_expert"]
