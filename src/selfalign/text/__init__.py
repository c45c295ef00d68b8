"""Text that the stages share: the constitution, the conversation format, answer filters, novelty.

constitution  identity, principles, exemplars; renders the stage-2 prompt
conversation  system prompts, the chat template, SFT rows as messages, ShareGPT roles
filters       answer filters of stages 2 and 4 (turn headers, repetition, leakage, apology, length)
novelty       the exact ROUGE-L novelty filter of stage 1
"""
