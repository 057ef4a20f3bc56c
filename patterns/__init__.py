"""Attention pattern analysis on Dynamo FX graphs: canonical ops, the matcher, and mask analysis."""

from flash_fx.patterns.match import AttentionMatch, NearMiss, find_attention, match_anchor

__all__ = ["AttentionMatch", "NearMiss", "find_attention", "match_anchor"]
