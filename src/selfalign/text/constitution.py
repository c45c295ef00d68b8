"""The constitution: the assistant's identity, its principles and in-context exemplars.

Stage 2 (principle-driven self-alignment, paper section 3.2) shows the base model a constitution
before every instruction: who the assistant is, a numbered list of principles, and exemplar
conversations in which the assistant first writes "internal thoughts" naming the principles it
applies, then answers. The constitution is data, not code, so users can bring their own.

Two file formats load into the same `Constitution`:

- YAML (`*.yaml`, `*.yml`, or a bundled name such as `default`), with the schema below;
- a raw prompt text (`*.txt`, `*.md`) such as the original `watson_self_align_prompt.txt`: used
  verbatim as the prompt, it must end with the user label (`User:`); its principles, exemplars,
  codename and self-identification sentence are read back from the text for parsing and filters.

YAML schema (every text may use the placeholders {name} (the codename shown in the prompt),
{developer}, {knowledge_cutoff} (e.g. "September 2023") and {cutoff_year}; other braces are
left alone, so code in exemplars is safe)::

    identity: {name: Dromedary, developer: ..., knowledge_cutoff: "2023-09"}
    codename: Watson            # optional: the name in the prompt; identity.name is the released one
    self_identification: "I am a helpful, ... assistant."   # opens every internal thought
    citation: "I should follow principles {cited}."       # how thoughts cite principles
    preamble: "# {name} ..."     # text before the principle list
    examples_intro: "..."        # text between the principles and the exemplars
    format: {user: User, thoughts: "{name} (internal thoughts)", answer: "{name}",
             auto_reply: "{name} (auto reply)"}
    principles:
      - {id: 1, name: ethical, text: "{name} ..."}
    exemplars:
      - name: dated knowledge
        turns:
          - user: "..."
            thoughts: "..."      # between the self-identification sentence and the citation
            principles: [3, 7]   # must exist
            answer: "..."
          - user: "Thanks, that was clear."
            auto_reply: "..."    # a turn answered without internal thoughts
    rewrites:                    # applied to every kept answer of stages 2 and 4, each counted
      '\\bAccording to my knowledge from Wikipedia, here\\b': Here

`render_prompt` is the one function that turns a constitution and an instruction into the prompt.
`Constitution.speaker_labels` are the labels that open a turn of this format: an answer must never
go on with one (`selfalign.text.filters`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from selfalign.config import read_yaml, validate
from selfalign.errors import UserError

RAW_SUFFIXES = (".txt", ".md")
YAML_SUFFIXES = (".yaml", ".yml")
PLACEHOLDER = re.compile(r"\{(name|developer|knowledge_cutoff|cutoff_year)\}")
# The paper's one rewrite of kept answers (its stage-2 merge script): the watson exemplar teaches
# "According to my knowledge from Wikipedia, here is ...", a provenance the model cannot vouch
# for, so it becomes "Here is ..." (the original rewrote it only at the very start of an answer;
# here wherever it opens a phrase). Pattern -> replacement, as in a constitution's `rewrites:`
# (the bundled default lists it too).
PROVENANCE_REWRITE = {r"\bAccording to my knowledge from Wikipedia, here\b": "Here"}
MONTHS = (
    "January February March April May June July August September October November December"
).split()


class Identity(BaseModel):
    """Who the assistant is: used in the self-align prompt, the SFT system prompt and identity data."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("Dromedary", description="The assistant's released name.")
    developer: str = Field("the selfalign authors", description="Who made it.")
    knowledge_cutoff: str = Field("2023-09", description="Knowledge cut-off, as shown to users.")


def describe_cutoff(cutoff: str) -> str:
    """'2023-09' -> 'September 2023'; anything else is shown as written."""
    m = re.fullmatch(r"\s*(\d{4})-(\d{1,2})\s*", cutoff)
    if m and 1 <= int(m.group(2)) <= 12:
        return f"{MONTHS[int(m.group(2)) - 1]} {m.group(1)}"
    return cutoff.strip()


def cutoff_year(cutoff: str) -> str:
    m = re.search(r"\d{4}", cutoff)
    return m.group(0) if m else cutoff.strip()


