"""The constitution: the assistant's identity, its principles and in-context exemplars.

(Schema to be completed by stage 2; `Identity` is shared with training and chat.)
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Identity(BaseModel):
    """Who the assistant is: used in the self-align prompt, the SFT system prompt and identity data."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("Dromedary", description="The assistant's released name.")
    developer: str = Field("the selfalign authors", description="Who made it.")
    knowledge_cutoff: str = Field("2023-09", description="Knowledge cut-off, as shown to users.")
