"""FusionReport: what one fusion pass changed, what it left alone and why. Plain data, printed by the CLI."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class FusionReport:
    """fused: one line per change ("layers.0.self_attn.qkv_proj <- q_proj, k_proj, v_proj");
    skipped: {what: why it was left unfused}; notes: anything else the user should know (costs, caveats)."""

    fused: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One line: counts, plus the first skip reason (the rest are in to_dict())."""
        line = f"{len(self.fused)} fused, {len(self.skipped)} skipped"
        if self.skipped:
            what, why = next(iter(self.skipped.items()))
            more = f" (+{len(self.skipped) - 1} more)" if len(self.skipped) > 1 else ""
            line += f" — {what}: {why}{more}"
        return line