def fill_identity(text: str, identity: Identity, name: str | None = None) -> str:
    """Replace {name}, {developer}, {knowledge_cutoff} and {cutoff_year} in `text` (other braces
    are left alone); `name` overrides identity.name (the codename inside the prompt)."""
    values = {
        "name": name or identity.name,
        "developer": identity.developer,
        "knowledge_cutoff": describe_cutoff(identity.knowledge_cutoff),
        "cutoff_year": cutoff_year(identity.knowledge_cutoff),
    }
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


class Principle(BaseModel):
    """One numbered rule of the constitution."""

    model_config = ConfigDict(extra="forbid")

    id: int = Field(..., ge=1, description="Number shown in the prompt and cited in thoughts.")
    name: str = Field(..., min_length=1, description="Short name, e.g. 'candor'.")
    text: str = Field(..., min_length=1, description="What the assistant should do.")


class Turn(BaseModel):
    """One user message and the assistant's reply: thoughts + answer, or an auto reply."""

    model_config = ConfigDict(extra="forbid")

    user: str = Field(..., min_length=1, description="The user's message.")
    thoughts: str | None = Field(
        None, description="Internal thoughts after the self-identification sentence."
    )
    principles: list[int] = Field(
        default_factory=list, description="Ids of the principles the thoughts cite."
    )
    answer: str | None = Field(None, description="The answer that follows the thoughts.")
    auto_reply: str | None = Field(
        None, description="A reply without internal thoughts (e.g. to a thank-you)."
    )

    @model_validator(mode="after")
    def _one_kind(self) -> Turn:
        if self.auto_reply is not None:
            if self.thoughts is not None or self.answer is not None or self.principles:
                raise ValueError("an auto_reply turn has no thoughts, principles or answer")
        elif self.thoughts is None or self.answer is None:
            raise ValueError("a turn needs 'thoughts' and 'answer', or an 'auto_reply'")
        return self


