"""The four SELF-ALIGN stages, one module each, in pipeline order (paper section 3).

stage1_instructions  TGRT self-instruct: instructions and red-teaming questions (3.1)
stage2_self_align    principle-driven self-alignment: answers under the constitution (3.2)
stage3_engrave       principle engraving: SFT of the base model without the principles (3.3)
stage4_verbose       verbose cloning: long answers from the engraved model, final SFT (3.4)

Each module has a pure core (prompt building, parsing, filtering: text in, records out) and a
thin `run_*` shell that reads files, generates or trains, and writes files. They know nothing of
the run directory: `selfalign.run.registry` maps them onto it.
"""
