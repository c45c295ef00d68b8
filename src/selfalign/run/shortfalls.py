"""Warnings for a stage that finished short of its target, each saying what to do about it.

`stage_warnings(name, counts, cfg)` reads a finished stage's counts (what its `run` returned, as
the manifest keeps them) and the pipeline config, and returns one line per shortfall:

    instructions  self-instruct kept fewer than `self_instruct.num_instructions`; the merge
                  dropped most of its inputs as near-duplicates
    self_align    fewer than KEEP_SHARE of the instructions got an answer that passed the filters
    verbose       fewer than KEEP_SHARE of the verbose answers passed the filters

A stage that falls short still finishes (its records are good, there are just fewer of them), but
a run that goes on from 3 of 24 instructions deserves a line in the log, the manifest (the stage's
`warnings`) and the report. Each line names the most frequent rejection reasons, since they say
which setting to change. Reads and writes nothing.
"""

from __future__ import annotations

from typing import Any

from selfalign.run.registry import STAGE

# below this share of its inputs kept, a filtering stage warns: its filters rejected most of
# what the model wrote, which a working setup does not do
KEEP_SHARE = 0.5

# rejection reason -> what to do about it, per stage ({key}: the stage's config section)
_SELF_INSTRUCT_FIXES = {
    "similar": "raise instructions.self_instruct.similarity_threshold (now {threshold}) or "
    "show more varied seed tasks",
    "unparseable": "use a bigger model (its output does not follow the numbered-list format)",
    "truncated": "raise instructions.self_instruct.sampling.max_tokens",
    "too_short": "lower instructions.self_instruct.min_words",
    "too_long": "raise instructions.self_instruct.max_words",
    "blocklist": "shorten instructions.self_instruct.blocklist",
}
_ANSWER_FIXES = {
    "no_answer": "use a bigger model (it does not follow the exemplars' thoughts/answer format)",
    "no_thoughts": "use a bigger model (it does not follow the exemplars' thoughts/answer format)",
    "no_self_identification": "use a bigger model (its thoughts do not open as the exemplars' do)",
    "turn_header": "use a bigger model (it writes further turns instead of ending its answer)",
    "truncated": "raise {key}.sampling.max_tokens (now {max_tokens})",
    "too_short": "lower {key}.min_words (now {min_words})",
    "apology": "raise the apology bias, or use a bigger model",
    "repetition": "use a bigger model, or stronger {key}.sampling.ngram_penalties",
    "exemplar_leakage": "use a bigger model (it copies the exemplars' answers)",
    "no_citation": "set {key}.require_citation: false, or use a bigger model",
}


def stage_warnings(name: str, counts: dict[str, Any], cfg: Any) -> list[str]:
    """The shortfall warnings of stage `name` (empty when it met its targets)."""
    if name == "instructions":
        return _instructions(counts, cfg.instructions)
    if name == "self_align":
        kept, total = counts.get("kept", 0), counts.get("instructions", 0)
        section = cfg.self_align
        return _filtered("stage 2", "instructions", kept, total, counts.get("rejected"),
                         "self_align", section)  # fmt: skip
    if name == "verbose":
        kept, total = counts.get("kept", 0), counts.get("generated", 0)
        return _filtered("stage 4", "verbose answers", kept, total,
                         counts.get("rejected_by_reason"), "verbose", cfg.verbose)  # fmt: skip
    return []


def _top(reasons: Any, n: int = 3) -> list[tuple[str, int]]:
    if not isinstance(reasons, dict):
        return []
    return sorted(((str(k), v) for k, v in reasons.items() if isinstance(v, int) and v),
                  key=lambda kv: -kv[1])[:n]  # fmt: skip


def _reasons_text(top: list[tuple[str, int]]) -> str:
    return f" (most rejected: {', '.join(f'{r} {n}' for r, n in top)})" if top else ""


def _instructions(counts: dict[str, Any], cfg: Any) -> list[str]:
    steps = counts.get("steps") or {}
    merge = steps.get("merge") or counts  # a stage.json of `merge-instructions` (adopted)
    si = steps.get("self_instruct") or merge.get("self_instruct") or {}
    out = []
    if si.get("shortfall") and si.get("target"):
        top = _top(si.get("rejected"))
        fixes = [f"raise instructions.self_instruct.max_rounds (it ran {si.get('rounds')} rounds)"]
        fixes += [
            _SELF_INSTRUCT_FIXES[r].format(threshold=cfg.self_instruct.similarity_threshold)
            for r, _ in top
            if r in _SELF_INSTRUCT_FIXES
        ]
        fixes.append("use a bigger model")
        out.append(
            f"stage 1 kept {si.get('kept', 0)} of {si['target']} target instructions "
            f"(self-instruct){_reasons_text(top)}: " + "; ".join(dict.fromkeys(fixes))
        )
    generated, kept = merge.get("generated", 0), merge.get("kept", 0)
    if generated and kept < KEEP_SHARE * generated:
        out.append(
            f"stage 1's merge kept {kept} of {generated} instructions{_reasons_text(_top(merge.get('rejected')))}: "
            f"raise instructions.merge.similarity_threshold (now {cfg.merge.similarity_threshold}) "
            "to keep more near-duplicates, or generate more varied instructions (a bigger model, "
            "more topics)"
        )
    return out


def _filtered(
    stage: str, what: str, kept: int, total: int, reasons: Any, key: str, section: Any
) -> list[str]:
    """A filtering stage that kept less than KEEP_SHARE of its `total` inputs."""
    if not total or kept >= KEEP_SHARE * total:
        return []
    top = _top(reasons)
    values = {
        "key": key, "max_tokens": section.sampling.max_tokens,
        "min_words": getattr(section, "min_words", "?"),
    }  # fmt: skip
    fixes = [_ANSWER_FIXES[r].format(**values) for r, _ in top if r in _ANSWER_FIXES]
    fixes = list(dict.fromkeys(fixes)) or ["use a bigger model"]
    folder = STAGE[key].folder
    return [
        f"{stage} kept {kept} of {total} {what} ({100 * kept // total}%){_reasons_text(top)}: "
        + "; ".join(fixes)
        + f" (each rejection with its reason in {folder}/rejected.jsonl)"
    ]