class Exemplar(BaseModel):
    """An in-context conversation showing how the assistant applies the principles."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("", description="A label, for messages and `constitution show`.")
    turns: list[Turn] = Field(..., min_length=1, description="The conversation, in order.")

    def texts(self) -> list[str]:
        """Every text of the conversation (user turns, thoughts, answers, auto replies)."""
        out = []
        for t in self.turns:
            out += [s for s in (t.user, t.thoughts, t.answer, t.auto_reply) if s]
        return out


class TurnFormat(BaseModel):
    """Labels of the turns in the prompt ('{name}' is the codename)."""

    model_config = ConfigDict(extra="forbid")

    user: str = Field("User", description="Label of the user's turns.")
    thoughts: str = Field("{name} (internal thoughts)", description="Label of internal thoughts.")
    answer: str = Field("{name}", description="Label of the assistant's answers.")
    auto_reply: str = Field("{name} (auto reply)", description="Label of auto replies.")


class Constitution(BaseModel):
    """Identity, principles and exemplars: everything the self-align prompt is made of."""

    model_config = ConfigDict(extra="forbid")

    identity: Identity = Field(default_factory=Identity, description="The released assistant.")
    codename: str | None = Field(
        None, description="Name used inside the prompt; replaced by identity.name in kept answers."
    )
    self_identification: str = Field(
        ..., min_length=1, description="Sentence that opens every internal thought."
    )
    citation: str = Field(
        "I should follow principles {cited}.",
        description="Sentence closing the thoughts; {cited} becomes '3 (helpful), 7 (candor)'.",
    )
    preamble: str = Field("", description="Text before the principle list.")
    examples_intro: str = Field("", description="Text between the principles and the exemplars.")
    format: TurnFormat = Field(default_factory=TurnFormat, description="Turn labels.")
    principles: list[Principle] = Field(..., min_length=1, description="The numbered rules.")
    exemplars: list[Exemplar] = Field(default_factory=list, description="Example conversations.")
    rewrites: dict[str, str] = Field(
        default_factory=dict,
        description="Pattern -> replacement applied to every kept answer (regular expressions, "
        "'^' a line start; the replacement may use \\1 groups); each application is counted.",
    )
    raw_prompt: str | None = Field(
        None, description="Set when loaded from a raw prompt text: used verbatim as the prompt."
    )

    @property
    def prompt_name(self) -> str:
        """The name the model reads in the prompt (the codename if there is one)."""
        return self.codename or self.identity.name

    def fill(self, text: str) -> str:
        """Replace the identity placeholders in `text` (other braces are left alone)."""
        return fill_identity(text, self.identity, self.prompt_name)

    def label(self, kind: str) -> str:
        """The filled-in label of a turn kind: user, thoughts, answer, auto_reply."""
        return self.fill(getattr(self.format, kind))

    def turn_labels(self) -> list[str]:
        """Every label that opens a turn in the prompt ('User', 'Orion (internal thoughts)', ...)."""
        return [self.label(kind) for kind in TurnFormat.model_fields]

    def speaker_labels(self) -> list[str]:
        """Every turn opener of this format with its colon, under the prompt's name and under
        the released one ('User:', 'Orion:', 'Dromedary (auto reply):', ...): a model trained on
        the renamed answers may write either."""
        shown = self.turn_labels()
        name = re.compile(rf"(?<!\w){re.escape(self.prompt_name)}(?!\w)")
        released = [name.sub(lambda _: self.identity.name, label) for label in shown]
        return list(dict.fromkeys(f"{label}:" for label in shown + released))

    def principle(self, pid: int) -> Principle | None:
        return next((p for p in self.principles if p.id == pid), None)

    def with_identity(self, identity: Identity) -> Constitution:
        return self.model_copy(update={"identity": identity})


# -- validation ------------------------------------------------------------------------------------


def _turn_place(ei: int, ex: Exemplar, ti: int) -> str:
    label = f" ({ex.name!r})" if ex.name else ""
    return f"exemplars[{ei}]{label}.turns[{ti}]"


def check_constitution(c: Constitution, source: str) -> Constitution:
    """Checks across fields, each failure a UserError naming the place in the file."""
    seen: dict[int, int] = {}
    for i, p in enumerate(c.principles):
        if not p.text.strip():
            raise UserError(f"{source}: principles[{i}] (id {p.id}): 'text' is empty")
        if p.id in seen:
            raise UserError(
                f"{source}: principles[{i}]: duplicate principle id {p.id} "
                f"(already used by principles[{seen[p.id]}]); give every principle its own id"
            )
        seen[p.id] = i
    known = ", ".join(str(p.id) for p in c.principles)
    for ei, ex in enumerate(c.exemplars):
        for ti, turn in enumerate(ex.turns):
            for pid in turn.principles:
                if pid not in seen:
                    raise UserError(
                        f"{source}: {_turn_place(ei, ex, ti)}: cites principle {pid}, which does "
                        f"not exist (principle ids: {known})"
                    )
    if "{cited}" not in c.citation:
        raise UserError(f"{source}: citation: must contain '{{cited}}' (got {c.citation!r})")
    for pattern, replacement in c.rewrites.items():
        try:
            re.compile(pattern, re.MULTILINE).sub(replacement, "")
        except (re.error, IndexError) as e:
            raise UserError(
                f"{source}: rewrites: {pattern!r} -> {replacement!r} is not a valid regular "
                f"expression and replacement ({e}); escape special characters with a backslash"
            ) from None
    return c


# -- rendering ------------------------------------------------------------------------------------


def render_citation(c: Constitution, ids: Iterable[int]) -> str:
    cited = ", ".join(f"{p.id} ({p.name})" for pid in ids if (p := c.principle(pid)))
    return c.fill(c.citation.replace("{cited}", cited))


def render_thoughts(c: Constitution, turn: Turn) -> str:
    """Self-identification sentence, the turn's thoughts, then the principles it cites."""
    parts = [c.fill(c.self_identification), c.fill(turn.thoughts or "").strip()]
    if turn.principles:
        parts.append(render_citation(c, turn.principles))
    return " ".join(p for p in parts if p)


def user_text(instruction: str, input: str = "") -> str:
    """THE user's turn, in every prompt and training row: the instruction, then its input (if
    any) after a blank line."""
    instruction, input = instruction.strip(), (input or "").strip()
    return f"{instruction}\n\n{input}" if input else instruction


def _render_turn(c: Constitution, turn: Turn) -> list[str]:
    blocks = [f"{c.label('user')}: {c.fill(turn.user).strip()}"]
    if turn.auto_reply is not None:
        blocks.append(f"{c.label('auto_reply')}: {c.fill(turn.auto_reply).strip()}")
    else:
        blocks.append(f"{c.label('thoughts')}: {render_thoughts(c, turn)}")
        blocks.append(f"{c.label('answer')}: {c.fill(turn.answer or '').strip()}")
    return blocks


