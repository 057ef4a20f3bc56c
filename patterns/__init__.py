"""Attention pattern analysis on Dynamo FX graphs: canonical ops, the matcher, and mask analysis."""

from flash_fx.patterns.match import AttentionMatch, NearMiss, anchor_nodes, match_anchor

__all__ = ["AttentionMatch", "NearMiss", "anchor_nodes", "match_anchor"]