def render_prefix(c: Constitution) -> str:
    """Everything before the new instruction; it ends with the user label and a colon."""
    if c.raw_prompt is not None:
        return c.raw_prompt.rstrip()
    blocks = []
    if c.preamble.strip():
        blocks.append(c.fill(c.preamble).strip())
    blocks.append("\n".join(f"{p.id} ({p.name}). {c.fill(p.text).strip()}" for p in c.principles))
    if c.examples_intro.strip():
        blocks.append(c.fill(c.examples_intro).strip())
    for ex in c.exemplars:
        for turn in ex.turns:
            blocks += _render_turn(c, turn)
    blocks.append(f"{c.label('user')}:")
    return "\n\n".join(blocks)


def thoughts_cue(c: Constitution) -> str:
    """Where the prompt ends: the model writes its internal thoughts next."""
    return f"{c.label('thoughts')}:"


def render_prompt(
    c: Constitution, instruction: str, input: str = "", prefix: str | None = None
) -> str:
    """THE self-align prompt: constitution, exemplars, the user's turn, then the thoughts cue.

    `prefix` is `render_prefix(c)` computed once by a caller rendering many prompts.
    """
    prefix = render_prefix(c) if prefix is None else prefix
    return f"{prefix} {user_text(instruction, input)}\n\n{thoughts_cue(c)}"


# -- loading --------------------------------------------------------------------------------------


def bundled_dir():
    """The folder of bundled constitution data (a Traversable)."""
    return resources.files("selfalign") / "data" / "constitution"


def bundled_names() -> list[str]:
    root = bundled_dir()
    return sorted(
        p.name.rsplit(".", 1)[0]
        for p in root.iterdir()
        if p.name.endswith(YAML_SUFFIXES) and not p.name.startswith("identity")
    )


def load_constitution(path_or_name: str | Path) -> Constitution:
    """A constitution from a YAML file, a raw prompt text, or a bundled name ('default')."""
    path = Path(path_or_name)
    if not path.exists():
        text = str(path_or_name)
        if "/" in text or path.suffix:
            raise UserError(f"{path}: constitution file not found")
        if text not in bundled_names():
            raise UserError(
                f"constitution {text!r}: no such file, and no bundled constitution of that name "
                f"(bundled: {', '.join(bundled_names())})"
            )
        ref = bundled_dir() / f"{text}.yaml"
        with resources.as_file(ref) as real:
            return load_constitution(real)
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected a constitution file")
    if path.suffix.lower() in RAW_SUFFIXES:
        return parse_raw_prompt(path.read_text(encoding="utf-8"), str(path))
    data = read_yaml(path)
    # one problem per line: a hand-written constitution often has several
    checked = validate(Constitution, data, str(path), sep="\n")
    return check_constitution(checked, str(path))


def dump_constitution(c: Constitution) -> str:
    data = c.model_dump(mode="json", exclude_none=True)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)


# -- citations ------------------------------------------------------------------------------------

_NUMBER_WITH_NAME = re.compile(r"\b(\d{1,3})\s*\(([^()]{1,60})\)")
_RULE_LIST = re.compile(
    r"\b(?:rules?|principles?)\s+((?:\d{1,3}(?:\s*\([^()]{0,60}\))?(?:\s*(?:,|and|&|;)\s*)?)+)",
    re.IGNORECASE,
)
_PAREN = re.compile(r"\(([^()]{1,60})\)")


def find_citations(thoughts: str, principles: list[Principle]) -> list[int]:
    """Ids of the principles that `thoughts` cites, in order of first mention.

    Recognises '3 (helpful)', 'rules 3, 7 and 12', 'principle 4' and a bare '(candor)'; numbers
    elsewhere (years, quantities) are not citations, nor are ids the constitution lacks.
    """
    ids = {p.id for p in principles}
    by_name = {p.name.strip().lower(): p.id for p in principles}
    found: list[tuple[int, int]] = []  # (position, id)
    for m in _NUMBER_WITH_NAME.finditer(thoughts):
        found.append((m.start(), int(m.group(1))))
    for m in _RULE_LIST.finditer(thoughts):
        for n in re.finditer(r"\d{1,3}", re.sub(r"\([^()]*\)", "", m.group(1))):
            found.append((m.start(1) + n.start(), int(n.group(0))))
    for m in _PAREN.finditer(thoughts):
        pid = by_name.get(m.group(1).strip().lower())
        if pid is not None:
            found.append((m.start(), pid))
    out: list[int] = []
    for _, pid in sorted(found):
        if pid in ids and pid not in out:
            out.append(pid)
    return out


# -- raw prompt texts (the original watson prompt) -------------------------------------------------

_RAW_PRINCIPLE = re.compile(r"^(\d{1,3})\s*\(([^()]+)\)\.\s*(.+)$", re.MULTILINE)
_THOUGHTS_LABEL = re.compile(r"^(.+?) \(internal thoughts\):", re.MULTILINE)


def _split_turns(text: str, labels: dict[str, str]) -> list[tuple[str, str]]:
    """(kind, text) for every labelled turn of a raw prompt, in order."""
    alternatives = sorted(labels.items(), key=lambda kv: -len(kv[1]))
    pattern = re.compile(
        "^(" + "|".join(re.escape(label) for _, label in alternatives) + r"):", re.MULTILINE
    )
    kind_of = {label: kind for kind, label in labels.items()}
    matches = list(pattern.finditer(text))
    turns = []
    for m, nxt in zip(matches, matches[1:] + [None], strict=True):
        end = nxt.start() if nxt else len(text)
        turns.append((kind_of[m.group(1)], text[m.end() : end].strip()))
    return turns


def parse_raw_prompt(text: str, source: str = "prompt") -> Constitution:
    """Read a raw self-align prompt (the original watson format) into a `Constitution`.

    The text itself is kept as `raw_prompt` and rendered verbatim; what is read back (codename,
    principles, exemplars, the self-identification sentence) drives parsing and the filters.
    """
    label = _THOUGHTS_LABEL.search(text)
    if not label:
        raise UserError(
            f"{source}: no '<name> (internal thoughts):' turn found; a raw self-align prompt needs "
            "exemplars in the form 'User: ...' / '<name> (internal thoughts): ...' / '<name>: ...'"
        )
    codename = label.group(1).strip()
    labels = {
        "user": "User",
        "thoughts": f"{codename} (internal thoughts)",
        "auto_reply": f"{codename} (auto reply)",
        "answer": codename,
    }
    if not re.search(r"(^|\n)User:$", text.rstrip()):
        raise UserError(f"{source}: a raw self-align prompt must end with 'User:' (the new turn)")
    principles = [
        Principle(id=int(m.group(1)), name=m.group(2).strip(), text=m.group(3).strip())
        for m in _RAW_PRINCIPLE.finditer(text)
    ]
    if not principles:
        raise UserError(f"{source}: no principles found (lines like '1 (ethical). ...')")
    exemplars, self_id = _raw_exemplars(_split_turns(text, labels), principles)
    if not self_id:
        raise UserError(f"{source}: the internal thoughts have no opening sentence to require")
    c = Constitution(
        identity=Identity(),
        codename=codename,
        self_identification=self_id,
        citation="I should follow rules {cited}.",
        format=TurnFormat(**labels),
        principles=principles,
        exemplars=exemplars,
        rewrites=dict(PROVENANCE_REWRITE),
        raw_prompt=text,
    )
    return check_constitution(c, source)


def _raw_exemplars(
    turns: list[tuple[str, str]], principles: list[Principle]
) -> tuple[list[Exemplar], str | None]:
    """Group labelled turns into exemplars (each closes with an auto reply); also return the
    first sentence of the first internal thought: the self-identification sentence."""
    exemplars: list[Exemplar] = []
    current: list[Turn] = []
    pending: dict[str, Any] = {}
    self_id = None
    for kind, body in turns:
        if kind == "user":
            pending = {"user": body}
        elif kind == "thoughts" and "user" in pending:
            first, _, rest = body.partition(". ")
            self_id = self_id or first.strip().rstrip(".") + "."
            pending["thoughts"] = rest.strip()
            pending["principles"] = find_citations(body, principles)
        elif kind == "answer" and "thoughts" in pending:
            current.append(Turn(**pending, answer=body))
            pending = {}
        elif kind == "auto_reply" and "user" in pending:
            current.append(Turn(user=pending["user"], auto_reply=body))
            exemplars.append(Exemplar(name=f"exemplar {len(exemplars) + 1}", turns=current))
            current, pending = [], {}
    if current:
        exemplars.append(Exemplar(name=f"exemplar {len(exemplars) + 1}", turns=current))
    return exemplars, self_id
